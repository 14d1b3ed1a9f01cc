"""Evaluation against hand-built models whose embeddings are known, so every expected number is exact.

Images carry their own score rows: the first pixel row of an image is its feature vector. The text
encoder of the zero-shot model finds which class name a prompt contains (by the real open_clip
tokenizer's tokens) and returns that class's one-hot vector, so image i's logits are its score row.
"""

from __future__ import annotations

import json
import fcntl
import math
import os
import re
import select
import struct
import sys
import termios
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.nn.parallel import DataParallel
from torchvision.transforms import ToTensor

from fastclip.evaluate import (
    REFERENCE_TAU,
    append_results,
    class_prompts,
    embed_set,
    global_contrastive_loss,
    is_imagenet_folder,
    load_image_folder,
    log_mean_exp_negatives,
    retrieval_eval,
    zero_shot_eval,
)
from fastclip.models import build_model
from fastclip.train.precision import resolve_precision

TOKENIZER = open_clip.SimpleTokenizer(context_length=32)
SYNSETS = [f"n{i:08d}" for i in range(1000)]


class PixelImageModel(nn.Module):
    """Image features are the first pixel row of channel 0; a real log-temperature parameter."""

    def __init__(self, dim: int, logit_scale: float = 100.0):
        super().__init__()
        self.dim = dim
        self.logit_scale = nn.Parameter(torch.tensor(math.log(logit_scale)))

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        features = images[:, 0, 0, : self.dim]
        return F.normalize(features, dim=-1) if normalize else features


class ClassNameModel(PixelImageModel):
    """Text features: the one-hot vector of the single known class name whose tokens the prompt contains."""

    def __init__(self, classnames: list[str]):
        super().__init__(dim=len(classnames))
        self.name_tokens = [_content_tokens(TOKENIZER([name])[0]) for name in classnames]

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        classes = torch.tensor([self._class_of(_content_tokens(row)) for row in tokens])
        return F.one_hot(classes, self.dim).float()

    def _class_of(self, prompt: list[int]) -> int:
        found = [c for c, name in enumerate(self.name_tokens) if _contains(prompt, name)]
        if len(found) != 1:
            raise ValueError(f"prompt {TOKENIZER.decode(prompt)!r} names {len(found)} known classes")
        return found[0]


class TableTextModel(PixelImageModel):
    """Text features: row `tokens[:, 0]` of a fixed table (retrieval tests)."""

    def __init__(self, table: torch.Tensor, logit_scale: float = 100.0):
        super().__init__(dim=table.shape[1], logit_scale=logit_scale)
        self.register_buffer("table", table)

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        features = self.table[tokens[:, 0]]
        return F.normalize(features, dim=-1) if normalize else features


def _content_tokens(row: torch.Tensor) -> list[int]:
    """Token ids between start-of-text and end-of-text."""
    ids = row.tolist()
    return ids[1 : ids.index(TOKENIZER.eot_token_id)]


def _contains(sequence: list[int], part: list[int]) -> bool:
    return any(sequence[i : i + len(part)] == part for i in range(len(sequence) - len(part) + 1))


def score_row(n: int, truth: int, rank: int) -> list[int]:
    """n distinct decreasing scores with `truth` placed at 0-based `rank`, the others in index order."""
    order = [c for c in range(n) if c != truth]
    order.insert(rank, truth)
    scores = [0] * n
    for position, c in enumerate(order):
        scores[c] = n - position
    return scores


def write_image(path: Path, scores: list[int]) -> None:
    """An 8x8 grey PNG whose first row holds the scores (x30, distinct 8-bit values)."""
    pixels = np.zeros((8, 8), dtype=np.uint8)
    pixels[0, : len(scores)] = np.array(scores) * 30
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels, mode="L").save(path)


def write_folder(root: Path, folders: list[str], truth_ranks: list[list[int]]) -> Path:
    """One PNG per entry of truth_ranks[c]: an image of class c ranking its true class at that rank."""
    for c, ranks in enumerate(truth_ranks):
        for i, rank in enumerate(ranks):
            write_image(root / folders[c] / f"{i}.png", score_row(len(folders), c, rank))
    return root


