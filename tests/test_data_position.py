"""Exact mid-epoch resume of the training loaders on real shards; history-free augmentations; worker signals."""

from __future__ import annotations

import io
import itertools
import logging
import multiprocessing
import os
import random
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from torchvision import transforms

from fastclip.data import loader as data_loader
from fastclip.data import samples
from fastclip.data.loader import IncompatiblePosition, build_train_loader
from fastclip.data.shards import expand_shards
from fastclip.datasets.synthetic import build_synthetic_loader
from fastclip.models import register_model_configs

IMAGE_SIZE = 32
BATCH = 16
SEED = 3
EPOCH = 1


class Jitter:
    """Brightness and contrast noise drawn from python's and numpy's global RNGs (torchvision uses torch's)."""

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return (image * random.uniform(0.8, 1.2) + float(np.random.uniform(-0.1, 0.1))).clamp(0, 1)


class Counting:
    """A real callable that counts its calls."""

    def __init__(self, function):
        self.function, self.calls = function, 0

    def __call__(self, *args):
        self.calls += 1
        return self.function(*args)


def augment() -> transforms.Compose:
    return transforms.Compose([transforms.RandomResizedCrop(IMAGE_SIZE, scale=(0.3, 1.0)),
                               transforms.RandomHorizontalFlip(), transforms.ToTensor(), Jitter()])


@pytest.fixture(scope="module")
def tokenizer():
    register_model_configs()
    return open_clip.get_tokenizer("ViT-Tiny-32px")


@pytest.fixture(scope="module")
def two_shards(demo_data) -> list[str]:
    """Two shards of 300 Fashion-MNIST pairs: an epoch of 640 samples spans two passes of every slot."""
    return expand_shards(demo_data.train_shards)[:2]


def make_loader(shards, tokenizer, data_size, *, workers=0, world_size=1, rank=0, num_samples=640,
                preprocess=None, batch_size=BATCH, shuffle_buffer=64):
    loader = build_train_loader(shards, preprocess or augment(), tokenizer, batch_size=batch_size,
                                num_samples=num_samples, seed=SEED, rank=rank, world_size=world_size,
                                workers=workers, data_size=data_size, shuffle_buffer=shuffle_buffer)
    loader.set_epoch(EPOCH)
    return loader


