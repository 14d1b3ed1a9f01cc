"""Sample streams -> training and validation batches {'image', 'text', 'index', 'skipped'}, the same
number on every rank, with exact mid-epoch resume.

Training stream. Rank r of K with W DataLoader workers has the global worker slots r*W + w of S = K*W.
A `SlotDataset` turns the sample stream of a slot into batches; `ShardTrainDataset`'s stream is the
slot's share of the shards (`shards.py`) of pass 0, 1, 2, ..., each pass through a shuffle buffer
seeded from (seed, epoch, slot, pass) that is flushed at the end of the pass; `CsvTrainDataset`'s is
the slot's every S-th row of a permutation of a CSV's rows (`csv.py`) seeded from (seed, epoch, pass).
A resampled `ShardTrainDataset` (open_clip's --dataset-resampled) has no passes: its stream is draw 0,
1, 2, ... of the slot, each one whole shard drawn with replacement (seeded from (seed, epoch, slot,
draw), weighted by the upsampling factors: `shards.py`) through a shuffle buffer seeded from (seed,
epoch, slot, draw) and flushed at the end of the shard; a sample drawn twice is expected, and in the
per-sample state the last copy of a step's global batch wins (`state.py`).
A slot's stream is infinite and every rank stops after ceil(num_samples / (batch_size * K)) batches
(open_clip's convention), so all ranks run the same number of steps even when their shards hold
different numbers of samples. Batch i of a rank comes from its local slot i % W (DataLoader round robin).

Position and resume. Augmentations do not depend on history: batch j of slot s in an epoch is
collated with the torch, python and numpy global RNGs seeded from (seed, epoch, s, j) and restored
afterwards (with W = 0 the main process's RNG, hence the model's, is left as it was), so its tensors
depend only on its samples and (seed, epoch, s, j). A slot's position after a batch is (pass, items
taken from the pass's shuffled raw-sample stream, undecodable ones included, batches the slot produced
this epoch); in a resampled stream, (draw, items taken from the draw's shuffled shard, batches).
Batches leave the worker with their slot and position, which `TrainLoader` strips, recording per slot
the position of the last batch it yielded. `state_dict()` is the rank's position (plain ints); after
`load_state_dict()` the next iteration of that epoch yields the remaining batches exactly: each slot
regenerates its pass's shard order, slot assignment and seeded shuffle buffer (a resampled slot its
draw's shard and shuffle buffer: it reads one shard again), reads the raw tar samples and drops the
first `taken` items of the shuffled stream undecoded (skips met on the way were counted before the
checkpoint: they are neither logged nor counted again), and the DataLoader's round robin is rotated so
that worker w serves local slot (batches + w) % W. Loading needs the same rank, number of ranks, worker
slots per rank (workers 0 and 1 both mean one), batch size, seed and resampling mode, or raises
`IncompatiblePosition`; a loaded position applies to its epoch only, the next starts from scratch.

Validation stream: every sample once over all ranks, unshuffled, split over the global worker slots
as one unshuffled training pass would be. Each sample carries its 'order' in the set (shard
number in the given list, then position in the shard), so that evaluation can gather the ranks'
embeddings back into one order that does not depend on the number of ranks or workers.
"""

from __future__ import annotations

import copy
import itertools
import signal
import traceback
from typing import Any, Iterable, Iterator, NamedTuple, Sequence, TypeVar

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .samples import (
    AUGMENT_STREAM,
    LOADER_STREAM,
    SAMPLE_STREAM,
    DataError,
    Preprocess,
    Sample,
    SkipLog,
    Tokenizer,
    collate,
    decode_sample,
    derive_rng,
    seeded_rngs,
)
from ..rules import check_upsampling
from ..train.progress import batches_per_epoch
from .csv import CsvTable
from .shards import (
    draw_probabilities,
    drawn_shard,
    expand_shards,
    expand_sources,
    read_shard,
    shard_order,
    slot_assignment,
)
from .workers import worker_arguments

