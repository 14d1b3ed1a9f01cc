"""Shard index: how many samples webdataset shards hold, which keys they carry, and the `--data_size` they need.

`python -m fastclip.data.index 'shards/{00000..41407}.tar'` (console script `fastclip-index`) prints the
shard and sample counts, the key range, the suggested `--data_size` (largest key + 1), the keys missing
from [0, data_size) (gaps, as img2dataset leaves where downloads failed), duplicate keys and samples
without a key. Training resolves `--train-num-samples auto` and `--data_size auto` with `build_index`.

What is read. Only the `.json` member of each sample, through `fastclip.data.samples.sample_index` (the
loader's reading of a key: `int(json["key"])`). A local uncompressed tar is opened with random access:
tarfile walks the member headers and seeks past the other members' data, so image bytes are never
read. A compressed or remote shard (.tar.gz, http://, pipe:) has no random access: it is streamed
whole and only its .json members are kept. Shards are read in parallel by a process pool. A local
tar cut short or with a corrupt header is an error naming it: tarfile would stop there silently, and
the loader would lose the rest of the shard.

Cache. One small JSON file per shard directory, `.fastclip-index.json`, maps a shard's file name to
its summary, valid while the shard's size and mtime are unchanged (a rewritten shard is read again).
When the directory is not writable the file goes under `~/.cache/fastclip/index/` instead (the report
says so). Remote shards have no size or mtime to check against and are read every time.

Duplicates at 400M samples. A shard's summary holds no keys, only counts, its key range, the runs of
missing keys inside that range and a few duplicate examples: the cache stays small and a cached run
needs no key at all. Keys are compared across shards only where it matters: shards whose key ranges do
not overlap cannot share a key, and img2dataset gives shard s the range [s * 10^k, (s + 1) * 10^k), so
its shards never overlap and the cross-shard check costs nothing. Shards with overlapping ranges are
read again (their .json members) and their unique keys merged by sorting numpy arrays, one key-range
bucket of about `BUCKET_KEYS` keys at a time (assuming keys spread evenly over the range), so memory
stays bounded (12 bytes a key) even when every shard overlaps every other; no Python set of keys.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import math
import multiprocessing
import os
import sys
import tarfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence, TypeVar

import numpy as np
from tqdm import tqdm
from webdataset.gopen import gopen
from webdataset.tariterators import base_plus_ext

from ..checkpoint.files import unique_tmp
from .samples import DataError, error_text, sample_index
from .shards import expand_shards, local_path

INDEX_FILE = ".fastclip-index.json"
CACHE_FORMAT = 1
MAX_EXAMPLES = 5
BUCKET_KEYS = 1 << 26  # keys merged at once across overlapping shards (512 MiB of int64)
MAX_DEFAULT_WORKERS = 32

T = TypeVar("T")
R = TypeVar("R")


class ShardIndexError(ValueError):
    """A shard that cannot be indexed; the message names it and says what to do."""


@dataclasses.dataclass
class ShardSummary:
    """What one shard holds: everything the index needs without keeping its keys."""

    samples: int  # samples (groups of files sharing a name) in the tar
    without_key: int  # samples with no .json, or no non-negative integer "key" in it
    min_key: int | None
    max_key: int | None
    unique_keys: int
    gap_runs: int  # runs of keys missing between min_key and max_key
    duplicate_examples: list[int]  # a few keys that occur more than once in this shard

    @property
    def keyed(self) -> int:
        return self.samples - self.without_key


@dataclasses.dataclass
class IndexReport:
    """The index of a list of shards; `scanned` of them were read now, the others came from the cache."""

    shards: int
    samples: int
    without_key: int
    min_key: int | None
    max_key: int | None
    unique_keys: int
    duplicates: int  # keyed samples whose key another sample already has
    duplicate_examples: list[dict[str, Any]]  # {"key", "shards"}: the shards (names) that hold it
    gaps: int  # runs of consecutive keys in [0, data_size) that no sample has
    scanned: int
    streamed: int  # shards read whole (compressed or remote), without random access
    overlapping: int  # shards whose key ranges overlap others': read again to compare their keys
    cache_files: list[str]
    notes: list[str]

    @property
    def data_size(self) -> int:
        """The smallest valid `--data_size`: every key lies in [0, data_size)."""
        return 0 if self.max_key is None else self.max_key + 1

    @property
    def missing_keys(self) -> int:
        """Rows of FastCLIP's per-sample state that no sample uses."""
        return self.data_size - self.unique_keys

    @property
    def missing_fraction(self) -> float:
        return self.missing_keys / self.data_size if self.data_size else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "data_size": self.data_size, "missing_keys": self.missing_keys,
                "missing_fraction": self.missing_fraction}


