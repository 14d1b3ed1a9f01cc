"""Webdataset shards -> batches {'image', 'text', 'index', 'skipped'}, the same number on every rank.

Shards are read with webdataset's tar iterators; which worker reads which shard is decided here.

Training stream. Rank r of K with W DataLoader workers has the global worker slots r*W + w of S = K*W.
Every pass over the data, the shard list is shuffled with a seed from (seed, epoch, pass), identically
on all ranks, and shard j of the shuffled list goes to slot j % S. With fewer shards than slots, the
slots that share a shard keep disjoint subsets of its samples (every m-th), so one pass never repeats
a sample. Inside a slot, samples go through a shuffle buffer seeded from (seed, epoch, slot, pass)
that is flushed at the end of each pass. A slot's stream is infinite (pass 0, 1, 2, ...) and every
rank stops after ceil(num_samples / (batch_size * K)) batches (open_clip's convention), so all ranks
run the same number of steps even when their shards hold different numbers of samples. Batch i of a
rank comes from its local slot i % W (DataLoader round robin).

Position and resume. Augmentations do not depend on history: batch j of slot s in an epoch is
collated with the torch, python and numpy global RNGs seeded from (seed, epoch, s, j) and restored
afterwards (with W = 0 the main process's RNG, hence the model's, is left as it was), so its tensors
depend only on its samples and (seed, epoch, s, j). A slot's position after a batch is (pass, items
taken from the pass's shuffled raw-sample stream, undecodable ones included, batches the slot produced
this epoch); batches leave the worker with their slot and position, which `TrainLoader` strips,
recording per slot the position of the last batch it yielded. `state_dict()` is the rank's position
(plain ints); after `load_state_dict()` the next iteration of that epoch yields the remaining batches
exactly: each slot regenerates its pass's shard order, slot assignment and seeded shuffle buffer, reads
the raw tar samples and drops the first `taken` items of the shuffled stream undecoded (skips met on the
way were counted before the checkpoint: they are neither logged nor counted again), and the DataLoader's
round robin is rotated so that worker w serves local slot (batches + w) % W. Loading needs the same
rank, number of ranks, worker slots per rank (workers 0 and 1 both mean one), batch size and seed, or
raises `IncompatiblePosition`; a loaded position applies to its epoch only, the next starts from scratch.

Bad input. Errors (`DataError`) where training would silently be wrong: a local shard pattern that
matches no file; with `data_size` given, a sample whose .json is missing, has no integer "key", or a
key outside [0, data_size). Counted skips (logged with shard and sample key, the first few per worker
and epoch, and counted in the next batch's 'skipped') where a sample cannot be used: no image, no
text, an undecodable image or caption, and a truncated or unreadable shard (the samples before the
damage are used; the rest of the shard counts as one skip since its size is unknown).

Validation stream: every sample once, no shuffle, shards in the given order (split over the
DataLoader workers shard by shard when there are several). It is meant for rank 0 only: retrieval
needs all embeddings in one place.
"""

from __future__ import annotations

import contextlib
import copy
import io
import itertools
import json
import logging
import lzma
import math
import os
import random
import signal
import tarfile
import traceback
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable, Iterator, NamedTuple, Sequence, TypeVar
from urllib.parse import urlparse
from urllib.request import url2pathname

import braceexpand
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.gopen import gopen
from webdataset.tariterators import group_by_keys, tar_file_expander

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
MAX_LOGGED_SKIPS = 5
MAX_EMPTY_PASSES = 5
_COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")
_READ_ERRORS = (tarfile.TarError, EOFError, OSError, zlib.error, lzma.LZMAError)
# Independent random streams derived from the same (seed, epoch).
SHARD_STREAM, SAMPLE_STREAM, LOADER_STREAM, AUGMENT_STREAM = 0, 1, 2, 3
# Left to the main process, which finishes the step, agrees with the other ranks, saves and exits.
WORKER_IGNORED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)

T = TypeVar("T")
Preprocess = Callable[[Image.Image], torch.Tensor]
Tokenizer = Callable[[list[str]], torch.Tensor]


