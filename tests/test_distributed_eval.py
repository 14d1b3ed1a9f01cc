"""Evaluation split over real gloo ranks gives the one-process results, and results.jsonl rows say what
was evaluated. A seeded tiny open_clip model (the same weights on every rank) on the Fashion-MNIST demo
shards and zero-shot folder, sized so that no number of ranks used here divides them."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import torch

from conftest import SEED_COMMANDS, scaled, tiny_run
from fastclip.data.loader import build_val_loader
from fastclip.datasets.demo import DemoData, build_demo
from fastclip.distributed import comm
from fastclip.evaluate import (
    embed_set,
    image_to_text_ranks,
    rank_metrics,
    retrieval_eval,
    text_to_image_ranks,
    zero_shot_eval,
)
from fastclip.models import build_model
from multiprocess import spawn
from training.main import main

BATCH = 8
FIRST = 20  # --val-num-samples
PAIRS = 45


@pytest.fixture(scope="module")
def small_demo(tmp_path_factory, fashion_mnist_dir) -> DemoData:
    """3 shards of 15 pairs and 45 zero-shot images: 2 ranks get 2 and 1 shards, 22 and 23 images."""
    return build_demo(tmp_path_factory.mktemp("demo"), samples_per_shard=15, limit=PAIRS, source=fashion_mnist_dir)


def evaluate_share(demo: DemoData) -> dict:
    """What this process computes as one rank of the current group (or alone): its loader's sample
    orders, the gathered embeddings and every metric."""
    torch.manual_seed(0)
    bundle = build_model("ViT-Tiny-32px")
    rank, world = comm.rank(), comm.world_size()

    def loader():
        return build_val_loader(demo.train_shards, bundle.preprocess_val, bundle.tokenizer, BATCH, rank=rank,
                                world_size=world)

    embedded = embed_set(bundle.model, loader())
    images, texts = embedded.images, embedded.texts
    return {
        "orders": torch.cat([batch["order"] for batch in loader()]),
        "image_features": images,
        "text_features": texts,
        "retrieval": retrieval_eval(bundle.model, loader(), batch_size=BATCH),
        "retrieval_first": retrieval_eval(bundle.model, loader(), batch_size=BATCH, num_samples=FIRST),
        "zero_shot": zero_shot_eval(bundle.model, demo.test_dir, bundle.preprocess_val, bundle.tokenizer,
                                    batch_size=BATCH),
    }


def save_rank_results(out: Path, demo: DemoData) -> None:
    torch.save(evaluate_share(demo), out / f"rank{comm.rank()}.pt")


def test_two_ranks_split_the_evaluation_and_both_return_the_one_process_results(small_demo, tmp_path):
    one_process = evaluate_share(small_demo)
    spawn(2, save_rank_results, tmp_path, small_demo)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]

    # the loaders' shares: uneven (2 shards and 1), disjoint, together the whole set
    assert [len(r["orders"]) for r in ranks] == [30, 15]
    assert torch.equal(torch.cat([r["orders"] for r in ranks]).sort().values, one_process["orders"].sort().values)
    assert len(one_process["orders"]) == PAIRS
    for r in ranks:
        # the same embeddings in set order on every rank, equal to one process's: each image or text is
        # embedded by the same model, only in other batches (exact on this CPU; the tolerance allows
        # kernels whose last bits depend on the batch size)
        torch.testing.assert_close(r["image_features"], one_process["image_features"], rtol=0, atol=1e-6)
        torch.testing.assert_close(r["text_features"], one_process["text_features"], rtol=0, atol=1e-6)
        assert r["zero_shot"] == one_process["zero_shot"]
        for name, first in (("retrieval", PAIRS), ("retrieval_first", FIRST)):
            expected = one_process[name]
            assert r[name].keys() == expected.keys()
            for loss in ("clip_val_loss", "global_val_loss", "global_val_loss_ref"):
                assert r[name][loss] == pytest.approx(expected[loss], rel=1e-6)
            # ranks are discrete: the captions repeat (ten classes), so a last-bit difference between the two
            # embeddings can reorder tied texts. The split itself is exact: one process ranking the rank's
            # own gathered features gives its numbers to the last bit.
            images, texts, owner = r["image_features"][:first], r["text_features"][:first], torch.arange(first)
            ranked = {**rank_metrics("image_to_text", image_to_text_ranks(images, texts, owner)),
                      **rank_metrics("text_to_image", text_to_image_ranks(texts, images, owner)),
                      "num_samples": first}
            assert {k: v for k, v in r[name].items() if "loss" not in k} == ranked
    assert ranks[0]["retrieval_first"]["num_samples"] == FIRST
    assert one_process["zero_shot"]["zeroshot-num-images"] == PAIRS
    assert all(r["retrieval"] == ranks[0]["retrieval"] for r in ranks)  # every rank: the same numbers


@pytest.mark.parametrize("world", [2, 4, 7])  # 3 shards: whole shards, or shards shared by 2 or 3 ranks
def test_validation_shares_of_ranks_are_disjoint_and_cover_the_set(small_demo, world):
    bundle = build_model("ViT-Tiny-32px")

    def orders(rank: int, world_size: int) -> list[int]:
        loader = build_val_loader(small_demo.train_shards, bundle.preprocess_val, bundle.tokenizer, BATCH,
                                  rank=rank, world_size=world_size)
        return [order for batch in loader for order in batch["order"].tolist()]

    whole = orders(0, 1)
    shares = [orders(rank, world) for rank in range(world)]

    assert len(whole) == PAIRS and whole == sorted(whole)  # one rank: the set in shard order
    assert all(shares) and sorted(o for share in shares for o in share) == whole


def test_a_limited_loader_reads_only_what_the_first_pairs_need_and_gives_the_same_features(small_demo):
    torch.manual_seed(0)
    bundle = build_model("ViT-Tiny-32px")

    def loader(limit=None):
        return build_val_loader(small_demo.train_shards, bundle.preprocess_val, bundle.tokenizer, BATCH,
                                limit=limit)

    limit = 4  # of 3 shards x 15 samples
    read = [order for batch in loader(limit) for order in batch["order"].tolist()]
    full = embed_set(bundle.model, loader(), num_samples=limit)
    limited = embed_set(bundle.model, loader(limit), num_samples=limit)

    assert read == list(range(limit))  # one worker slot: the first 4 samples of shard 0, nothing more
    for name in ("images", "texts", "captions"):
        torch.testing.assert_close(getattr(limited, name), getattr(full, name), rtol=0, atol=1e-6)
    assert torch.equal(limited.owner, full.owner)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_results_rows_name_the_run_model_checkpoint_epoch_step_and_time(small_demo, tmp_path):
    start = datetime.now(timezone.utc).replace(microsecond=0)
    run = dict(tiny_run(small_demo, tmp_path, "run", epochs=2), imagenet_val=small_demo.test_dir,
               zeroshot_frequency=1, val_data=small_demo.train_shards, save_frequency=2)
    trained = main(scaled(SEED_COMMANDS["openclip"], **run))
    checkpoint = tmp_path / "run" / "checkpoints" / "epoch_2.pt"
    evaluated = main(scaled(SEED_COMMANDS["eval-imagenet"], resume=checkpoint, imagenet_val=small_demo.test_dir,
                            model="ViT-Tiny-32px", workers=0, logs=tmp_path, name="eval"))

    rows = read_jsonl(tmp_path / "run" / "results.jsonl") + read_jsonl(tmp_path / "eval" / "results.jsonl")
    steps = -(-PAIRS // 32)
    assert [list(row)[:6] for row in rows] == [["name", "model", "checkpoint", "epoch", "step", "time"]] * 3
    assert [(row["name"], row["epoch"], row["step"]) for row in rows] == [
        ("run", 1, steps), ("run", 2, 2 * steps), ("eval", 2, 2 * steps)]
    assert [row["checkpoint"] for row in rows] == [None, str(checkpoint.resolve()), str(checkpoint.resolve())]
    assert {row["model"] for row in rows} == {"ViT-Tiny-32px"}
    for row in rows:
        assert start <= datetime.fromisoformat(row["time"]) <= datetime.now(timezone.utc) + timedelta(seconds=1)
    assert rows[1]["imagenet-zeroshot-val-top1"] == trained["imagenet-zeroshot-val-top1"]
    assert rows[1]["image_to_text_R@1"] == trained["image_to_text_R@1"]
    assert rows[2]["imagenet-zeroshot-val-top1"] == evaluated["imagenet-zeroshot-val-top1"]