# ------------------------------------------------------------------------------------------ reading keys


@contextlib.contextmanager
def _open_tar(url: str) -> Iterator[tuple[tarfile.TarFile, bool]]:
    """The shard as a TarFile and whether it is streamed: random access for a local uncompressed tar."""
    path = local_path(url)
    tar = None
    if path is not None:
        with contextlib.suppress(tarfile.ReadError):  # compressed, or not a tar: the stream reader tells which
            tar = tarfile.open(path, "r:")
    if tar is not None:
        with tar:
            yield tar, False
        return
    with (gopen(url) if path is None else open(path, "rb")) as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
        yield tar, True


def _check_end(tar: tarfile.TarFile, url: str) -> None:
    """A local tar must end with its zero-block end marker where tarfile stopped reading headers.

    tarfile stops silently at a corrupt header or at a file cut short; the loader would lose the rest
    of such a shard, so it is an error here rather than a miscount.
    """
    tar.fileobj.seek(tar.offset)
    end = tar.fileobj.read(2 * tarfile.BLOCKSIZE)
    if len(end) < 2 * tarfile.BLOCKSIZE:
        raise ShardIndexError(f"shard {url} is cut short (no tar end marker): rewrite it or leave it out")
    if end.strip(b"\0"):
        raise ShardIndexError(f"shard {url} has a corrupt tar header at byte {tar.offset}: rewrite it or leave it out")


def _sample_keys(tar: tarfile.TarFile, url: str) -> Iterator[int]:
    """The key of every sample in tar order (-1 where it has none), grouping members as webdataset does:
    consecutive regular files whose names share the part before the first dot of the base name."""
    prefix: str | None = None
    json_bytes: bytes | None = None
    for member in tar:
        if not member.isreg():
            continue
        name_prefix, suffix = base_plus_ext(member.name)
        if name_prefix is None:
            continue
        if name_prefix != prefix:
            if prefix is not None:
                yield _key(url, prefix, json_bytes)
            prefix, json_bytes = name_prefix, None
        if suffix.lower() == "json":
            json_bytes = tar.extractfile(member).read()
    if prefix is not None:
        yield _key(url, prefix, json_bytes)


def _key(url: str, prefix: str, json_bytes: bytes | None) -> int:
    raw: dict[str, Any] = {"__url__": url, "__key__": prefix}
    if json_bytes is not None:
        raw["json"] = json_bytes
    return max(sample_index(raw, None), -1)  # a negative key is no valid index either


def read_keys(url: str) -> tuple[np.ndarray, bool]:
    """The key of every sample of a shard, in tar order (-1 for a sample without one), and whether the
    shard was streamed whole; a `ShardIndexError` naming it when it cannot be read."""
    try:
        with _open_tar(url) as (tar, streamed):
            keys = np.fromiter(_sample_keys(tar, url), dtype=np.int64)
            if not streamed:
                _check_end(tar, url)
    except ShardIndexError:
        raise
    except (tarfile.TarError, OSError, EOFError, ValueError) as error:
        raise ShardIndexError(f"shard {url} cannot be read ({error_text(error)}): fix or rewrite it, "
                              "or leave it out of the pattern") from error
    return keys, streamed


def summarize(keys: np.ndarray) -> ShardSummary:
    """A shard's summary from its sample keys (-1: no key)."""
    keyed = keys[keys >= 0]
    unique, counts = np.unique(keyed, return_counts=True)
    return ShardSummary(
        samples=len(keys), without_key=len(keys) - len(keyed),
        min_key=int(unique[0]) if len(unique) else None, max_key=int(unique[-1]) if len(unique) else None,
        unique_keys=len(unique), gap_runs=int(np.count_nonzero(np.diff(unique) > 1)),
        duplicate_examples=[int(k) for k in unique[counts > 1][:MAX_EXAMPLES]],
    )


