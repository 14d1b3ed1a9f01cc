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
rank comes from its worker i % W (DataLoader round robin).

Position and resume. Given the shard list, K, W, batch size and data_size, the samples of batch
`step` of `epoch` are a pure function of (seed, epoch, step); the DataLoader's generator is seeded from
(seed, epoch, rank), which also fixes the workers' torch/random seeds and thus the augmentations when
W >= 1. An exact mid-epoch resume builds the epoch's loader and discards its first `step` batches
(`itertools.islice(loader, step, None)`); that replays the decoding of the skipped batches but needs
no extra state in the checkpoint.

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

import io
import itertools
import json
import logging
import lzma
import math
import os
import tarfile
import traceback
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable, Iterator, Sequence, TypeVar
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
SHARD_STREAM, SAMPLE_STREAM, LOADER_STREAM = 0, 1, 2

T = TypeVar("T")
Preprocess = Callable[[Image.Image], torch.Tensor]
Tokenizer = Callable[[list[str]], torch.Tensor]


class DataError(ValueError):
    """Input data that would make training wrong; the message names the shard, the sample and the fix."""


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

    def record(self, shard: str, what: str) -> None:
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


# ------------------------------------------------------------------------------------------- datasets


class SlotDataset(IterableDataset):
    """Batches built inside a DataLoader worker from the sample stream of that worker's global slot.

    Subclasses define `samples(slot, num_slots, skips)`; `epoch` is read when a loader starts its
    workers, so setting it between epochs is enough.
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

    def samples(self, slot: int, num_slots: int, skips: SkipLog) -> Iterator[Sample]:
        raise NotImplementedError

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        skips = SkipLog()
        batch: list[Sample] = []
        for sample in self.samples(self.rank * workers + worker, self.world_size * workers, skips):
            batch.append(sample)
            if len(batch) == self.batch_size:
                yield collate(batch, self.preprocess, self.tokenizer, skips.take())
                batch = []
        if batch:
            yield collate(batch, self.preprocess, self.tokenizer, skips.take())


class ShardTrainDataset(SlotDataset):
    """The infinite, reshuffled training stream of the module docstring."""

    def __init__(self, shards: Sequence[str], *args: Any, data_size: int | None = None,
                 shuffle_buffer: int = 1000, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.shards, self.data_size, self.shuffle_buffer = list(shards), data_size, shuffle_buffer

    def _pass(self, slot: int, num_slots: int, pass_index: int, skips: SkipLog) -> Iterator[Sample]:
        order = shard_order(self.shards, self.seed, self.epoch, pass_index)
        raw = (sample
               for url, part, parts in slot_assignment(order, slot, num_slots)
               for position, sample in enumerate(read_shard(url, skips)) if position % parts == part)
        rng = derive_rng(self.seed, self.epoch, SAMPLE_STREAM, pass_index, slot)
        for item in shuffled(raw, rng, self.shuffle_buffer):
            sample = decode_sample(item, self.data_size, skips)
            if sample is not None:
                yield sample

    def samples(self, slot: int, num_slots: int, skips: SkipLog) -> Iterator[Sample]:
        empty_passes = 0
        for pass_index in itertools.count():
            used = 0
            for sample in self._pass(slot, num_slots, pass_index, skips):
                used += 1
                yield sample
            empty_passes = 0 if used else empty_passes + 1
            if empty_passes == MAX_EMPTY_PASSES:
                raise DataError(
                    f"worker slot {slot} of {num_slots} found no usable sample in {empty_passes} passes over "
                    f"its share of {len(self.shards)} shards: fix the shards (see the skip warnings) or "
                    "use fewer ranks x workers than there are samples per shard"
                )


class ShardValDataset(SlotDataset):
    """Every sample once, in shard order; the workers split the shards between them."""

    def __init__(self, shards: Sequence[str], *args: Any, data_size: int | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.shards, self.data_size = list(shards), data_size

    def samples(self, slot: int, num_slots: int, skips: SkipLog) -> Iterator[Sample]:
        for url in self.shards[slot::num_slots]:
            for raw in read_shard(url, skips):
                sample = decode_sample(raw, self.data_size, skips)
                if sample is not None:
                    yield sample


# -------------------------------------------------------------------------------------------- loaders


class TrainLoader:
    """Iterates a `SlotDataset` for exactly `len(self)` batches per epoch; `set_epoch` before each epoch.

    A fresh DataLoader (and worker processes) per epoch lets the workers see the new epoch; its
    generator is seeded from (seed, epoch, rank) so that worker seeds, hence augmentations, repeat.
    """

    def __init__(self, dataset: SlotDataset, num_batches: int, workers: int = 0, pin_memory: bool = False) -> None:
        self.dataset, self.num_batches, self.workers, self.pin_memory = dataset, num_batches, workers, pin_memory

    @property
    def num_samples(self) -> int:
        """Samples all ranks together consume per epoch (>= the requested number)."""
        return self.num_batches * self.dataset.batch_size * self.dataset.world_size

    def set_epoch(self, epoch: int) -> None:
        self.dataset.epoch = epoch

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[dict]:
        d = self.dataset
        seed = int(derive_rng(d.seed, d.epoch, LOADER_STREAM, d.rank).integers(2**62))
        batches = iter(DataLoader(d, batch_size=None, num_workers=self.workers, pin_memory=self.pin_memory,
                                  generator=torch.Generator().manual_seed(seed)))
        try:
            yield from itertools.islice(batches, self.num_batches)
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
