"""Several captions per image: shards whose .txt has one caption per line (`captions_per_line`, the flag
--captions-per-line) or whose .json lists "captions",
and CSV rows with several caption columns or a JSON list. Training draws one caption per visit from the
batch's seeded generators (an exact resume draws the same), and the sample keeps one index: one u per image."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastclip.data.csv import CsvTable
from fastclip.data.loader import build_csv_train_loader, build_train_loader, build_val_loader
from fastclip.datasets.writer import shard_sample, write_shards
from fastclip.distributed import comm
from fastclip.evaluate import image_to_text_ranks, retrieval_eval, text_to_image_ranks
from fastclip.models import build_model, register_model_configs
from multiprocess import spawn
from test_data_position import BATCH, SEED, assert_same, recorded, resumed, tokenizer  # noqa: F401 (fixture)

PAIRS = 96


def captions_of(i: int) -> list[str]:
    """Pair i's captions: 1, 2 or 3 of them, each naming the pair."""
    return [f"picture {i} variant {v}" for v in range(1 + i % 3)]


def write_multi_caption_shards(directory) -> tuple[str, int]:
    """Even pairs keep their captions one per line of the .txt, odd pairs list them in the .json."""
    rng = np.random.default_rng(0)

    def sample(key: str, i: int) -> dict:
        image = rng.integers(0, 255, (8, 8), dtype=np.uint8)
        if i % 2 == 0:
            return shard_sample(key, image, "\n".join(captions_of(i)))
        raw = shard_sample(key, image, None, meta={"captions": captions_of(i)})
        raw["json"]["caption"] = None
        return raw

    return write_shards(PAIRS, sample, directory, samples_per_shard=32)


def to_tensor(image):
    return torch.from_numpy(np.asarray(image.resize((8, 8)), dtype=np.float32)).permute(2, 0, 1) / 255


def drawn(batches: list[dict], tokenizer, pattern_keys: dict[int, int]) -> list[tuple[int, str]]:
    """(pair, caption) of every sample of the batches, the caption found by its tokens."""
    by_tokens = {tuple(tokenizer([c])[0].tolist()): c for i in range(PAIRS) for c in captions_of(i)}
    pairs = []
    for batch in batches:
        for index, tokens in zip(batch["index"].tolist(), batch["text"]):
            pairs.append((pattern_keys[index], by_tokens[tuple(tokens.tolist())]))
    return pairs


def test_training_draws_one_caption_per_visit_and_keeps_one_index_per_image(tmp_path, tokenizer):
    pattern, data_size = write_multi_caption_shards(tmp_path)
    pattern = str(tmp_path / pattern)
    keys = {int(f"{s * 100 + p:07d}"): s * 32 + p for s in range(3) for p in range(32)}  # key -> pair
    loader = build_train_loader(pattern, to_tensor, tokenizer, batch_size=BATCH, num_samples=PAIRS, seed=SEED,
                                data_size=data_size, shuffle_buffer=8, captions_per_line=True)
    seen: dict[int, set[str]] = {}
    for epoch in range(6):
        loader.set_epoch(epoch)
        for pair, caption in drawn(list(loader), tokenizer, keys):
            assert caption in captions_of(pair)  # a caption of its own image, under the image's one index
            seen.setdefault(pair, set()).add(caption)
    assert len(seen) == PAIRS
    several = [pair for pair in range(PAIRS) if len(captions_of(pair)) > 1]
    varied = sum(len(seen[pair]) > 1 for pair in several)
    assert varied >= 0.8 * len(several)  # a fresh draw per visit (6 visits: all the same with p <= 1/32)
    # validation reads the first caption, every time
    val = build_val_loader(pattern, to_tensor, tokenizer, batch_size=BATCH, data_size=data_size, captions_per_line=True)
    assert all(caption == captions_of(pair)[0] for pair, caption in drawn(list(val), tokenizer, keys))


def test_an_exact_resume_draws_the_same_captions(tmp_path, tokenizer):
    pattern, data_size = write_multi_caption_shards(tmp_path)

    def make():
        loader = build_train_loader(str(tmp_path / pattern), to_tensor, tokenizer, batch_size=BATCH,
                                    num_samples=PAIRS, seed=SEED, data_size=data_size, shuffle_buffer=8,
                                    captions_per_line=True)
        loader.set_epoch(2)
        return loader

    batches, states = recorded(make())
    assert_same(list(resumed(make, states[2])), batches[2:])


def test_without_captions_per_line_a_txt_is_one_caption_line_breaks_included(tmp_path, tokenizer):
    pattern, data_size = write_multi_caption_shards(tmp_path)
    val = build_val_loader(str(tmp_path / pattern), to_tensor, tokenizer, batch_size=BATCH, data_size=data_size)
    batches = list(val)
    pair_5 = next(b for b in batches if 5 in b["order"].tolist())  # odd pair: its .json lists the captions
    assert "captions" in pair_5  # a .json list still gives several
    pair_2 = [b for b in batches if 2 in b["order"].tolist()][0]
    position = pair_2["order"].tolist().index(2)
    whole = tokenizer(["\n".join(captions_of(2))])[0]
    assert torch.equal(pair_2["text"][position], whole)  # the .txt whole, as open_clip reads it