MAX_EMPTY_PASSES = 5
VAL_ORDER_STRIDE = 2**32  # a validation sample's order: shard number * stride + position in the shard
# Left to the main process, which finishes the step, agrees with the other ranks, saves and exits.
WORKER_IGNORED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)

T = TypeVar("T")


class IncompatiblePosition(ValueError):
    """A saved data position this loader cannot continue exactly (other ranks, workers, batch size, seed)."""


class SlotPosition(NamedTuple):
    """A slot's stream after a batch: `taken` items of pass `pass_index`'s shuffled raw-sample stream
    (undecodable ones included) are used up, and the slot has produced `batches` batches this epoch.
    In a resampled stream `pass_index` is the slot's shard draw and `taken` counts items of that shard."""

    pass_index: int = 0
    taken: int = 0
    batches: int = 0


def ignore_signals(worker_id: int) -> None:
    """DataLoader `worker_init_fn`: a Ctrl-C or slurm's signal must not kill a worker (the main process,
    which handles it, would crash on its next batch); torch's worker seeding has already run."""
    for signum in WORKER_IGNORED_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


# ------------------------------------------------------------------------------------------ streams


def shuffled(items: Iterable[T], rng: np.random.Generator, size: int) -> Iterator[T]:
    """A shuffle buffer of `size` items (1: no shuffling), emptied at the end so that passes never mix."""
    size = max(size, 1)
    buffer: list[T] = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        pick = int(rng.integers(size))
        yield buffer[pick]
        buffer[pick] = item
    for i in rng.permutation(len(buffer)):
        yield buffer[i]