def test_zero_shot_top1_top5_match_hand_count(tmp_path):
    folders = sorted(["hot_dog", "tulip", "violin", "kettle", "zebra", "lighthouse"])
    # 12 images; 3 point elsewhere: true class 2nd (top-5 hit), 5th (top-5 hit), 6th (top-5 miss)
    ranks = [[0, 0], [0, 1], [0, 0], [4, 0], [0, 0], [5, 0]]
    root = write_folder(tmp_path / "val", folders, ranks)
    model = ClassNameModel([f.replace("_", " ") for f in folders]).train()

    result = zero_shot_eval(DataParallel(model), root, ToTensor(), TOKENIZER, batch_size=5)

    assert result == {
        "imagenet-zeroshot-val-top1": 0.75,
        "imagenet-zeroshot-val-top5": 11 / 12,
        "zeroshot-num-classes": 6,
        "zeroshot-num-images": 12,
    }
    assert model.training, "evaluation must hand the model back in its training mode"


def test_zero_shot_with_fewer_than_five_classes_uses_top_k_of_all(tmp_path):
    folders = ["kettle", "tulip", "zebra"]
    root = write_folder(tmp_path / "val", folders, [[2], [0], [0]])

    result = zero_shot_eval(ClassNameModel(folders), root, ToTensor(), TOKENIZER)

    assert result["imagenet-zeroshot-val-top1"] == pytest.approx(2 / 3)
    assert result["imagenet-zeroshot-val-top5"] == 1.0


def test_classnames_file_names_sorted_folders_in_order(tmp_path):
    root = write_folder(tmp_path / "val", ["c0", "c1", "c2"], [[0, 1], [0, 0], [0, 2]])
    names = tmp_path / "classnames.txt"
    names.write_text("zebra\ntulip\nkettle\n\n")  # a trailing blank line is no class

    result = zero_shot_eval(
        ClassNameModel(["zebra", "tulip", "kettle"]), root, ToTensor(), TOKENIZER, classnames_file=names
    )

    assert result["imagenet-zeroshot-val-top1"] == pytest.approx(4 / 6)
    assert result["imagenet-zeroshot-val-top5"] == 1.0


def test_classnames_file_with_wrong_count_names_both_counts_and_file(tmp_path):
    names = tmp_path / "classnames.txt"
    names.write_text("zebra\ntulip\n")
    with pytest.raises(ValueError, match=re.escape(str(names)) + r" lists 2 class names .* has 3 classes"):
        class_prompts(["c0", "c1", "c2"], names)


def test_imagenet_synset_folders_are_detected():
    assert is_imagenet_folder(SYNSETS)
    assert not is_imagenet_folder(SYNSETS[:-1])
    assert not is_imagenet_folder(SYNSETS[:-1] + ["cat"])
    assert not is_imagenet_folder(SYNSETS[:-1] + [SYNSETS[0]])


def test_imagenet_folder_gets_imagenet_names_and_openai_templates_others_folder_names():
    names, templates = class_prompts(SYNSETS)
    assert names == list(open_clip.IMAGENET_CLASSNAMES)
    assert templates is open_clip.OPENAI_IMAGENET_TEMPLATES

    names, templates = class_prompts(["hot_dog", "n01440764"])
    assert names == ["hot dog", "n01440764"]
    assert templates is open_clip.SIMPLE_IMAGENET_TEMPLATES


def test_partial_imagenet_copy_keeps_all_1000_classes(tmp_path):
    for synset in SYNSETS:
        (tmp_path / synset).mkdir()
    write_image(tmp_path / SYNSETS[3] / "a.png", [1])
    write_image(tmp_path / SYNSETS[999] / "b.png", [1])

    dataset = load_image_folder(tmp_path, ToTensor())

    assert is_imagenet_folder(dataset.classes)
    assert [target for _, target in dataset.samples] == [3, 999]


def _retrieval_batches(images: torch.Tensor, sizes: list[int]) -> list[dict[str, torch.Tensor]]:
    """Loader batches: pixel rows as (b, 3, 1, n) images; text i is token sequence [i, 0, ...]; pair i is
    the set's i-th ('order')."""
    batches, start = [], 0
    for size in sizes:
        index = torch.arange(start, start + size)
        text = torch.zeros(size, 32, dtype=torch.long)
        text[:, 0] = index
        image = images[index].view(size, 1, 1, -1).expand(size, 3, 1, -1)
        batches.append({"image": image, "text": text, "index": index, "order": index})
        start += size
    return batches


# median of ranks is (1 + 3) / 2 = 2, so the 1-based median rank is 3 (numpy's median, as open_clip_train)
RANKS = [0, 0, 0, 0, 0, 1, 3, 4, 5, 7, 9, 11]
EXPECTED = {"R@1": 5 / 12, "R@5": 8 / 12, "R@10": 11 / 12, "mean_rank": 40 / 12 + 1, "median_rank": 3}