class DataError(ValueError):
    """Input data that would make training wrong; the message names the shard, the sample and the fix."""


class IncompatiblePosition(ValueError):
    """A saved data position this loader cannot continue exactly (other ranks, workers, batch size, seed)."""


class SlotPosition(NamedTuple):
    """A slot's stream after a batch: `taken` items of pass `pass_index`'s shuffled raw-sample stream
    (undecodable ones included) are used up, and the slot has produced `batches` batches this epoch."""

    pass_index: int = 0
    taken: int = 0
    batches: int = 0


@dataclass
class Sample:
    """A decoded pair; `index` is int(json['key']), or -1 where it is absent and not needed."""

    image: Image.Image
    text: str
    index: int


def steps_per_epoch(num_samples: int, batch_size: int, world_size: int) -> int:
    """Batches every rank yields per epoch: ceil(num_samples / global batch), as open_clip counts."""
    return math.ceil(num_samples / (batch_size * world_size))


def derive_rng(*keys: int) -> np.random.Generator:
    """A generator determined by non-negative integer keys only (same on every rank and process)."""
    return np.random.default_rng(np.random.SeedSequence(list(keys)))


@contextlib.contextmanager
def seeded_rngs(*keys: int) -> Iterator[None]:
    """Torch's, python's and numpy's global RNGs seeded from `keys` inside, restored on exit.

    Transforms draw from the global RNGs; seeding them per batch makes augmentations independent of
    what ran before, and restoring them keeps the model's randomness independent of data loading.
    """
    rng = derive_rng(*keys)
    seed, numpy_seed = int(rng.integers(2**63)), int(rng.integers(2**32))
    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(numpy_seed)
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


def ignore_signals(worker_id: int) -> None:
    """DataLoader `worker_init_fn`: a Ctrl-C or slurm's signal must not kill a worker (the main process,
    which handles it, would crash on its next batch); torch's worker seeding has already run."""
    for signum in WORKER_IGNORED_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


# ----------------------------------------------------------------------------------------- shard lists


def _local_path(url: str) -> Path | None:
    """The file a shard URL names on this machine, or None for a remote/pipe URL webdataset opens."""
    parsed = urlparse(url)
    if parsed.scheme == "":
        return Path(url).expanduser()
    if parsed.scheme == "file":
        return Path(url2pathname(parsed.path))
    return None


def _expand_pattern(pattern: str) -> list[str]:
    urls = [os.path.expanduser(u) if _local_path(u) else u for u in braceexpand.braceexpand(pattern)]
    present = [u for u in urls if _local_path(u) is None or _local_path(u).is_file()]
    if not present:
        raise DataError(
            f"no shard file matches {pattern!r} (looked in {Path.cwd()} for relative paths): fix the path "
            "or the brace range, e.g. 'data/train/{00000..00331}.tar'; join several patterns with '::'"
        )
    if len(present) < len(urls):
        missing = sorted(set(urls) - set(present))
        log.warning("%d of %d shards of %r do not exist (e.g. %s); using the %d that do",
                    len(missing), len(urls), pattern, missing[0], len(present))
    return present


def expand_shards(spec: str | Sequence[str]) -> list[str]:
    """Shard URLs from brace patterns joined by '::' (or a list of them); see `DataError` for no match."""
    parts = [spec] if isinstance(spec, str) else list(spec)
    patterns = [p for part in parts for p in part.split("::")]
    return [url for pattern in patterns for url in _expand_pattern(pattern)]


def shard_order(shards: Sequence[str], seed: int, epoch: int, pass_index: int = 0) -> list[str]:
    """The shard list of one pass, shuffled identically on every rank."""
    permutation = derive_rng(seed, epoch, SHARD_STREAM, pass_index).permutation(len(shards))
    return [shards[i] for i in permutation]