def test_csv_caption_columns_and_json_lists_give_several_captions(tmp_path, tokenizer):
    rng = np.random.default_rng(0)
    lines = ["filepath\ttitle\tother"]
    for row in range(32):
        path = tmp_path / f"{row}.png"
        Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8)).save(path)
        first = json.dumps(captions_of(row)[:2]) if row % 2 else captions_of(row)[0]
        lines.append(f"{path}\t{first}\t{'' if row % 4 == 0 else f'row {row} again'}")
    csv = tmp_path / "pairs.csv"
    csv.write_text("\n".join(lines) + "\n")
    table = CsvTable(csv, caption_key="title,other")
    assert table.captions(0) == ("picture 0 variant 0",)
    assert table.captions(1) == ("picture 1 variant 0", "picture 1 variant 1", "row 1 again")
    assert table.captions(2) == ("picture 2 variant 0", "row 2 again")
    loader = build_csv_train_loader(table, to_tensor, tokenizer, batch_size=8, num_samples=32, seed=SEED)
    texts = set()
    for epoch in range(4):
        loader.set_epoch(epoch)
        for batch in loader:
            for row, tokens in zip(batch["index"].tolist(), batch["text"]):
                options = {tuple(tokenizer([c])[0].tolist()) for c in table.captions(row)}
                assert tuple(tokens.tolist()) in options
                texts.add((row, tuple(tokens.tolist())))
    assert sum(1 for row, _ in texts if row == 1) > 1  # row 1's three captions were not always the same one


def brute_force_recall(images: torch.Tensor, captions: torch.Tensor, owner: list[int], k: int) -> tuple[float, float]:
    """The COCO/Flickr protocol by counting: an image is a hit when one of its captions is among the k
    highest-scored captions (ties against it), a caption when its image is among the k highest-scored images."""
    scores = (images @ captions.T).tolist()
    image_hits = 0
    for i, row in enumerate(scores):
        own = [c for c in range(len(owner)) if owner[c] == i]
        image_hits += any(sum(1 for c2 in range(len(owner)) if owner[c2] != i and row[c2] >= row[c]) < k
                          for c in own)
    caption_hits = 0
    for c in range(len(owner)):
        column = [scores[i][c] for i in range(len(images))]
        caption_hits += sum(1 for i in range(len(images)) if i != owner[c] and column[i] >= column[owner[c]]) < k
    return image_hits / len(images), caption_hits / len(owner)


def test_retrieval_with_several_captions_counts_as_coco_does():
    generator = torch.Generator().manual_seed(0)
    owner = [i for i in range(20) for _ in range(1 + i % 3)]
    images = torch.nn.functional.normalize(torch.randn(20, 6, generator=generator), dim=1)
    captions = torch.nn.functional.normalize(images[owner] + 0.9 * torch.randn(len(owner), 6, generator=generator),
                                             dim=1)
    owners = torch.tensor(owner)
    to_text, to_image = image_to_text_ranks(images, captions, owners), text_to_image_ranks(captions, images, owners)
    for k in (1, 5, 10):
        expected = brute_force_recall(images, captions, owner, k)
        assert ((to_text < k).float().mean().item(), (to_image < k).float().mean().item()) == pytest.approx(expected)
    broken = images.clone()
    broken[3] = float("nan")  # NaN features never count as hits
    assert image_to_text_ranks(broken, captions, owners)[3] == len(owner)
    assert (text_to_image_ranks(captions, broken, owners)[owners == 3] == 20).all()
    # the query rows in two blocks, as two ranks score them, give the same ranks
    assert torch.equal(torch.cat([image_to_text_ranks(images[:7], captions, owners),
                                  image_to_text_ranks(images[7:], captions, owners, first=7)]), to_text)
    assert torch.equal(torch.cat([text_to_image_ranks(captions[:11], images, owners),
                                  text_to_image_ranks(captions[11:], images, owners, first=11)]), to_image)


def evaluate_multi_caption_set(pattern: str, data_size: int, out: str) -> None:
    """This process's retrieval metrics of the multi-caption set, as one rank of the current group (or alone)."""
    register_model_configs()
    torch.manual_seed(0)
    bundle = build_model("ViT-Tiny-32px")
    loader = build_val_loader(pattern, bundle.preprocess_val, bundle.tokenizer, BATCH, data_size=data_size,
                              rank=comm.rank(), world_size=comm.world_size(), captions_per_line=True)
    metrics = retrieval_eval(bundle.model, loader, batch_size=BATCH)
    Path(out, f"rank{comm.rank()}.json").write_text(json.dumps(metrics))


def test_multi_caption_retrieval_split_over_two_ranks_gives_the_one_process_numbers(tmp_path):
    pattern, data_size = write_multi_caption_shards(tmp_path / "shards")
    pattern = str(tmp_path / "shards" / pattern)
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    evaluate_multi_caption_set(pattern, data_size, str(tmp_path / "one"))
    spawn(2, evaluate_multi_caption_set, pattern, data_size, str(tmp_path / "two"))
    alone = json.loads((tmp_path / "one" / "rank0.json").read_text())
    assert alone["num_samples"] == PAIRS and alone["num_captions"] == sum(len(captions_of(i)) for i in range(PAIRS))
    for rank in range(2):
        split = json.loads((tmp_path / "two" / f"rank{rank}.json").read_text())
        assert split.keys() == alone.keys()
        assert split == pytest.approx(alone, rel=1e-5)
