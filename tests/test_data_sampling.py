"""Shard resampling, upsampling factors and the coverage estimate on real tar shards; FastCLIP's
per-sample state when one sample appears twice in a step's global batch (1 and 2 gloo processes)."""

from __future__ import annotations

import io
import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from dense_state import dense_table, load_dense
from multiprocess import spawn
from versions import VERSIONS
from torchvision import transforms

from fastclip.data.coverage import coverage_report, expected_distinct
from fastclip.data.loader import MAX_EMPTY_PASSES, IncompatiblePosition, build_train_loader
from fastclip.data.samples import DataError
from fastclip.data.shards import draw_probabilities, drawn_shard, expand_shards, expand_sources
from fastclip.datasets.writer import img2dataset_key, shard_sample, write_shard
from fastclip.distributed import comm
from fastclip.losses.fastclip import FastCLIPConfig, FastCLIPObjective

SEED = 5
KEYS_PER_SHARD = 1000  # img2dataset key = shard id * 1000 + position: key // 1000 names the shard


def tokenize(texts: list[str]) -> torch.Tensor:
    """A real tokenizer stand-in: one token per caption, its length."""
    return torch.tensor([[len(text)] for text in texts])


PREPROCESS = transforms.ToTensor()


def write_source(directory: Path, shard_ids: range, size: int) -> str:
    """Shards of `size` generated 4x4 images with img2dataset keys; returns their brace pattern."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(shard_ids.start)
    for shard_id in shard_ids:
        keys = [img2dataset_key(shard_id, i, KEYS_PER_SHARD) for i in range(size)]
        images = rng.integers(0, 256, (size, 4, 4, 3), dtype=np.uint8)
        write_shard(directory / f"{shard_id:05d}.tar",
                    (shard_sample(key, image, f"caption {key}") for key, image in zip(keys, images)))
    return f"{directory}/{{{shard_ids.start:05d}..{shard_ids.stop - 1:05d}}}.tar"


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> tuple[str, str]:
    """Two sources of four shards of 6 samples: shards 0-3 and 10-13."""
    root = tmp_path_factory.mktemp("sources")
    return write_source(root / "a", range(0, 4), 6), write_source(root / "b", range(10, 14), 6)


def make(shards, **kw):
    kw = {"batch_size": 4, "num_samples": 96, "seed": SEED, "data_size": 20_000, "shuffle_buffer": 4,
          "dataset_resampled": True, **kw}
    return build_train_loader(shards, PREPROCESS, tokenize, **kw)


def indices(batches) -> list[int]:
    return [i for batch in batches for i in batch["index"].tolist()]


def shard_keys(url: str) -> list[int]:
    shard_id = int(Path(url).stem)
    return [shard_id * KEYS_PER_SHARD + i for i in range(6)]


# ------------------------------------------------------------------------------------------- resampling


def test_resampled_slot_reads_whole_shards_drawn_per_slot_and_draw(sources):
    """Without shuffling, rank 1's stream is the shards of draws 0, 1, ... of slot 1 back to back."""
    shards = expand_shards(sources[0])
    loader = make(sources[0], rank=1, world_size=2, shuffle_buffer=1)
    seen = indices(loader)
    uniform = np.full(len(shards), 1 / len(shards))
    draws = [shards[drawn_shard(uniform, SEED, 0, 1, d)] for d in range(40)]
    assert seen == [key for url in draws for key in shard_keys(url)][: len(seen)]
    blocks = [draws[i : i + len(shards)] for i in range(0, len(draws), len(shards))]
    assert any(len(set(block)) < len(shards) for block in blocks)  # with replacement, not permutations


def test_resampled_stream_is_reproducible_and_reseeded_per_epoch(sources):
    loader = make(sources[0], workers=2)
    first = list(loader)
    again = list(loader)
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(first, again))
    assert indices(first) == indices(again)
    loader.set_epoch(1)
    assert indices(loader) != indices(first)
    assert indices(make(sources[0], seed=SEED + 1, workers=2)) != indices(first)