def slot_assignment(shards: Sequence[str], slot: int, num_slots: int) -> list[tuple[str, int, int]]:
    """(shard, part, parts) read by a slot: it keeps the samples at positions p with p % parts == part.

    With at least as many shards as slots each shard has one reader (parts == 1); otherwise the
    slots j, j+n, j+2n, ... share shard j of n and split its samples between them.
    """
    n = len(shards)
    if n >= num_slots:
        return [(url, 0, 1) for url in shards[slot::num_slots]]
    shared = slot % n
    return [(shards[shared], slot // n, len(range(shared, num_slots, n)))]


# ------------------------------------------------------------------------------------------ tar reading


class SkipLog:
    """Counts skipped samples until the next batch takes the count; logs the first few of them."""

    def __init__(self, limit: int = MAX_LOGGED_SKIPS) -> None:
        self.limit = limit
        self.pending = 0
        self.logged = 0
        self._muted = False

    @contextlib.contextmanager
    def muted(self) -> Iterator[None]:
        """Ignores skips met again while fast-forwarding: they were logged and counted before."""
        self._muted = True
        try:
            yield
        finally:
            self._muted = False

    def record(self, shard: str, what: str) -> None:
        if self._muted:
            return
        self.pending += 1
        if self.logged < self.limit:
            log.warning("shard %s: skipped %s", shard, what)
        elif self.logged == self.limit:
            log.warning("further skipped samples are counted in the batches' 'skipped' but not logged")
        self.logged += 1

    def take(self) -> int:
        count, self.pending = self.pending, 0
        return count


class _EndCheckingReader:
    """Passes a shard's bytes to tarfile and tells afterwards whether the tar ended as it should.

    tarfile's stream mode silently stops at a tar cut at a header boundary or at a corrupt header.
    A complete tar ends with at least two zero blocks and nothing but zeros follows the point where
    tarfile stops. Compressed tars are left to their decompressor, which raises on a cut stream.
    """

    def __init__(self, stream: BinaryIO, url: str) -> None:
        self._stream = stream
        self._url = url
        self._head = b""
        self._tail = b""

    def read(self, size: int = -1) -> bytes:
        data = self._stream.read(size)
        if len(self._head) < 6:
            self._head += data[: 6 - len(self._head)]
        self._tail = data[-1024:] if len(data) >= 1024 else (self._tail + data)[-1024:]
        return data

    def damage(self) -> str | None:
        """Why the shard did not end as a tar should, or None; reads what tarfile left unread."""
        if self._head.startswith(_COMPRESSED_MAGIC):
            return None
        while chunk := self.read(1 << 16):
            if chunk.strip(b"\0"):
                return "data after a tar header that could not be read: the shard is corrupt"
        return None if self._tail == bytes(1024) else "no tar end marker: the shard was cut short"

    def __repr__(self) -> str:
        return self._url


def _error_text(error: BaseException) -> str:
    message = error.args[0] if error.args else ""
    return f"{type(error).__name__}: {message}"


def read_shard(url: str, skips: SkipLog) -> Iterator[dict[str, Any]]:
    """Raw samples ({'__key__', '__url__', extension: bytes}) of one shard; damage counts as a skip.

    A sample is passed on once the next one has begun or the tar ended properly, so a truncated
    shard never yields a sample that lost its last files.
    """
    previous: dict[str, Any] | None = None
    previous_complete, damage = True, None
    try:
        with gopen(url) as raw:
            stream = _EndCheckingReader(raw, url)
            for sample in group_by_keys(tar_file_expander([{"url": url, "stream": stream}])):
                if previous is not None:
                    yield previous
                previous = sample
            damage = stream.damage()
            previous_complete = damage is None
    except _READ_ERRORS as error:
        damage = f"truncated or unreadable: {_error_text(error)}"
    except ValueError as error:  # group_by_keys: the same file name twice in a row
        raise DataError(f"shard {url} is malformed ({_error_text(error)}): rewrite it") from error
    if previous is not None and previous_complete:
        yield previous
    if damage is not None:
        skips.record(url, f"{_lost_part(previous, previous_complete)} ({damage})")


def _lost_part(last: dict[str, Any] | None, last_complete: bool) -> str:
    if last is None:
        return "the whole shard"
    key = last["__key__"]
    return f"everything after sample {key}" if last_complete else f"sample {key} and everything after it"


# ------------------------------------------------------------------------------------------- decoding

_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa"}


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode as RGB: transparency over white, 16-bit grey scaled down rather than clipped."""
    if image.mode.startswith("I;16"):
        image = Image.fromarray((np.asarray(image, dtype=np.float32) / 257.0).round().astype(np.uint8))
    if image.mode in _ALPHA_MODES or (image.mode == "P" and "transparency" in image.info):
        image = Image.alpha_composite(Image.new("RGBA", image.size, "white"), image.convert("RGBA"))
    return image.convert("RGB")


def sample_index(raw: dict[str, Any], data_size: int | None) -> int:
    """int(json['key']); -1 when absent and no index is needed; a `DataError` when it is needed."""
    shard, key = raw["__url__"], raw["__key__"]
    try:
        index = int(json.loads(raw["json"])["key"])
    except (KeyError, TypeError, ValueError) as error:
        if data_size is None:
            return -1
        raise DataError(
            f"shard {shard}, sample {key}: no integer 'key' in the sample's .json ({_error_text(error)}); "
            "with data_size set every sample needs the .json img2dataset writes, whose 'key' is its index"
        ) from error
    if data_size is not None and not 0 <= index < data_size:
        raise DataError(
            f"shard {shard}, sample {key}: key {index} is outside [0, data_size={data_size}); set data_size "
            "(--data_size) above the largest key: img2dataset keys are shard_id * 10^ceil(log10("
            "samples_per_shard)) + i, so they exceed the number of samples"
        )
    return index


def decode_sample(raw: dict[str, Any], data_size: int | None, skips: SkipLog) -> Sample | None:
    """Image, caption and index of a raw sample, or None (a recorded skip) when it cannot be used."""
    shard, key = raw["__url__"], raw["__key__"]
    extension = next((e for e in IMAGE_EXTENSIONS if e in raw), None)
    if extension is None or "txt" not in raw:
        skips.record(shard, f"sample {key} (no {'image' if extension is None else 'text'})")
        return None
    index = sample_index(raw, data_size)
    try:
        text = raw["txt"].decode("utf-8")
        with Image.open(io.BytesIO(raw[extension])) as image:
            rgb = to_rgb(image)
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        skips.record(shard, f"sample {key} (undecodable .{extension} or .txt: {_error_text(error)})")
        return None
    return Sample(rgb, text, index)


def collate(samples: Sequence[Sample], preprocess: Preprocess, tokenizer: Tokenizer, skipped: int) -> dict:
    """One batch in the format the engine consumes."""
    return {
        "image": torch.stack([preprocess(s.image) for s in samples]),
        "text": tokenizer([s.text for s in samples]),
        "index": torch.tensor([s.index for s in samples], dtype=torch.int64),
        "skipped": skipped,
    }


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

    Subclasses define `stream`; `epoch` is read when a loader starts its workers, so setting it between
    epochs is enough. Batches carry their 'slot' and 'position' (the slot's `SlotPosition` after them)
    for `TrainLoader`, which strips them; `starting_at` gives the copy that continues from positions.
    """

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

    def stream(self, slot: int, num_slots: int, skips: SkipLog,
               start: SlotPosition) -> Iterator[tuple[int, int, Sample]]:
        """(pass, items taken from the pass so far, sample) of a slot, continuing after `start`."""
        raise NotImplementedError

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
    """The infinite, reshuffled training stream of the module docstring."""

    def __init__(self, shards: Sequence[str], *args: Any, data_size: int | None = None,
                 shuffle_buffer: int = 1000, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.shards, self.data_size, self.shuffle_buffer = list(shards), data_size, shuffle_buffer

    def _raw_pass(self, slot: int, num_slots: int, pass_index: int, skips: SkipLog) -> Iterator[dict[str, Any]]:
        """A slot's raw (undecoded) samples of one pass, through the pass's seeded shuffle buffer."""
        order = shard_order(self.shards, self.seed, self.epoch, pass_index)
        raw = (sample
               for url, part, parts in slot_assignment(order, slot, num_slots)
               for position, sample in enumerate(read_shard(url, skips)) if position % parts == part)
        rng = derive_rng(self.seed, self.epoch, SAMPLE_STREAM, pass_index, slot)
        return shuffled(raw, rng, self.shuffle_buffer)

    def stream(self, slot: int, num_slots: int, skips: SkipLog,
               start: SlotPosition) -> Iterator[tuple[int, int, Sample]]:
        empty_passes = 0
        for pass_index in itertools.count(start.pass_index):
            items = self._raw_pass(slot, num_slots, pass_index, skips)
            offset = 0
            if pass_index == start.pass_index:
                offset = fast_forward(items, start.taken, skips, f"pass {pass_index} of worker slot {slot}")
            # a position inside a pass follows a batch whose last sample came from that pass
            used = offset > 0
            for taken, item in enumerate(items, offset + 1):
                sample = decode_sample(item, self.data_size, skips)
                if sample is not None:
                    used = True
                    yield pass_index, taken, sample
            empty_passes = 0 if used else empty_passes + 1
            if empty_passes == MAX_EMPTY_PASSES:
                raise DataError(
                    f"worker slot {slot} of {num_slots} found no usable sample in {empty_passes} passes over "
                    f"its share of {len(self.shards)} shards: fix the shards (see the skip warnings) or "
                    "use fewer ranks x workers than there are samples per shard"
                )


class ShardValDataset(IterableDataset):
    """Every sample once, in shard order; the workers split the shards between them."""

    def __init__(self, shards: Sequence[str], preprocess: Preprocess, tokenizer: Tokenizer, batch_size: int,
                 data_size: int | None = None) -> None:
        super().__init__()
        self.shards, self.preprocess, self.tokenizer = list(shards), preprocess, tokenizer
        self.batch_size, self.data_size = batch_size, data_size

    def _samples(self, urls: Sequence[str], skips: SkipLog) -> Iterator[Sample]:
        for url in urls:
            for raw in read_shard(url, skips):
                sample = decode_sample(raw, self.data_size, skips)
                if sample is not None:
                    yield sample

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        skips = SkipLog()
        for batch in chunks(self._samples(self.shards[worker::workers], skips), self.batch_size):
            yield collate(batch, self.preprocess, self.tokenizer, skips.take())


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
        """This rank's position after the last batch yielded (the start of the epoch before the first)."""
        d = self.dataset
        return {"epoch": d.epoch, "batches": self._batches, "rank": d.rank, "world_size": d.world_size,
                "workers": self.workers, "batch_size": d.batch_size, "seed": d.seed,
                "slots": [list(position) for position in self._positions]}

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
        batches = iter(DataLoader(dataset, batch_size=None, num_workers=self.workers, pin_memory=self.pin_memory,
                                  generator=torch.Generator().manual_seed(seed), worker_init_fn=ignore_signals))
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
) -> TrainLoader:
    """The training loader of one rank: ceil(num_samples / (batch_size * world_size)) batches per epoch.

    `data_size` given: every sample must carry a key in [0, data_size) (the per-sample state index).
    """
    if num_samples < 1 or workers < 0 or (data_size is not None and data_size < 1):
        raise ValueError(f"need num_samples >= 1, workers >= 0, data_size >= 1; got {num_samples=}, "
                         f"{workers=}, {data_size=}")
    dataset = ShardTrainDataset(
        expand_shards(shards), preprocess, tokenizer, batch_size, seed=seed, epoch=epoch, rank=rank,
        world_size=world_size, data_size=data_size, shuffle_buffer=shuffle_buffer,
    )
    return TrainLoader(dataset, steps_per_epoch(num_samples, batch_size, world_size), workers, pin_memory)


def build_val_loader(
    shards: str | Sequence[str],
    preprocess: Preprocess,
    tokenizer: Tokenizer,
    batch_size: int,
    workers: int = 0,
    data_size: int | None = None,
    pin_memory: bool = False,
) -> DataLoader:
    """Every validation sample once, unshuffled, for rank 0 (the last batch of each worker may be short)."""
    dataset = ShardValDataset(expand_shards(shards), preprocess, tokenizer, batch_size, data_size=data_size)
    return DataLoader(dataset, batch_size=None, num_workers=workers, pin_memory=pin_memory)