def _scan(url: str) -> tuple[ShardSummary, bool]:
    keys, streamed = read_keys(url)
    return summarize(keys), streamed


def _unique_keys(url: str) -> np.ndarray:
    return np.unique(read_keys(url)[0])


# ------------------------------------------------------------------------------------------------- cache


def _fallback_cache_file(directory: Path) -> Path:
    root = Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "fastclip" / "index"
    return root / (hashlib.sha256(str(directory).encode()).hexdigest()[:24] + ".json")


def _signature(path: Path) -> dict[str, int]:
    stat = path.stat()
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _read_entries(file: Path) -> dict[str, dict]:
    """A cache file's entries; a missing, unreadable or other-format file is an empty cache."""
    try:
        content = json.loads(file.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(content, dict) or content.get("format") != CACHE_FORMAT:
        return {}
    return content.get("shards", {})


def _write_entries(file: Path, entries: dict[str, dict]) -> None:
    """Merge `entries` into the file (another process may have added shards meanwhile), atomically."""
    merged = {**_read_entries(file), **entries}
    file.parent.mkdir(parents=True, exist_ok=True)
    partial = unique_tmp(file)  # host and pid: several hosts may index one shared folder
    try:
        partial.write_text(json.dumps({"format": CACHE_FORMAT, "shards": merged}, separators=(",", ":")))
        os.replace(partial, file)
    finally:
        partial.unlink(missing_ok=True)


class ShardCache:
    """Per-directory summaries of local shards, valid while a shard's size and mtime are unchanged."""

    def __init__(self) -> None:
        self._entries: dict[Path, dict[str, dict]] = {}
        self.files: set[Path] = set()  # cache files read or written
        self.notes: list[str] = []

    def _directory_entries(self, directory: Path) -> dict[str, dict]:
        if directory not in self._entries:
            fallback = _read_entries(_fallback_cache_file(directory))
            if fallback:
                self._fall_back(directory, "")
            beside = _read_entries(directory / INDEX_FILE)
            if beside:
                self.files.add(directory / INDEX_FILE)
            self._entries[directory] = {**fallback, **beside}
        return self._entries[directory]

    def _fall_back(self, directory: Path, reason: str) -> Path:
        fallback = _fallback_cache_file(directory)
        if fallback not in self.files:
            self.files.add(fallback)
            self.notes.append(f"the index cache of {directory} is {fallback}{reason}")
        return fallback

    def get(self, url: str) -> ShardSummary | None:
        path = local_path(url)
        if path is None:
            return None
        path = path.absolute()
        entry = self._directory_entries(path.parent).get(path.name)
        if entry is None or {k: entry.get(k) for k in ("size", "mtime_ns")} != _signature(path):
            return None
        return ShardSummary(**entry["summary"])

    def put(self, summaries: dict[str, ShardSummary]) -> None:
        """Record fresh summaries of local shards, one cache file per directory."""
        by_directory: dict[Path, dict[str, dict]] = {}
        for url, summary in summaries.items():
            path = local_path(url)
            if path is not None:
                path = path.absolute()
                entry = {**_signature(path), "summary": dataclasses.asdict(summary)}
                by_directory.setdefault(path.parent, {})[path.name] = entry
        for directory, entries in by_directory.items():
            self._directory_entries(directory).update(entries)
            try:
                _write_entries(directory / INDEX_FILE, entries)
                self.files.add(directory / INDEX_FILE)
            except OSError as error:
                fallback = self._fall_back(directory, f" ({directory} is not writable: {error_text(error)})")
                _write_entries(fallback, entries)


# ------------------------------------------------------------------------------------- the whole index


def default_workers() -> int:
    return max(1, min(MAX_DEFAULT_WORKERS, len(os.sched_getaffinity(0))))


def _parallel(function: Callable[[T], R], items: Sequence[T], workers: int, description: str) -> Iterator[R]:
    """`function` over `items` in order, in a process pool when it pays, with a progress bar on a terminal."""
    bar = tqdm(total=len(items), desc=description, unit="shard", disable=not sys.stderr.isatty(), leave=False)
    with bar:
        if workers <= 1 or len(items) <= 1:
            for item in items:
                yield function(item)
                bar.update()
            return
        # spawned, not forked: the caller may be a rank whose process group runs threads (gloo, NCCL)
        spawned = multiprocessing.get_context("spawn")
        pool = ProcessPoolExecutor(max_workers=min(workers, len(items)), mp_context=spawned)
        try:
            for result in pool.map(function, items, chunksize=max(1, min(64, len(items) // (8 * workers)))):
                yield result
                bar.update()
        finally:  # after an error, drop the shards not started yet instead of reading them all first
            pool.shutdown(cancel_futures=True)


def _overlapping_groups(summaries: dict[str, ShardSummary]) -> list[list[str]]:
    """Shards (with keys) in key order, grouped into runs whose key ranges overlap (a chain counts)."""
    ordered = sorted((url for url, s in summaries.items() if s.min_key is not None),
                     key=lambda url: (summaries[url].min_key, summaries[url].max_key))
    groups: list[list[str]] = []
    group_max = -1
    for url in ordered:
        summary = summaries[url]
        if groups and summary.min_key <= group_max:
            groups[-1].append(url)
        else:
            groups.append([url])
        group_max = summary.max_key if len(groups[-1]) == 1 else max(group_max, summary.max_key)
    return groups


@dataclasses.dataclass
class _Union:
    """The merged keys of a group of shards: unique count, gap runs inside, duplicate examples."""

    unique_keys: int = 0
    gap_runs: int = 0
    examples: list[dict[str, Any]] = dataclasses.field(default_factory=list)


def _merge_overlapping(urls: list[str], summaries: dict[str, ShardSummary], workers: int) -> _Union:
    """Exact union of overlapping shards, their keys read again and merged bucket by bucket."""
    low = min(summaries[u].min_key for u in urls)
    high = max(summaries[u].max_key for u in urls) + 1
    buckets = max(1, math.ceil(sum(summaries[u].unique_keys for u in urls) / BUCKET_KEYS))
    bounds = np.linspace(low, high, buckets + 1).round().astype(np.int64)
    union, last = _Union(), None
    for start, stop in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
        inside = [u for u in urls if summaries[u].min_key < stop and summaries[u].max_key >= start]
        parts, owners = [np.empty(0, np.int64)], [np.empty(0, np.int32)]
        for position, keys in enumerate(_parallel(_unique_keys, inside, workers, "merging overlapping shards")):
            keys = keys[(keys >= start) & (keys < stop)]
            parts.append(keys)
            owners.append(np.full(len(keys), position, dtype=np.int32))
        keys, owners = np.concatenate(parts), np.concatenate(owners)
        order = np.argsort(keys, kind="stable")
        keys, owners = keys[order], owners[order]
        first = np.ones(len(keys), dtype=bool)
        first[1:] = keys[1:] != keys[:-1]
        unique = keys[first]
        if len(unique) == 0:
            continue
        union.unique_keys += len(unique)
        union.gap_runs += int(np.count_nonzero(np.diff(unique) > 1)) + int(last is not None and unique[0] > last + 1)
        last = int(unique[-1])
        for key in np.unique(keys[~first])[: MAX_EXAMPLES - len(union.examples)].tolist():
            holders = owners[keys == key]
            union.examples.append({"key": key, "shards": [inside[i] for i in holders.tolist()]})
    return union


def build_index(pattern: str | Sequence[str], workers: int | None = None, refresh: bool = False) -> IndexReport:
    """Index the shards of a brace pattern ('::'-joined patterns, or a list), from the cache where valid.

    Raises `DataError` when the pattern matches nothing and `ShardIndexError` for a shard that cannot be read.
    """
    urls = expand_shards(pattern)
    workers = default_workers() if workers is None else workers
    cache = ShardCache()
    summaries = {url: None if refresh else cache.get(url) for url in urls}
    todo = [url for url, summary in summaries.items() if summary is None]
    fresh: dict[str, ShardSummary] = {}
    streamed = 0
    try:
        for url, (summary, was_streamed) in zip(todo, _parallel(_scan, todo, workers, "indexing shards")):
            fresh[url] = summary
            streamed += was_streamed
    finally:  # what was read is kept even when a later shard fails or the scan is interrupted
        cache.put(fresh)
    summaries.update(fresh)
    notes = list(cache.notes)
    remote = sum(local_path(url) is None for url in urls)
    if remote:
        notes.append(f"{remote} remote shards are not cached: they are read again every time")
    unique, gaps, examples, overlapping = _key_totals(summaries, workers)
    values = list(summaries.values())
    keyed = [s for s in values if s.min_key is not None]
    return IndexReport(
        shards=len(values), samples=sum(s.samples for s in values), without_key=sum(s.without_key for s in values),
        min_key=min((s.min_key for s in keyed), default=None), max_key=max((s.max_key for s in keyed), default=None),
        unique_keys=unique, duplicates=sum(s.keyed for s in values) - unique, duplicate_examples=examples,
        gaps=gaps, scanned=len(todo), streamed=streamed, overlapping=overlapping, cache_files=sorted(map(str, cache.files)), notes=notes,
    )


def _key_totals(summaries: dict[str, ShardSummary], workers: int) -> tuple[int, int, list[dict[str, Any]], int]:
    """Unique keys, runs of missing keys in [0, data_size), duplicate examples, and the number of shards
    read again: keys shared between shards are looked for only where key ranges overlap."""
    examples = [{"key": key, "shards": [url]} for url, s in summaries.items() for key in s.duplicate_examples]
    examples = examples[:MAX_EXAMPLES]
    unique = gaps = overlapping = 0
    previous_max = -1
    for group in _overlapping_groups(summaries):
        if len(group) == 1:
            merged = _Union(summaries[group[0]].unique_keys, summaries[group[0]].gap_runs)
        else:
            merged = _merge_overlapping(group, summaries, workers)
            examples += merged.examples[: MAX_EXAMPLES - len(examples)]
            overlapping += len(group)
        unique += merged.unique_keys
        gaps += merged.gap_runs + int(summaries[group[0]].min_key > previous_max + 1)
        previous_max = max(summaries[u].max_key for u in group)
    return unique, gaps, examples, overlapping


# ---------------------------------------------------------------------------------------- command line


def format_report(report: IndexReport) -> str:
    """The report as a table for people."""
    rows = [
        ("shards", f"{report.shards:,} ({report.scanned:,} read now, {report.shards - report.scanned:,} "
                   f"from the cache{f', {report.streamed:,} streamed whole' if report.streamed else ''}"
                   f"{f', {report.overlapping:,} read again: their key ranges overlap' if report.overlapping else ''})"),
        ("samples", f"{report.samples:,}  -> --train-num-samples {report.samples}"),
        ("samples without a key", f"{report.without_key:,}"),
        ("keys", "none" if report.max_key is None else f"{report.min_key:,} .. {report.max_key:,}"),
        ("--data_size", f"{report.data_size}  (largest key + 1)"),
        ("missing keys", f"{report.missing_keys:,} of [0, {report.data_size:,}) ({report.missing_fraction:.1%}) "
                         f"in {report.gaps:,} gaps"),
        ("duplicate keys", f"{report.duplicates:,}"),
    ]
    rows += [("", f"e.g. key {e['key']} in {', '.join(e['shards'])}") for e in report.duplicate_examples]
    width = max(len(name) for name, _ in rows)
    lines = [f"{name:<{width}}  {value}" for name, value in rows]
    return "\n".join(lines + [f"note: {note}" for note in report.notes])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastclip-index",
        description="Count the samples and keys of webdataset shards (reading only their .json members) and "
                    "suggest --train-num-samples and --data_size. Results are cached beside the shards.")
    parser.add_argument("pattern", help="shards: a brace pattern such as 'data/{00000..00331}.tar', '::'-joined")
    parser.add_argument("--workers", type=int, default=None,
                        help=f"processes reading shards (default: the CPUs available, at most {MAX_DEFAULT_WORKERS})")
    parser.add_argument("--refresh", action="store_true", help="read every shard again, ignoring the cache")
    parser.add_argument("--json", action="store_true", help="print the report as one JSON object")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """The `fastclip-index` command: prints the report (a table, or JSON with --json)."""
    args = build_parser().parse_args(argv)
    if args.workers is not None and args.workers < 1:
        raise SystemExit(f"error: --workers must be >= 1, got {args.workers}")
    try:
        report = build_index(args.pattern, args.workers, args.refresh)
    except (DataError, ShardIndexError) as error:
        raise SystemExit(f"error: {error}") from None
    print(json.dumps(report.to_dict()) if args.json else format_report(report))


if __name__ == "__main__":
    main()