def _score_matrix() -> torch.Tensor:
    n = len(RANKS)
    return torch.tensor([score_row(n, i, rank) for i, rank in enumerate(RANKS)], dtype=torch.float)


def test_image_to_text_recall_from_known_ranks():
    scores, identity = _score_matrix(), torch.eye(len(RANKS))
    model = TableTextModel(table=identity)

    metrics = retrieval_eval(model, _retrieval_batches(scores, [5, 7]), batch_size=7)

    assert {k: metrics[f"image_to_text_{k}"] for k in EXPECTED} == pytest.approx(EXPECTED)
    assert metrics["num_samples"] == 12


def test_text_to_image_recall_from_known_ranks():
    scores, identity = _score_matrix(), torch.eye(len(RANKS))
    model = TableTextModel(table=scores)

    metrics = retrieval_eval(model, _retrieval_batches(identity, [12]), batch_size=12)

    assert {k: metrics[f"text_to_image_{k}"] for k in EXPECTED} == pytest.approx(EXPECTED)


def test_val_loss_is_sample_weighted_clip_loss_of_batch_size_blocks_at_model_temperature():
    identity = torch.eye(12)
    model = TableTextModel(table=identity, logit_scale=2.0)

    # blocks of 8 and 4 pairs in set order, whatever batches the loader yields
    metrics = retrieval_eval(model, _retrieval_batches(identity, [3, 5, 4]), batch_size=8)

    # a block of b perfect pairs at scale s: -log(e^s / (e^s + b - 1)) in both directions
    expected = (8 * math.log(1 + 7 * math.exp(-2)) + 4 * math.log(1 + 3 * math.exp(-2))) / 12
    assert metrics["clip_val_loss"] == pytest.approx(expected, rel=1e-6)
    assert metrics["image_to_text_R@1"] == metrics["text_to_image_R@1"] == 1.0


def brute_force_global_loss(image: torch.Tensor, text: torch.Tensor, tau: float) -> float:
    """The definition, in float64 with plain exponentials: mean over pairs and both sides of
    log(1/(n-1) * sum_{j != i} exp((s_ij - s_ii) / tau)), s the image-text cosine."""
    s = image.double() @ text.double().T
    n = len(s)
    total = 0.0
    for i in range(n):
        for scores, own in ((s[i], s[i, i]), (s[:, i], s[i, i])):  # image anchor i, then text anchor i
            others = torch.cat([scores[:i], scores[i + 1:]])
            total += math.log(torch.exp((others - own) / tau).sum().item() / (n - 1))
    return total / (2 * n)


@pytest.mark.parametrize("tau", [0.01, 0.07, 1.0])
def test_global_loss_matches_the_float64_definition_blockwise(tau):
    generator = torch.Generator().manual_seed(0)
    image, text = (F.normalize(torch.randn(37, 8, generator=generator), dim=1) for _ in range(2))
    expected = brute_force_global_loss(image, text, tau)
    assert global_contrastive_loss(image, text, tau) == pytest.approx(expected, rel=1e-5)
    # the same rows in chunks of 5 keys' worth of queries, and split as two ranks would split them
    whole = log_mean_exp_negatives(image, text, tau)
    assert torch.allclose(torch.cat([log_mean_exp_negatives(image[:20], text, tau, chunk=5),
                                     log_mean_exp_negatives(image[20:], text, tau, first=20, chunk=5)]), whole)


def test_retrieval_reports_the_global_loss_at_the_model_and_the_reference_temperature():
    generator = torch.Generator().manual_seed(1)
    table = F.normalize(torch.randn(12, 4, generator=generator), dim=1)
    model = TableTextModel(table=table, logit_scale=1 / 0.05)  # the scale itself: tau 0.05
    metrics = retrieval_eval(model, _retrieval_batches(table, [5, 7]), batch_size=4)
    embedded = embed_set(model, _retrieval_batches(table, [12]))
    images, texts = embedded.images, embedded.texts
    assert metrics["global_val_loss"] == pytest.approx(brute_force_global_loss(images, texts, 0.05), rel=1e-5)
    assert metrics["global_val_loss_ref"] == pytest.approx(brute_force_global_loss(images, texts, REFERENCE_TAU),
                                                           rel=1e-5)


def test_collapsed_model_scores_no_recall_and_log_batch_size_loss():
    same = torch.ones(12, 4)
    metrics = retrieval_eval(TableTextModel(table=same), _retrieval_batches(same, [4, 8]), batch_size=8)

    assert metrics["image_to_text_R@10"] == metrics["text_to_image_R@1"] == 0.0
    assert metrics["image_to_text_mean_rank"] == 12
    assert metrics["clip_val_loss"] == pytest.approx((8 * math.log(8) + 4 * math.log(4)) / 12, rel=1e-6)