def assert_same(actual: list[dict], expected: list[dict]) -> None:
    assert len(actual) == len(expected)
    for got, want in zip(actual, expected):
        assert all(torch.equal(got[key], want[key]) for key in ("image", "text", "index"))
        assert got["skipped"] == want["skipped"]


def saved(state: dict) -> dict:
    """The state as a weights_only checkpoint gives it back."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("workers,cuts", [(0, None), (2, (1, 6, 11))])
def test_resampled_stream_resumes_mid_epoch_exactly(sources, workers, cuts):
    """Cut after every batch (workers 0) or a few (workers 2): the rest equals the uninterrupted epoch."""
    def fresh():
        loader = make(f"{sources[0]}::{sources[1]}", rank=1, world_size=2, workers=workers)
        loader.set_epoch(3)
        return loader

    loader = fresh()
    full, states = [], [loader.state_dict()]
    for batch in loader:
        full.append(batch)
        states.append(loader.state_dict())
    assert states[-1]["resampled"] is True and max(slot[0] for slot in states[-1]["slots"]) >= 3  # draws
    for cut in cuts or range(len(full)):
        interrupted = fresh()
        head = list(itertools.islice(interrupted, cut))
        assert interrupted.state_dict() == states[cut]
        rest = fresh()
        rest.load_state_dict(saved(states[cut]))
        assert_same(head + list(rest), full)
        assert rest.state_dict() == states[-1]


def test_a_position_is_refused_by_the_other_sampling_mode(sources):
    resampled, passes = make(sources[0]), make(sources[0], dataset_resampled=False)
    with pytest.raises(IncompatiblePosition, match="written without --dataset-resampled, now with it"):
        resampled.load_state_dict(passes.state_dict())
    with pytest.raises(IncompatiblePosition, match="written with --dataset-resampled, now without it"):
        passes.load_state_dict(resampled.state_dict())
    assert "resampled" not in passes.state_dict()  # positions of passes are written as before


def test_resampled_stream_gets_past_a_damaged_shard_drawn_many_times_in_a_row(sources, tmp_path):
    damaged = tmp_path / "damaged.tar"
    damaged.write_bytes(b"not a tar file " * 100)
    good = expand_shards(sources[0])[0]
    factors = "1::50"
    probabilities = draw_probabilities(expand_sources(f"{good}::{damaged}"), factors)
    first_good = next(d for d in itertools.count() if drawn_shard(probabilities, SEED, 0, 0, d) == 0)
    assert first_good >= MAX_EMPTY_PASSES  # the guard of a slot finding nothing is reached first
    batches = list(make(f"{good}::{damaged}", num_samples=24, train_data_upsampling_factors=factors))
    assert set(indices(batches)) <= set(shard_keys(good)) and sum(b["skipped"] for b in batches) >= first_good
    with pytest.raises(DataError, match="drew 5 shards in a row without a usable sample, and none of the 1 "):
        list(make(str(damaged), num_samples=24))


# --------------------------------------------------------------------------------------- upsampling


def binomial_bound(draws: int, p: float) -> float:
    """Five standard deviations of a binomial count: a seeded draw outside it is a bug, not chance."""
    return 5 * math.sqrt(draws * p * (1 - p))


@pytest.mark.parametrize("shard_counts,expected", [((4, 4), 0.75), ((2, 6), 0.5)])
def test_upsampling_factors_weight_every_shard_of_a_source(tmp_path, shard_counts, expected):
    """Factors 3::1 per shard as open_clip: 3:1 draws with equal shard counts, 1:1 with 2 vs 6 shards."""
    a = write_source(tmp_path / "a", range(0, shard_counts[0]), 1)
    b = write_source(tmp_path / "b", range(10, 10 + shard_counts[1]), 1)
    probabilities = draw_probabilities(expand_sources(f"{a}::{b}"), "3::1")
    draws = [drawn_shard(probabilities, SEED, epoch, slot, d)
             for epoch in range(2) for slot in range(8) for d in range(250)]
    from_a = sum(shard < shard_counts[0] for shard in draws)
    assert abs(from_a - expected * len(draws)) <= binomial_bound(len(draws), expected)


def test_upsampling_factors_shift_the_loaders_source_mix(sources):
    seen = [key for rank in range(2) for key in indices(make(
        f"{sources[0]}::{sources[1]}", num_samples=480, rank=rank, world_size=2, train_data_upsampling_factors="3::1"))]
    draws = len(seen) / 6
    from_a = sum(key // KEYS_PER_SHARD < 10 for key in seen) / 6
    assert abs(from_a - 0.75 * draws) <= binomial_bound(round(draws), 0.75)


@pytest.mark.parametrize("kw,message", [
    (dict(dataset_resampled=False, train_data_upsampling_factors="1::2"),
     r"^--train-data-upsampling-factors needs --dataset-resampled: the factors weight shards drawn with "),
    (dict(train_data_upsampling_factors="1::2::3"),
     r"^--train-data-upsampling-factors gives 3 factors but --train-data has 2 '::'-joined sources: give one "),
    (dict(train_data_upsampling_factors="1::x"), r"^--train-data-upsampling-factors '1::x': give numbers >= 0"),
    (dict(train_data_upsampling_factors="-1::2"), r"numbers >= 0 joined by '::', at least one of them > 0$"),
    (dict(train_data_upsampling_factors="0::0"), r"at least one of them > 0$"),
    (dict(train_data_upsampling_factors="nan::1"), r"give numbers >= 0"),
])
def test_upsampling_factor_errors_are_one_line(sources, kw, message):
    with pytest.raises(ValueError, match=message) as error:
        make(f"{sources[0]}::{sources[1]}", **kw)
    assert "\n" not in str(error.value)


# ----------------------------------------------------------------------------------------- coverage


def epoch_of_all_ranks(pattern: str, world_size: int, num_samples: int, seed: int) -> list[int]:
    """The sample indices the real loaders of all ranks yield in epoch 0."""
    return [i for rank in range(world_size) for i in indices(make(
        pattern, num_samples=num_samples, batch_size=32, rank=rank, world_size=world_size, seed=seed,
        shuffle_buffer=1000, dataset_resampled=False))]


@pytest.mark.parametrize("num_shards,size", [(5, 384), (3, 384), (6, 100)])
def test_coverage_estimate_matches_the_real_loader(tmp_path, num_shards, size):
    """5 shards of 384 on 4 ranks x 1 worker, 1,920 samples an epoch: slot 0 holds 2 shards (it leaves 288
    unread), the others reread theirs; with 3 shards two slots share one."""
    pattern = write_source(tmp_path, range(num_shards), size)
    total = num_shards * size
    epochs = [epoch_of_all_ranks(pattern, 4, total, seed) for seed in range(4)]
    consumed = len(epochs[0])  # 640 for 600 samples: whole global batches
    real = np.array([len(set(epoch)) for epoch in epochs])
    estimate = expected_distinct([size] * num_shards, 4, consumed)
    assert abs(real.mean() - estimate) <= 0.02 * total and abs(real - estimate).max() <= 0.05 * total
    report = coverage_report(num_shards, 4, 1, consumed, shard_sizes=[size] * num_shards)
    assert f"{num_shards} shards over 4 ranks x 1 worker = 4 worker slots" in report
    assert f"An epoch of {consumed:,} samples will see about {estimate:,.0f} distinct samples" in report


def test_coverage_report_is_none_for_an_even_spread_and_advises_otherwise():
    assert coverage_report(8, 4, 1, 1920) is None and coverage_report(16, 2, 4, 1600) is None
    assert coverage_report(1001, 8, 1, 100_100) is None  # one slot with an extra shard loses < 1%
    uneven = coverage_report(5, 4, 1, 1920)
    assert "about 1,6" in uneven and "a multiple of 4 shards of equal sizes (e.g. 4 or 8)" in uneven
    assert "--dataset-resampled" in uneven
    assert "Better: --workers 5," in coverage_report(10, 2, 4, 1000)
    shared = coverage_report(2, 2, 2, 1152)  # all samples seen, but each slot reads a shard for half of it
    assert "slots share a shard" in shared and "(100% of 1,152" in shared and "--workers 1" in shared
    sized = coverage_report(8, 4, 1, 1920, shard_sizes=[100, 300, 200, 400, 240, 240, 240, 200])
    assert "the shards differ in size (100 to 400 samples)" in sized and "--workers" not in sized


# ------------------------------------------------------------------------------ duplicates in a batch

N, DIM = 16, 5
FIRST = [3, 7, 1, 8, 0, 5]
TWICE = [5, 2, 3, 11, 7, 5]  # sample 5 at positions 0 and 5 (on ranks 0 and 1 with K = 2)
STAND_IN = 9  # never visited: takes the place of the last copy in the comparison run


def steps(version: str, second: list[int], stand_in_copies: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Two FastCLIP steps on this rank's share of FIRST then `second`; before the second, row STAND_IN
    gets row `stand_in_copies`'s values. Returns the second step's loss and the dense state after it."""
    world, rank = comm.world_size(), comm.rank()
    settings = dict(data_size=N, gamma=0.3, gamma_decay_epochs=4, temperature=0.07, lr_tau=0.01)
    objective = FastCLIPObjective(FastCLIPConfig(**settings, **VERSIONS[version]), "cpu", torch.float64)
    gen = torch.Generator().manual_seed(0)
    b = len(FIRST) // world
    mine = slice(rank * b, (rank + 1) * b)
    for epoch, index in enumerate((FIRST, second)):
        if epoch == 1 and stand_in_copies is not None:
            table = dense_table(objective.state)
            table[STAND_IN] = table[stand_in_copies]
            load_dense(objective.state, table)
        image, text = (torch.nn.functional.normalize(torch.randn(len(index), DIM, generator=gen, dtype=torch.float64),
                                                     dim=-1) for _ in range(2))
        objective.on_epoch_start(epoch)
        losses = objective(image[mine], text[mine], torch.tensor(1 / 0.07, dtype=torch.float64),
                           torch.tensor(index)[mine])
    loss = comm.all_reduce_sum(sum(losses.values()).detach().reshape(1))
    return loss, dense_table(objective.state)