def saved(state: dict) -> dict:
    """The state as a weights_only checkpoint gives it back."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def recorded(loader) -> tuple[list[dict], list[dict]]:
    """The batches of an epoch and the state before the first and after each of them."""
    batches, states = [], [loader.state_dict()]
    for batch in loader:
        batches.append(batch)
        states.append(loader.state_dict())
    return batches, states


def resumed(make, state: dict):
    loader = make()  # a fresh loader, as after a restart
    loader.set_epoch(state["epoch"])
    loader.load_state_dict(saved(state))
    return loader


def assert_same(actual: list[dict], expected: list[dict]) -> None:
    assert len(actual) == len(expected)
    for got, want in zip(actual, expected):
        assert got.keys() == want.keys() == {"image", "text", "index", "skipped"}
        for key in ("image", "text", "index"):
            assert torch.equal(got[key], want[key]), key
        assert got["skipped"] == want["skipped"]


def first_pass_change(states: list[dict]) -> int:
    """The first batch after which some slot of the rank is in pass 1."""
    return next(i for i, state in enumerate(states) if any(slot[0] > 0 for slot in state["slots"])) - 1


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("world_size,rank", [(1, 0), (2, 0), (2, 1)])
def test_resume_continues_the_epoch_exactly(two_shards, tokenizer, demo_data, workers, world_size, rank):
    def make():
        return make_loader(two_shards, tokenizer, demo_data.data_size, workers=workers, world_size=world_size,
                           rank=rank)

    loader = make()
    full, states = recorded(loader)
    loader.set_epoch(EPOCH + 1)
    following = list(loader)
    crossing = first_pass_change(states)  # a position at the end of pass 0, then one inside pass 1
    for cut in sorted({0, crossing, crossing + 1, len(full) - 1}):
        interrupted = make()
        head = list(itertools.islice(interrupted, cut))
        state = interrupted.state_dict()
        assert state == states[cut]
        rest = resumed(make, state)
        assert_same(head + list(rest), full)
        assert rest.state_dict() == states[-1]
        if cut == crossing + 1:
            rest.set_epoch(EPOCH + 1)
            assert_same(list(rest), following)


def test_state_is_plain_and_describes_the_epoch_start_after_set_epoch(two_shards, tokenizer, demo_data):
    loader = make_loader(two_shards, tokenizer, demo_data.data_size, workers=2, world_size=2, rank=1)
    loader.set_epoch(4)
    assert loader.state_dict() == {"epoch": 4, "batches": 0, "rank": 1, "world_size": 2, "workers": 2,
                                   "batch_size": BATCH, "seed": SEED, "slots": [[0, 0, 0], [0, 0, 0]]}
    batches = list(itertools.islice(loader, 3))
    state = saved(loader.state_dict())
    assert len(batches) == 3 and state["batches"] == 3
    assert [slot[2] for slot in state["slots"]] == [2, 1]  # round robin: batches 0, 2 from worker 0
    loader.set_epoch(5)
    assert loader.state_dict()["batches"] == 0


def test_one_worker_continues_a_position_without_workers(two_shards, tokenizer, demo_data):
    """Both mean one slot per rank, and augmentations are seeded per batch, not per worker."""
    without = make_loader(two_shards, tokenizer, demo_data.data_size, num_samples=160)
    full, states = recorded(without)
    one = resumed(lambda: make_loader(two_shards, tokenizer, demo_data.data_size, workers=1, num_samples=160),
                  states[4])
    assert_same(full[:4] + list(one), full)


def test_data_loading_leaves_the_global_rngs_alone(two_shards, tokenizer, demo_data):
    loader = make_loader(two_shards, tokenizer, demo_data.data_size, num_samples=96)
    runs = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed)
        before = torch.get_rng_state(), random.getstate(), np.random.get_state()
        runs.append(list(loader))
        after = torch.get_rng_state(), random.getstate(), np.random.get_state()
        assert torch.equal(before[0], after[0]) and before[1] == after[1]
        assert all(np.array_equal(b, a) for b, a in zip(before[2], after[2]))
    assert_same(runs[0], runs[1])  # augmentations do not depend on the global RNGs either


@pytest.fixture
def damaged_pair(two_shards, tmp_path) -> list[str]:
    """A good shard and a copy of another cut in half."""
    good, damaged = tmp_path / "good.tar", tmp_path / "damaged.tar"
    shutil.copy(two_shards[0], good)
    data = Path(two_shards[1]).read_bytes()
    damaged.write_bytes(data[: len(data) // 2])
    return [str(good), str(damaged)]


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_after_a_damaged_shard_does_not_count_it_again(damaged_pair, tokenizer, demo_data, workers,
                                                              caplog):
    """2 ranks x 2 workers share 2 shards; without workers, one rank reads both."""
    def make():
        return make_loader(damaged_pair, tokenizer, demo_data.data_size, workers=workers,
                           world_size=2 if workers else 1, num_samples=640, shuffle_buffer=32)

    full, states = recorded(make())
    counted = next(i for i, batch in enumerate(full) if batch["skipped"])  # the damage first counts here
    for cut in (counted, counted + 1):  # resumed before it (the rest counts it) and after it (must not)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger=samples.__name__):
            rest = list(resumed(make, states[cut]))
        assert_same(full[:cut] + rest, full)
        if workers == 0:  # worker processes log elsewhere
            assert len([r for r in caplog.records if "damaged.tar" in r.getMessage()]) == sum(
                batch["skipped"] for batch in rest)


def test_incompatible_positions_say_why(two_shards, tokenizer, demo_data):
    def make(**kw):
        return make_loader(two_shards, tokenizer, demo_data.data_size, **{"world_size": 2, "workers": 2, **kw})

    state = make().state_dict()
    state["epoch"] = 3
    cases = [
        (make(world_size=1), "written with 2 ranks x 2 workers, now 1 x 2: the rest of epoch 3"),
        (make(workers=4), "written with 2 ranks x 2 workers, now 2 x 4"),
        (make(workers=0), "written with 2 ranks x 2 workers, now 2 x 0"),
        (make(batch_size=8), "written with batch size 16, now 8"),
        (make(rank=1), "written by rank 0, loaded by rank 1"),
    ]
    for loader, message in cases:
        with pytest.raises(IncompatiblePosition, match=message):
            loader.load_state_dict(state)
    assert issubclass(IncompatiblePosition, ValueError)


def test_fast_forward_neither_decodes_nor_augments_the_skipped_samples(two_shards, tokenizer, demo_data,
                                                                       monkeypatch):
    preprocess = Counting(augment())
    decode = Counting(data_loader.decode_sample)
    monkeypatch.setattr(data_loader, "decode_sample", decode)

    def make():
        return make_loader(two_shards, tokenizer, demo_data.data_size, num_samples=320, preprocess=preprocess)

    full, states = recorded(make())
    cut = len(full) // 2
    preprocess.calls = decode.calls = 0
    rest = list(resumed(make, states[cut]))
    assert_same(full[:cut] + rest, full)
    assert preprocess.calls == decode.calls == (len(full) - cut) * BATCH


@pytest.mark.parametrize("workers", [0, 2])
def test_synthetic_loader_resumes_exactly(tokenizer, workers):
    def make():
        loader = build_synthetic_loader(100, augment(), tokenizer, batch_size=BATCH, seed=SEED, rank=1,
                                        world_size=2, workers=workers)
        loader.set_epoch(EPOCH)
        return loader

    full, states = recorded(make())
    assert any(slot[0] > 0 for slot in states[-1]["slots"])  # the epoch spans two passes
    for cut in range(len(full)):
        assert_same(full[:cut] + list(resumed(make, states[cut])), full)


def test_workers_ignore_the_signals_the_main_process_handles(two_shards, tokenizer, demo_data):
    loader = make_loader(two_shards, tokenizer, demo_data.data_size, workers=2, num_samples=480)
    already = set(multiprocessing.active_children())
    batches = iter(loader)
    received = [next(batches), next(batches)]  # one from each worker: both have started
    workers = set(multiprocessing.active_children()) - already
    assert len(workers) == 2
    for worker in workers:
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
            os.kill(worker.pid, signum)
    time.sleep(0.5)
    assert all(worker.is_alive() for worker in workers)
    received += list(batches)
    assert len(received) == len(loader) == 30