def test_batches_in_any_order_are_evaluated_in_set_order_and_cut_to_num_samples():
    scores, identity = _score_matrix(), torch.eye(len(RANKS))
    model = TableTextModel(table=identity, logit_scale=2.0)
    batches = _retrieval_batches(scores, [5, 4, 3])

    in_order = retrieval_eval(model, batches, batch_size=4)
    shuffled = retrieval_eval(model, [batches[2], batches[0], batches[1]], batch_size=4)
    first = retrieval_eval(model, batches, batch_size=4, num_samples=8)
    images = embed_set(model, reversed(batches), num_samples=8).images

    assert shuffled == in_order
    assert torch.equal(images, F.normalize(scores[:8], dim=-1))
    assert first["num_samples"] == 8
    assert first == retrieval_eval(model, _retrieval_batches(scores[:8], [8]), batch_size=4)


def _terminal() -> tuple[int, int]:
    """A pseudo-terminal (master, replica) 24 rows by 100 columns wide (tqdm sizes its bars to it)."""
    master, replica = os.openpty()
    fcntl.ioctl(replica, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    return master, replica


def _drawn(master: int) -> str:
    chunks = []
    while select.select([master], [], [], 0.5)[0]:
        chunks.append(os.read(master, 1 << 16))
    return b"".join(chunks).decode(errors="replace")


def test_progress_bars_are_drawn_on_a_terminal_only(tmp_path, monkeypatch, capfd):
    folders = ["kettle", "tulip", "zebra"]
    root = write_folder(tmp_path / "val", folders, [[0, 1], [0], [2]])

    def evaluate() -> None:
        zero_shot_eval(ClassNameModel(folders), root, ToTensor(), TOKENIZER, batch_size=2)
        retrieval_eval(TableTextModel(table=torch.eye(12)), _retrieval_batches(torch.eye(12), [6, 6]), batch_size=12)

    evaluate()
    assert capfd.readouterr().err == ""  # stderr to a file or pipe (a log) stays clean

    master, replica = _terminal()
    with os.fdopen(replica, "w") as terminal:
        monkeypatch.setattr(sys, "stderr", terminal)
        evaluate()
        drawn = _drawn(master)
    os.close(master)
    assert "zero-shot: " in drawn and "0/2" in drawn and "retrieval: " in drawn


def test_append_results_writes_one_json_object_per_line(tmp_path):
    path = tmp_path / "logs" / "run" / "results.jsonl"
    records = [{"epoch": 1, "imagenet-zeroshot-val-top1": 0.25}, {"epoch": 2, "clip_val_loss": 1.5}]

    for record in records:
        append_results(path, record)

    assert [json.loads(line) for line in path.read_text().splitlines()] == records


def test_smoke_real_tiny_open_clip_model(tmp_path):
    torch.manual_seed(0)
    bundle = build_model("ViT-Tiny-32px")
    for c, name in enumerate(["cat", "dog", "frog"]):
        for i in range(2):
            pixels = np.random.default_rng(3 * c + i).integers(0, 256, (40, 40, 3), dtype=np.uint8)
            (tmp_path / name).mkdir(exist_ok=True)
            Image.fromarray(pixels).save(tmp_path / name / f"{i}.png")

    cpu = torch.device("cpu")
    images = torch.randn(6, 3, 32, 32)
    texts = bundle.tokenizer([f"a photo number {i}" for i in range(6)])
    batches = [{"image": images, "text": texts, "index": torch.arange(6), "order": torch.arange(6)}]

    for precision in ("fp32", resolve_precision("amp_bf16", cpu)):  # a string, or the script's Precision
        zero_shot = zero_shot_eval(
            bundle.model, tmp_path, bundle.preprocess_val, bundle.tokenizer, cpu, batch_size=4, precision=precision
        )
        retrieval = retrieval_eval(bundle.model, batches, cpu, batch_size=6, precision=precision)

        assert 0.0 <= zero_shot["imagenet-zeroshot-val-top1"] <= zero_shot["imagenet-zeroshot-val-top5"] <= 1.0
        assert zero_shot["zeroshot-num-images"] == 6
        recalls = [retrieval[f"{d}_R@{k}"] for d in ("image_to_text", "text_to_image") for k in (1, 5, 10)]
        assert all(0.0 <= r <= 1.0 for r in recalls)
        assert math.isfinite(retrieval["clip_val_loss"])
