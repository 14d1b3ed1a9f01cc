"""How many distinct samples an epoch of the training stream sees when the shards do not spread evenly
over the worker slots, and the warning that says so with what to change.

Every pass gives shard j of the shuffled list to global worker slot j % S (`shards.slot_assignment`)
and every slot yields the same number of samples per epoch. With a shard count that is not a multiple
of S (or shards of different sizes) the slots' shares differ: a slot with a small share finishes its
pass and starts the next one, rereading samples already seen, while a slot with a large share leaves
part of it unread until the epoch ends. With fewer shards than slots, the slots that share a shard
each read all of it to keep their part.

The estimate follows that rule: for seeded random shard orders, each slot reads its shares pass after
pass until it has its samples of the epoch, a slot that reads a fraction f of a share sees each of its
samples with probability f, and a sample is unseen if no pass saw it. Assumes every slot yields
samples_per_epoch / S samples, no skipped samples, and equal shard sizes unless told the sizes.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

MIN_LOSS = 0.01  # a spread whose expected loss of distinct samples is below this fraction of the data is even
MAX_TRIAL_CELLS = 2_000_000  # trials x shards simulated at once: bounds the estimate's memory and time
MAX_TRIALS = 64


def _pairs(num_shards: int, num_slots: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(position in the shard order, slot, portion of that shard) of everything a pass reads."""
    if num_shards >= num_slots:
        positions = np.arange(num_shards)
        return positions, positions % num_slots, np.ones(num_shards)
    slots = np.arange(num_slots)
    positions = slots % num_shards
    parts = np.bincount(positions, minlength=num_shards)
    return positions, slots, 1.0 / parts[positions]


def expected_distinct(shard_sizes: Sequence[float], num_slots: int, samples_per_epoch: int, seed: int = 0) -> float:
    """Expected number of distinct samples that all slots together see in an epoch without resampling."""
    sizes = np.asarray(shard_sizes, dtype=float)
    if sizes.size == 0 or sizes.sum() <= 0 or num_slots < 1:
        raise ValueError(f"need shards holding samples and num_slots >= 1; got {sizes.size} shards holding "
                         f"{sizes.sum():g} samples, {num_slots=}")
    n = sizes.size
    trials = max(1, min(MAX_TRIALS, MAX_TRIAL_CELLS // n))
    rng = np.random.default_rng(seed)
    positions, slots, portions = _pairs(n, num_slots)
    rows = np.arange(trials)[:, None]
    remaining = np.full((trials, num_slots), samples_per_epoch / num_slots)
    unseen = np.ones((trials, n))  # per trial and shard: the probability that a sample of it is unseen
    while remaining.max() > 0:
        order = np.argsort(rng.random((trials, n)), axis=1)  # the pass's shard order: shard at each position
        share = _grouped_sums(sizes[order][:, positions] * portions, slots, num_slots)
        read = np.minimum(remaining, share)
        remaining -= read
        fraction = np.divide(read, share, out=np.zeros_like(read), where=share > 0)
        missed = _grouped_sums((1 - fraction[:, slots]) * portions, positions, n)  # per position in the order
        unseen[rows, order] *= missed
    return float(((1 - unseen) @ sizes).mean())


def _grouped_sums(values: np.ndarray, groups: np.ndarray, size: int) -> np.ndarray:
    """Row-wise sums of `values` (trials, m) by group (m,) -> (trials, size)."""
    trials = values.shape[0]
    index = (np.arange(trials)[:, None] * size + groups).ravel()
    return np.bincount(index, weights=values.ravel(), minlength=trials * size).reshape(trials, size)


def resampled_distinct_fraction(num_shards: int, draws: float) -> float:
    """Expected fraction of equal, equally weighted shards drawn at least once in `draws` draws."""
    return 1 - (1 - 1 / num_shards) ** draws


def _plural(count: int, word: str) -> str:
    return f"{count} {word}" if count == 1 else f"{count} {word}s"


def _worker_counts(num_shards: int, world_size: int, workers: int) -> list[int]:
    """Other worker counts per rank that give every slot the same number of shards, nearest first."""
    even = [w for w in range(1, num_shards // world_size + 1)
            if num_shards % (world_size * w) == 0 and w != max(workers, 1)]
    return sorted(even, key=lambda w: (abs(w - workers), w))


def _cause(num_shards: int, world_size: int, workers: int, sizes: np.ndarray) -> str:
    slots = world_size * max(workers, 1)
    where = (f"{_plural(num_shards, 'shard')} over {_plural(world_size, 'rank')} x "
             f"{_plural(max(workers, 1), 'worker')} = {slots} worker slots")
    if num_shards < slots:
        return (f"{where}: slots share a shard, each reading all of it to keep its part (up to "
                f"{math.ceil(slots / num_shards)} times the reading)")
    if num_shards % slots:
        few = num_shards // slots
        return (f"{where}: per pass, {few + 1} shards go to {num_shards % slots} of the slots and {few} to each "
                "other one; as every slot yields the same number of samples, the slots with fewer shards reread "
                "samples (their next pass) while the others leave samples unread")
    return (f"{where}, but the shards differ in size ({sizes.min():,.0f} to {sizes.max():,.0f} samples): the "
            "slots' shares differ, so some reread samples while others leave samples unread")


def _advice(num_shards: int, world_size: int, workers: int, samples_per_epoch: int, sizes: np.ndarray) -> str:
    slots = world_size * max(workers, 1)
    equal = sizes.min() == sizes.max()
    options = [f"--workers {w}" for w in _worker_counts(num_shards, world_size, workers)[:1] if equal]
    multiples = sorted({slots * max(1, num_shards // slots), slots * math.ceil(num_shards / slots)})
    options.append(f"a multiple of {slots} shards of equal sizes (e.g. {' or '.join(map(str, multiples))})")
    resampled = resampled_distinct_fraction(num_shards, samples_per_epoch / sizes.mean())
    options.append(f"--dataset-resampled (shards drawn with replacement need no even spread, but then an epoch "
                   f"sees about {resampled:.0%} of the data distinct)")
    return ", or ".join(options)


def coverage_report(
    num_shards: int,
    world_size: int,
    workers: int,
    samples_per_epoch: int,
    shard_sizes: Sequence[int] | None = None,
) -> str | None:
    """A one-paragraph warning when the shards do not spread evenly over ranks x workers slots, with the
    expected number of distinct samples per epoch and what to change; None when the spread is even.

    `samples_per_epoch`: what all ranks consume per epoch (`TrainLoader.num_samples`); without
    `shard_sizes`, the shards are assumed to hold that many samples together, in equal parts. Meant
    for the stream without --dataset-resampled: shard draws need no spread.
    """
    if shard_sizes is not None and len(shard_sizes) != num_shards:
        raise ValueError(f"{len(shard_sizes)} shard sizes for {num_shards} shards")
    sizes = np.asarray(shard_sizes if shard_sizes is not None else [samples_per_epoch / num_shards] * num_shards,
                       dtype=float)
    slots = world_size * max(workers, 1)
    total = sizes.sum()
    best = min(samples_per_epoch, total)
    distinct = expected_distinct(sizes, slots, samples_per_epoch)
    if num_shards >= slots and best - distinct < MIN_LOSS * total:
        return None
    return (f"{_cause(num_shards, world_size, workers, sizes)}. An epoch of {samples_per_epoch:,} samples will see "
            f"about {distinct:,.0f} distinct samples ({distinct / total:.0%} of {total:,.0f}; evenly spread: "
            f"{best / total:.0%}). Better: {_advice(num_shards, world_size, workers, samples_per_epoch, sizes)}.")