def chunks(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """Consecutive lists of `size` items, the last one possibly shorter."""
    iterator = iter(items)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


def fast_forward(items: Iterator[T], count: int, skips: SkipLog, where: str) -> int:
    """Drops the first `count` items unused; skips met on the way were counted before the checkpoint."""
    with skips.muted():
        dropped = sum(1 for _ in itertools.islice(items, count))
    if dropped < count:
        raise DataError(f"{where} has {dropped} samples but the resumed position is after {count}: the shards "
                        "changed since the checkpoint, so it cannot be continued")
    return count


# ------------------------------------------------------------------------------------------- datasets


class SlotDataset(IterableDataset):
    """Training batches built inside a DataLoader worker from the sample stream of its global slot.

    Subclasses define `pass_samples`, one pass over a slot's share (or one draw, if `resampled`);
    `stream` chains them. `epoch` is read when a loader starts its workers, so setting it between
    epochs is enough. Batches carry their 'slot' and 'position' (the slot's `SlotPosition` after them)
    for `TrainLoader`, which strips them; `starting_at` gives the copy that continues from positions.
    """

    resampled = False  # True: a stream of shard draws, whose positions count draws (`SlotPosition`)

    def __init__(
        self, preprocess: Preprocess, tokenizer: Tokenizer, batch_size: int,
        seed: int = 0, epoch: int = 0, rank: int = 0, world_size: int = 1,
    ) -> None:
        super().__init__()
        if batch_size < 1 or seed < 0 or epoch < 0 or not 0 <= rank < world_size:
            raise ValueError(f"need batch_size >= 1, seed >= 0, epoch >= 0 and 0 <= rank < world_size; got "
                             f"{batch_size=}, {seed=}, {epoch=}, {rank=}, {world_size=}")
        self.preprocess, self.tokenizer, self.batch_size = preprocess, tokenizer, batch_size
        self.seed, self.epoch, self.rank, self.world_size = seed, epoch, rank, world_size
        self.start: tuple[SlotPosition, ...] = ()  # per local slot; empty: the start of the epoch
        self.rotation = 0  # DataLoader worker w serves local slot (w + rotation) % workers

    def pass_samples(self, slot: int, num_slots: int, pass_index: int, offset: int,
                     skips: SkipLog) -> Iterator[Sample | None]:
        """The items of a slot's share of one pass after the first `offset` (skipped unread where the
        source allows), decoded: None for an unusable one."""
        raise NotImplementedError

    def nothing_usable(self, slot: int, num_slots: int, passes: int) -> str:
        """The error when a slot's share yields no usable sample pass after pass (instead of waiting forever)."""
        return f"worker slot {slot} of {num_slots} found no usable sample in {passes} passes"

    def hopeless(self) -> bool:
        """Whether `MAX_EMPTY_PASSES` passes in a row without a usable sample mean there will be none."""
        return True

    def stream(self, slot: int, num_slots: int, skips: SkipLog,
               start: SlotPosition) -> Iterator[tuple[int, int, Sample]]:
        """(pass, items taken from the pass so far, sample) of a slot, continuing after `start`."""
        empty_passes = 0
        for pass_index in itertools.count(start.pass_index):
            offset = start.taken if pass_index == start.pass_index else 0
            used = offset > 0  # a position inside a pass follows a batch whose last sample came from that pass
            for taken, sample in enumerate(self.pass_samples(slot, num_slots, pass_index, offset, skips), offset + 1):
                if sample is not None:
                    used = True
                    yield pass_index, taken, sample
            empty_passes = 0 if used else empty_passes + 1
            if empty_passes >= MAX_EMPTY_PASSES and self.hopeless():
                raise DataError(self.nothing_usable(slot, num_slots, empty_passes))

    def starting_at(self, start: Sequence[SlotPosition], rotation: int) -> SlotDataset:
        """A copy whose local slots continue from `start`, worker w serving local slot (w + rotation) % W."""
        dataset = copy.copy(self)
        dataset.start, dataset.rotation = tuple(start), rotation
        return dataset

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        local = (worker + self.rotation) % workers
        slot = self.rank * workers + local
        start = self.start[local] if self.start else SlotPosition()
        skips = SkipLog()
        batch: list[Sample] = []
        batches = start.batches
        for pass_index, taken, sample in self.stream(slot, self.world_size * workers, skips, start):
            batch.append(sample)
            if len(batch) < self.batch_size:
                continue
            with seeded_rngs(self.seed, self.epoch, AUGMENT_STREAM, slot, batches):
                collated = collate(batch, self.preprocess, self.tokenizer, skips.take())
            batches += 1
            yield {**collated, "slot": slot, "position": [pass_index, taken, batches]}
            batch = []


class ShardTrainDataset(SlotDataset):
    """The infinite, reshuffled training stream of the module docstring; resampled when given
    `draw_probabilities` (one per shard, `shards.draw_probabilities`)."""

    def __init__(self, shards: Sequence[str], *args: Any, data_size: int | None = None,
                 shuffle_buffer: int = 1000, draw_probabilities: np.ndarray | None = None,
                 captions_per_line: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.shards, self.data_size, self.shuffle_buffer = list(shards), data_size, shuffle_buffer
        self.captions_per_line = captions_per_line
        self.probabilities = draw_probabilities
        self.resampled = draw_probabilities is not None
        self._found_usable = False  # a resampled slot's proof that some drawable shard has a usable sample

    def _share(self, slot: int, num_slots: int, pass_index: int) -> list[tuple[str, int, int]]:
        """(shard, part, parts) a slot reads in a pass: its part of the pass's shard order, or when
        resampled the one shard of draw `pass_index`."""
        if self.resampled:
            drawn = drawn_shard(self.probabilities, self.seed, self.epoch, slot, pass_index)
            return [(self.shards[drawn], 0, 1)]
        return slot_assignment(shard_order(self.shards, self.seed, self.epoch, pass_index), slot, num_slots)

    def _raw_pass(self, slot: int, num_slots: int, pass_index: int, skips: SkipLog) -> Iterator[dict[str, Any]]:
        """A slot's raw (undecoded) samples of one pass (or draw), through its seeded shuffle buffer."""
        raw = (sample
               for url, part, parts in self._share(slot, num_slots, pass_index)
               for position, sample in enumerate(read_shard(url, skips)) if position % parts == part)
        rng = derive_rng(self.seed, self.epoch, SAMPLE_STREAM, pass_index, slot)
        return shuffled(raw, rng, self.shuffle_buffer)

    def pass_samples(self, slot: int, num_slots: int, pass_index: int, offset: int,
                     skips: SkipLog) -> Iterator[Sample | None]:
        items = self._raw_pass(slot, num_slots, pass_index, skips)
        unit = "draw" if self.resampled else "pass"
        fast_forward(items, offset, skips, f"{unit} {pass_index} of worker slot {slot}")
        return (decode_sample(item, self.data_size, skips, self.captions_per_line) for item in items)

    def hopeless(self) -> bool:
        """A resampled slot can draw a damaged shard many times in a row by chance: it gives up only when
        no shard it can draw holds a usable sample (read up to the first one, once per worker)."""
        if not self.resampled:
            return True
        if not self._found_usable:
            self._found_usable = self._any_usable_sample()
        return not self._found_usable

    def _any_usable_sample(self) -> bool:
        skips = SkipLog()
        with skips.muted():  # the draws log and count their skips themselves
            return any(decode_sample(raw, self.data_size, skips, self.captions_per_line) is not None
                       for url, probability in zip(self.shards, self.probabilities) if probability > 0
                       for raw in read_shard(url, skips))

    def nothing_usable(self, slot: int, num_slots: int, passes: int) -> str:
        if self.resampled:
            return (f"worker slot {slot} of {num_slots} drew {passes} shards in a row without a usable sample, and "
                    f"none of the {np.count_nonzero(self.probabilities)} shards it draws from holds one: fix the "
                    "shards (see the skip warnings)")
        return (f"worker slot {slot} of {num_slots} found no usable sample in {passes} passes over its share of "
                f"{len(self.shards)} shards: fix the shards (see the skip warnings) or use fewer ranks x workers "
                "than there are samples per shard")


class ShardValDataset(IterableDataset):
    """Every sample once over all ranks and workers: the worker slots split the shards (and a shard's
    samples when there are fewer shards than slots) as in training; batches carry each sample's 'order'.
    With `limit`, a worker slot yields at most `limit` samples, none past the first `limit` of a shard nor
    from a shard past the first `limit`: all that the first `limit` pairs of the set can come from (unless
    samples among them fail to decode), at most `limit` per slot."""

    def __init__(self, shards: Sequence[str], preprocess: Preprocess, tokenizer: Tokenizer, batch_size: int,
                 data_size: int | None = None, rank: int = 0, world_size: int = 1, limit: int | None = None,
                 captions_per_line: bool = False) -> None:
        super().__init__()
        self.shards, self.preprocess, self.tokenizer = list(shards)[:limit], preprocess, tokenizer
        self.captions_per_line = captions_per_line
        self.batch_size, self.data_size, self.rank, self.world_size = batch_size, data_size, rank, world_size
        self.limit = limit

    def _samples(self, slot: int, num_slots: int, skips: SkipLog) -> Iterator[tuple[int, Sample]]:
        """(order, sample) of a slot's share; order = shard number * VAL_ORDER_STRIDE + position in it."""
        number = {url: j for j, url in enumerate(self.shards)}
        for url, part, parts in slot_assignment(self.shards, slot, num_slots):
            for position, raw in enumerate(itertools.islice(read_shard(url, skips), self.limit)):
                sample = (decode_sample(raw, self.data_size, skips, self.captions_per_line)
                          if position % parts == part else None)
                if sample is not None:
                    yield number[url] * VAL_ORDER_STRIDE + position, sample

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        skips = SkipLog()
        samples = self._samples(self.rank * workers + worker, self.world_size * workers, skips)
        for batch in chunks(itertools.islice(samples, self.limit), self.batch_size):
            orders, chunk = zip(*batch)
            yield {**collate(chunk, self.preprocess, self.tokenizer, skips.take(), draw_captions=False),
                   "order": torch.tensor(orders, dtype=torch.int64)}


class CsvTrainDataset(SlotDataset):
    """Each pass permutes the rows of a `CsvTable` (seeded by seed, epoch, pass) and slot s of S takes
    every S-th row of the permutation, so a pass never repeats a row.

    A position's `taken` counts the rows of the slot's share of the pass; resuming skips them without
    opening their images. The permutation is one int64 per row and slot: CSV data sets fit in memory.
    """

    def __init__(self, table: CsvTable, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.table = table

    def pass_samples(self, slot: int, num_slots: int, pass_index: int, offset: int,
                     skips: SkipLog) -> Iterator[Sample | None]:
        order = derive_rng(self.seed, self.epoch, SAMPLE_STREAM, pass_index).permutation(len(self.table))
        share = order[slot::num_slots]
        if offset > len(share):
            raise DataError(f"CSV {self.table.path}: pass {pass_index} of worker slot {slot} has {len(share)} "
                            f"rows but the resumed position is after {offset}: the CSV changed since the "
                            "checkpoint, so it cannot be continued")
        return (self.table.sample(int(row), skips) for row in share[offset:])

    def nothing_usable(self, slot: int, num_slots: int, passes: int) -> str:
        return (f"worker slot {slot} of {num_slots} found no usable row of CSV {self.table.path} in {passes} "
                "passes: fix the image paths (see the skip warnings; relative paths start in the working directory)")


class CsvValDataset(IterableDataset):
    """Every row of a `CsvTable` (the first `limit` rows, if given) once over all ranks and workers: slot
    s of S takes rows s, s+S, ...; batches carry each pair's row as its 'order'."""

    def __init__(self, table: CsvTable, preprocess: Preprocess, tokenizer: Tokenizer, batch_size: int,
                 rank: int = 0, world_size: int = 1, limit: int | None = None) -> None:
        super().__init__()
        self.table, self.preprocess, self.tokenizer = table, preprocess, tokenizer
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.rows = len(table) if limit is None else min(limit, len(table))

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        skips = SkipLog()
        rows = range(self.rank * workers + worker, self.rows, self.world_size * workers)
        samples = (sample for sample in (self.table.sample(row, skips) for row in rows) if sample is not None)
        for batch in chunks(samples, self.batch_size):
            yield {**collate(batch, self.preprocess, self.tokenizer, skips.take(), draw_captions=False),
                   "order": torch.tensor([sample.index for sample in batch], dtype=torch.int64)}


# -------------------------------------------------------------------------------------------- loaders


class TrainLoader:
    """Iterates a `SlotDataset` for exactly `len(self)` batches per epoch; `set_epoch` before each epoch.

    A fresh DataLoader (and worker processes, which ignore `WORKER_IGNORED_SIGNALS`) per epoch lets the
    workers see the new epoch. Records the position of the last batch yielded for `state_dict`;
    `load_state_dict` makes the next iteration continue from such a position (module docstring).
    """

    def __init__(self, dataset: SlotDataset, num_batches: int, workers: int = 0, pin_memory: bool = False) -> None:
        self.dataset, self.num_batches, self.workers, self.pin_memory = dataset, num_batches, workers, pin_memory
        self._restart()

    @property
    def num_samples(self) -> int:
        """Samples all ranks together consume per epoch (>= the requested number)."""
        return self.num_batches * self.dataset.batch_size * self.dataset.world_size

    @property
    def slots(self) -> int:
        """Worker slots of this rank: one per DataLoader worker, one without workers."""
        return max(self.workers, 1)

    def set_epoch(self, epoch: int) -> None:
        """Starts `epoch` from its beginning, unless a position loaded for it is pending."""
        if not (self._resume and epoch == self.dataset.epoch):
            self.dataset.epoch = epoch
            self._restart()

    def __len__(self) -> int:
        return self.num_batches

    def state_dict(self) -> dict:
        """This rank's position after the last batch yielded (the start of the epoch before the first).

        A resampled stream's position also says "resampled": True; without the key a position is of
        passes, as all positions written before resampling existed."""
        d = self.dataset
        state = {"epoch": d.epoch, "batches": self._batches, "rank": d.rank, "world_size": d.world_size,
                 "workers": self.workers, "batch_size": d.batch_size, "seed": d.seed,
                 "slots": [list(position) for position in self._positions]}
        return {**state, "resampled": True} if d.resampled else state

    def load_state_dict(self, state: dict) -> None:
        """The next iteration yields the rest of `state`'s epoch, exactly as if never interrupted."""
        problem = self._incompatibility(state)
        if problem is not None:
            raise IncompatiblePosition(f"data position {problem}: the rest of epoch {state['epoch']} cannot "
                                       "continue the saved sample order")
        self.dataset.epoch, self._batches = state["epoch"], state["batches"]
        self._positions = [SlotPosition(*position) for position in state["slots"]]
        self._resume = True

    def _incompatibility(self, state: dict) -> str | None:
        d = self.dataset
        if (state["world_size"], max(state["workers"], 1)) != (d.world_size, self.slots):
            return (f"written with {state['world_size']} ranks x {state['workers']} workers, now "
                    f"{d.world_size} x {self.workers}")
        if state["rank"] != d.rank:
            return f"written by rank {state['rank']}, loaded by rank {d.rank}"
        if state["batch_size"] != d.batch_size:
            return f"written with batch size {state['batch_size']}, now {d.batch_size}"
        if state["seed"] != d.seed:
            return f"written with seed {state['seed']}, now {d.seed}"
        if state.get("resampled", False) != d.resampled:
            then, now = ("without", "with") if d.resampled else ("with", "without")
            return f"written {then} --dataset-resampled, now {now} it (shard draws and passes differ)"
        if not 0 <= state["batches"] <= self.num_batches:
            return f"is after {state['batches']} batches, but an epoch now has {self.num_batches}"
        return None

    def _restart(self) -> None:
        self._batches, self._positions, self._resume = 0, [SlotPosition()] * self.slots, False

    def _record(self, slot: int, position: list[int]) -> None:
        self._positions[slot - self.dataset.rank * self.slots] = SlotPosition(*position)
        self._batches += 1

    def __iter__(self) -> Iterator[dict]:
        if not self._resume:
            self._restart()
        self._resume = False
        d = self.dataset
        # the DataLoader's own generator: starting it draws nothing from the global RNG
        seed = int(derive_rng(d.seed, d.epoch, LOADER_STREAM, d.rank).integers(2**62))
        dataset = d.starting_at(self._positions, self._batches % self.slots)
        batches = iter(DataLoader(dataset, batch_size=None, pin_memory=self.pin_memory,
                                  generator=torch.Generator().manual_seed(seed),
                                  **worker_arguments(self.workers, ignore_signals)))
        try:
            for batch in itertools.islice(batches, self.num_batches - self._batches):
                self._record(batch.pop("slot"), batch.pop("position"))
                yield batch
        except Exception as error:
            # torch re-raises a worker's error from frames that hold the DataLoader iterator in a
            # reference cycle; collected late by the gc, its worker shutdown stalls for seconds.
            traceback.clear_frames(error.__traceback__)
            del batches
            raise


def build_train_loader(
    shards: str | Sequence[str],
    preprocess: Preprocess,
    tokenizer: Tokenizer,
    batch_size: int,
    num_samples: int,
    seed: int = 0,
    epoch: int = 0,
    rank: int = 0,
    world_size: int = 1,
    workers: int = 0,
    data_size: int | None = None,
    shuffle_buffer: int = 1000,
    pin_memory: bool = False,
    dataset_resampled: bool = False,
    train_data_upsampling_factors: str | Sequence[float] | None = None,
    captions_per_line: bool = False,
) -> TrainLoader:
    """The training loader of one rank: ceil(num_samples / (batch_size * world_size)) batches per epoch.

    `data_size` given: every sample must carry a key in [0, data_size) (the per-sample state index).
    `dataset_resampled`: every worker slot draws shards with replacement (module docstring), weighted by
    `train_data_upsampling_factors` ('f1::f2::...' or numbers), one factor per '::'-joined source of
    `shards`, which need `dataset_resampled` as in open_clip. `captions_per_line`: each line of a .txt is a
    caption of the image (`samples` module docstring).
    """
    if num_samples < 1 or workers < 0 or (data_size is not None and data_size < 1):
        raise ValueError(f"need num_samples >= 1, workers >= 0, data_size >= 1; got {num_samples=}, "
                         f"{workers=}, {data_size=}")
    check_upsampling(train_data_upsampling_factors, dataset_resampled)
    sources = expand_sources(shards)
    probabilities = draw_probabilities(sources, train_data_upsampling_factors) if dataset_resampled else None
    dataset = ShardTrainDataset(
        [url for source in sources for url in source], preprocess, tokenizer, batch_size, seed=seed, epoch=epoch,
        rank=rank, world_size=world_size, data_size=data_size, shuffle_buffer=shuffle_buffer,
        draw_probabilities=probabilities, captions_per_line=captions_per_line,
    )
    return TrainLoader(dataset, batches_per_epoch(num_samples, batch_size, world_size), workers, pin_memory)


def build_val_loader(
    shards: str | Sequence[str],
    preprocess: Preprocess,
    tokenizer: Tokenizer,
    batch_size: int,
    workers: int = 0,
    data_size: int | None = None,
    pin_memory: bool = False,
    rank: int = 0,
    world_size: int = 1,
    limit: int | None = None,
    captions_per_line: bool = False,
) -> DataLoader:
    """This rank's share of the validation samples, unshuffled (the last batch of each worker may be
    short); all ranks together yield every sample once, and sorting by 'order' restores shard order.
    `limit` reads only what the first `limit` pairs can come from (`ShardValDataset`)."""
    dataset = ShardValDataset(expand_shards(shards), preprocess, tokenizer, batch_size, data_size=data_size,
                              rank=rank, world_size=world_size, limit=limit, captions_per_line=captions_per_line)
    return DataLoader(dataset, batch_size=None, pin_memory=pin_memory, **worker_arguments(workers))


def build_csv_train_loader(
    table: CsvTable,
    preprocess: Preprocess,
    tokenizer: Tokenizer,
    batch_size: int,
    num_samples: int,
    seed: int = 0,
    epoch: int = 0,
    rank: int = 0,
    world_size: int = 1,
    workers: int = 0,
    data_size: int | None = None,
    pin_memory: bool = False,
) -> TrainLoader:
    """`build_train_loader` over the rows of a CSV; a pair's index is its row number."""
    slots = max(workers, 1)
    if len(table) < world_size * slots:
        raise DataError(f"CSV {table.path} has {len(table)} rows, fewer than the {world_size} ranks x {slots} "
                        "worker slots that each need a share of them: use fewer --workers or ranks")
    if num_samples < 1 or workers < 0:
        raise ValueError(f"need num_samples >= 1 and workers >= 0; got {num_samples=}, {workers=}")
    if data_size is not None and data_size < len(table):
        raise DataError(f"--data_size {data_size} is smaller than the {len(table)} rows of CSV {table.path}, whose "
                        f"row numbers are the sample indices: pass --data_size {len(table)} or leave it out")
    dataset = CsvTrainDataset(table, preprocess, tokenizer, batch_size, seed=seed, epoch=epoch, rank=rank,
                              world_size=world_size)
    return TrainLoader(dataset, batches_per_epoch(num_samples, batch_size, world_size), workers, pin_memory)


def build_csv_val_loader(
    table: CsvTable,
    preprocess: Preprocess,
    tokenizer: Tokenizer,
    batch_size: int,
    workers: int = 0,
    pin_memory: bool = False,
    rank: int = 0,
    world_size: int = 1,
    limit: int | None = None,
) -> DataLoader:
    """`build_val_loader` over the rows of a CSV (the first `limit`, if given): 'order' is the row number."""
    dataset = CsvValDataset(table, preprocess, tokenizer, batch_size, rank=rank, world_size=world_size,
                            limit=limit)
    return DataLoader(dataset, batch_size=None, pin_memory=pin_memory, **worker_arguments(workers))
