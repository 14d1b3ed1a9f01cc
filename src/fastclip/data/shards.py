"""Webdataset shards: brace patterns -> shard URLs, which worker slot reads which shard, damage-checked reading.

Shards are read with webdataset's tar iterators; which worker reads which shard is decided here.
Every pass over the data, the shard list is shuffled with a seed from (seed, epoch, pass), identically
on all ranks, and shard j of the shuffled list goes to global worker slot j % S. With fewer shards than
slots, the slots that share a shard keep disjoint subsets of its samples (every m-th), so one pass
never repeats a sample.

Resampling (open_clip's --dataset-resampled): instead of passes, each slot draws shards with
replacement, draw d of slot s from a generator seeded by (seed, epoch, s, d) alone, so that any draw
can be repeated without the ones before it. Shard i is drawn with probability proportional to its
weight: the upsampling factor of the '::'-joined source it belongs to (1 without factors), per shard
as in open_clip, so a source's share of the draws is its factor times its number of shards.

Bad input. A local shard pattern that matches no file is a `DataError`. A truncated or unreadable
shard is a counted skip: the samples before the damage are used; the rest of the shard counts as one
skip since its size is unknown.
"""

from __future__ import annotations

import logging
import lzma
import math
import os
import tarfile
import zlib
from pathlib import Path
from typing import Any, BinaryIO, Iterator, Sequence
from urllib.parse import urlparse
from urllib.request import url2pathname

import braceexpand
import numpy as np
from webdataset.gopen import gopen
from webdataset.tariterators import group_by_keys, tar_file_expander

from .samples import SHARD_STREAM, DataError, SkipLog, derive_rng, error_text

log = logging.getLogger(__name__)

_COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")
_READ_ERRORS = (tarfile.TarError, EOFError, OSError, zlib.error, lzma.LZMAError)


# ----------------------------------------------------------------------------------------- shard lists


def local_path(url: str) -> Path | None:
    """The file a shard URL names on this machine, or None for a remote/pipe URL webdataset opens."""
    parsed = urlparse(url)
    if parsed.scheme == "":
        return Path(url).expanduser()
    if parsed.scheme == "file":
        return Path(url2pathname(parsed.path))
    return None


def _expand_pattern(pattern: str) -> list[str]:
    urls = [os.path.expanduser(u) if local_path(u) else u for u in braceexpand.braceexpand(pattern)]
    present = [u for u in urls if local_path(u) is None or local_path(u).is_file()]
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


def expand_sources(spec: str | Sequence[str]) -> list[list[str]]:
    """The shard URLs of each source: brace patterns joined by '::' (or a list of them), in order."""
    parts = [spec] if isinstance(spec, str) else list(spec)
    return [_expand_pattern(pattern) for part in parts for pattern in part.split("::")]


def expand_shards(spec: str | Sequence[str]) -> list[str]:
    """Shard URLs from brace patterns joined by '::' (or a list of them); see `DataError` for no match."""
    return [url for source in expand_sources(spec) for url in source]


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


def _parse_factors(factors: str | Sequence[float]) -> list[float]:
    words = factors.split("::") if isinstance(factors, str) else list(factors)
    try:
        values = [float(word) for word in words]
    except ValueError:
        values = []
    if not values or not all(math.isfinite(v) and v >= 0 for v in values) or not any(values):
        raise ValueError(f"--train-data-upsampling-factors {factors!r}: give numbers >= 0 joined by '::', "
                         "at least one of them > 0")
    return values


def draw_probabilities(sources: Sequence[Sequence[str]], factors: str | Sequence[float] | None) -> np.ndarray:
    """Each shard's probability of being drawn: its source's factor over the sum over all shards.

    `factors` ('f1::f2::...' or numbers), one per source of `expand_sources`; None weighs every shard 1.
    """
    values = [1.0] * len(sources) if factors is None else _parse_factors(factors)
    if len(values) != len(sources):
        raise ValueError(f"--train-data-upsampling-factors gives {len(values)} factors but --train-data has "
                         f"{len(sources)} '::'-joined sources: give one factor per source")
    weights = np.array([factor for factor, source in zip(values, sources) for _ in source])
    return weights / weights.sum()


def drawn_shard(probabilities: np.ndarray, seed: int, epoch: int, slot: int, draw: int) -> int:
    """The shard (a position in the shard list) of draw `draw` of global worker slot `slot`, with replacement."""
    rng = derive_rng(seed, epoch, SHARD_STREAM, draw, slot)
    return int(rng.choice(len(probabilities), p=probabilities))


# ------------------------------------------------------------------------------------------ tar reading


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
        damage = f"truncated or unreadable: {error_text(error)}"
    except ValueError as error:  # group_by_keys: the same file name twice in a row
        raise DataError(f"shard {url} is malformed ({error_text(error)}): rewrite it") from error
    if previous is not None and previous_complete:
        yield previous
    if damage is not None:
        skips.record(f"shard {url}", f"{_lost_part(previous, previous_complete)} ({damage})")


def _lost_part(last: dict[str, Any] | None, last_complete: bool) -> str:
    if last is None:
        return "the whole shard"
    key = last["__key__"]
    return f"everything after sample {key}" if last_complete else f"sample {key} and everything after it"
