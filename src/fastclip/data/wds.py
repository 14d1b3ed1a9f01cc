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
_SHARD_STREAM, _SAMPLE_STREAM, _LOADER_STREAM = 0, 1, 2

T = TypeVar("T")
Preprocess = Callable[[Image.Image], torch.Tensor]
Tokenizer = Callable[[list[str]], torch.Tensor]


class DataError(ValueError):
    """Input data that would make training wrong; the message names the shard, the sample and the fix."""


@dataclass
class Sample:
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
        missing = [u for u in urls if u not in set(present)]
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
    permutation = derive_rng(seed, epoch, _SHARD_STREAM, pass_index).permutation(len(shards))
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
            log.warning("skipped %s in shard %s", what, shard)
        elif self.logged == self.limit:
            log.warning("further skipped samples are counted in the batches' 'skipped' but not logged")
        self.logged += 1

    def take(self) -> int:
        count, self.pending = self.pending, 0
        return count


class _EndCheckingReader:
    """Passes a shard's bytes to tarfile and tells afterwards whether the tar end marker was there.

    tarfile's stream mode silently treats a tar cut at a header boundary as complete; a complete tar
    ends with at least two zero blocks. Compressed tars are left to their decompressor's own check.
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

    def ends_cleanly(self) -> bool:
        while self.read(1 << 16):
            pass
        return self._head.startswith(_COMPRESSED_MAGIC) or self._tail == bytes(1024)

    def __repr__(self) -> str:
        return self._url


def _error_text(error: BaseException) -> str:
    message = error.args[0] if error.args else ""
    return f"{type(error).__name__}: {message}"


def read_shard(url: str, skips: SkipLog) -> Iterator[dict[str, Any]]:
    """Raw samples ({'__key__', '__url__', extension: bytes}) of one shard, damage counted as a skip.

    A sample is yielded only once the next one has begun or the tar ended properly, so a truncated
    shard never passes on a sample that lost its last files.
    """
    try:
        with gopen(url) as raw:
            stream = _EndCheckingReader(raw, url)
            samples = group_by_keys(tar_file_expander([{"url": url, "stream": stream}]))
            previous = None
            while True:
                sample = next(samples, None)
                if sample is None:
                    break
                if previous is not None:
                    yield previous
                previous = sample
            clean_end = stream.ends_cleanly()
    except _READ_ERRORS as error:
        if previous is not None:
            yield previous
        after = f" after sample {previous['__key__']}" if previous is not None else ""
        skips.record(url, f"the rest of the shard{after}: it is truncated or unreadable ({_error_text(error)})")
        return
    except ValueError as error:  # group_by_keys: a file name twice in one sample
        raise DataError(f"shard {url} is malformed: {_error_text(error)}; rewrite it") from error
    if clean_end:
        if previous is not None:
            yield previous
    else:
        after = f" after sample {previous['__key__']}" if previous is not None else ""
        skips.record(url, f"the end of the shard{after}: it has no tar end marker, so it is truncated")