def check_duplicates(out: Path | None) -> None:
    """On every rank: the duplicated row holds the last copy's update, all else as without duplicates."""
    results = {}
    for version in VERSIONS:
        loss, state = steps(version, TWICE, None)
        again = steps(version, TWICE, None)
        assert torch.equal(loss, again[0]) and torch.equal(state, again[1])  # deterministic
        last_loss, last = steps(version, TWICE[:-1] + [STAND_IN], 5)  # the last copy as a sample of its own
        first_loss, first = steps(version, [STAND_IN] + TWICE[1:], 5)  # the first copy as one
        assert torch.equal(loss, last_loss)  # copies enter the loss as distinct pairs
        assert torch.equal(state[5], last[STAND_IN]) and not torch.equal(state[5], first[STAND_IN])
        others = [i for i in range(N) if i not in (5, STAND_IN)]
        assert torch.equal(state[others], last[others])
        results[version] = state
    if out is not None and comm.rank() == 0:
        torch.save(results, out)


def test_a_sample_twice_in_a_global_batch_keeps_its_last_copys_update_on_1_and_2_ranks(tmp_path):
    """State rows are written by their owner from the gathered batch, where the last position of a
    repeated index wins (ShardedState.store): the same on every rank and for any K."""
    check_duplicates(None)
    spawn(2, check_duplicates, tmp_path / "two.pt")
    two = torch.load(tmp_path / "two.pt")
    for version in VERSIONS:
        one = steps(version, TWICE, None)[1]
        assert torch.allclose(two[version], one, rtol=1e-12, atol=0, equal_nan=True), version
