"""The per-sample state on disk: one raw file per rank and a manifest, written and read in chunks.

Gathering the whole (data_size x C) table onto every rank to save it costs O(data_size) memory per
rank (6.4 GB per GPU at 400M pairs). Here each rank writes its own rows to its own file and reads
back only the files that hold its rows, so neither side needs more than the rank's table plus a
chunk buffer, whatever K wrote the files and whatever K reads them.

Layout: `rank{k:05d}-of-{K:05d}.bin` holds rank k's table as raw little-endian values, row s being
sample s * K + k (rows past the data hold the initial values). `manifest.json` lists the files with
their sizes and crc32 and the table's data_size, columns and dtype.

Nothing here is collective. A save is: every rank `write_shard`, the caller gathers the returned
infos (e.g. all_gather_object), rank 0 `write_manifest`, then a barrier. A load is `load_shard` on
every rank, after an optional cheap `check_files`.
"""

from __future__ import annotations

import json
import math
import os
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from ..losses.state import ShardedState
from .files import write_atomic

FORMAT_VERSION = 1
CHUNK_BYTES = 16 * 2**20
MANIFEST = "manifest.json"
LAYOUT = "strided: sample i -> file i % world_size, row i // world_size"
_RESTART = "resume from an earlier checkpoint or start without resuming"


class StateFileError(ValueError):
    """A per-sample state file is missing, damaged or written for another run."""


def shard_file(rank: int, world_size: int) -> str:
    """The file name of rank `rank`'s rows among `world_size` files."""
    return f"rank{rank:05d}-of-{world_size:05d}.bin"


def _require_little_endian() -> None:
    """The files hold the tensors' bytes as they are in memory, which is little-endian only here."""
    if sys.byteorder != "little":
        raise RuntimeError("per-sample state files are little-endian; this host is big-endian")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _ceil_div(a: int, b: int) -> int:
    """Integer ceil(a / b), exact for any size (and for a < 0)."""
    return -(-a // b)


def _rows_per_chunk(row_bytes: int, chunk_bytes: int) -> int:
    return max(1, chunk_bytes // row_bytes)


# ---- writing ------------------------------------------------------------------------------------

def write_shard(state: ShardedState, directory: Path, *, chunk_bytes: int = CHUNK_BYTES) -> dict:
    """Write this rank's table to its own file, a chunk at a time; returns the manifest's entry.

    Each chunk is copied to the CPU on its own, so a GPU table never has a full CPU copy.
    """
    _require_little_endian()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    table = state.table
    path = directory / shard_file(state.rank, state.world_size)
    step = _rows_per_chunk(table.element_size() * state.columns, chunk_bytes)
    crc, size = 0, 0
    with open(path, "wb") as f:
        for start in range(0, state.rows, step):
            chunk = table[start : start + step].to("cpu").contiguous()
            data = memoryview(chunk.view(torch.uint8).numpy()).cast("B")
            f.write(data)
            crc, size = zlib.crc32(data, crc), size + len(data)
        f.flush()
        os.fsync(f.fileno())
    return {"file": path.name, "rank": state.rank, "rows": state.rows, "bytes": size, "crc32": crc}


def write_manifest(directory: Path, shards: list[dict], data_size: int, world_size: int,
                   columns: list[str], dtype: torch.dtype) -> None:
    """Rank 0, once every rank's `write_shard` returned: the manifest that makes the files a state.

    Written last and atomically (temporary file, fsync, rename): a directory with a manifest has
    every file the manifest lists, complete.
    """
    directory = Path(directory)
    shards = sorted(shards, key=lambda info: info["rank"])
    if [info["rank"] for info in shards] != list(range(world_size)):
        raise ValueError(f"need one shard info per rank 0..{world_size - 1}, got ranks "
                         f"{[info['rank'] for info in shards]}")
    manifest = {"format_version": FORMAT_VERSION, "data_size": data_size, "world_size": world_size,
                "columns": list(columns), "dtype": _dtype_name(dtype), "layout": LAYOUT, "shards": shards}
    write_atomic(directory / MANIFEST, lambda f: f.write(json.dumps(manifest, indent=1).encode()))


# ---- the manifest -------------------------------------------------------------------------------

def _damaged(path: Path, problem: str) -> StateFileError:
    return StateFileError(f"{path}: {problem}; the per-sample state there is damaged: {_RESTART}")


def _header_problem(manifest: object) -> str | None:
    """What makes a manifest's table description unusable, or None."""
    if not isinstance(manifest, dict):
        return "not a JSON object"
    missing = {"format_version", "data_size", "world_size", "columns", "dtype", "shards"} - manifest.keys()
    if missing:
        return f"missing entries {sorted(missing)}"
    if manifest["format_version"] != FORMAT_VERSION:
        return f"format version {manifest['format_version']!r}, this code reads {FORMAT_VERSION}"
    data_size, world, columns = manifest["data_size"], manifest["world_size"], manifest["columns"]
    if not (isinstance(data_size, int) and data_size > 0 and isinstance(world, int) and world > 0):
        return f"bad data_size {data_size!r} or world_size {world!r}"
    if not (isinstance(columns, list) and all(isinstance(c, str) for c in columns)):
        return f"columns {columns!r} are not a list of names"
    if not isinstance(getattr(torch, str(manifest["dtype"]), None), torch.dtype):
        return f"unknown dtype {manifest['dtype']!r}"
    return None


def _shards_problem(manifest: dict) -> str | None:
    """What makes a manifest's file list disagree with its table description, or None."""
    world, shards = manifest["world_size"], manifest["shards"]
    if not isinstance(shards, list) or [s.get("rank") if isinstance(s, dict) else None for s in shards] \
            != list(range(world)):
        return f"the shard list does not have one entry per rank 0..{world - 1}"
    rows = _ceil_div(manifest["data_size"], world)
    size = rows * len(manifest["columns"]) * getattr(torch, manifest["dtype"]).itemsize
    for info in shards:
        expected = {"file": shard_file(info["rank"], world), "rows": rows, "bytes": size}
        if any(info.get(key) != value for key, value in expected.items()) or not isinstance(info.get("crc32"), int):
            return f"the entry of rank {info['rank']} is inconsistent ({info}; expected {expected} and a crc32)"
    return None


def read_manifest(directory: Path) -> dict:
    """The parsed and checked manifest of a per-sample state directory."""
    path = Path(directory) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise StateFileError(f"{path} is missing: the per-sample state in {path.parent} is incomplete "
                             f"(a save that stopped before rank 0 wrote the manifest?): {_RESTART}") from None
    except (OSError, ValueError) as error:
        raise _damaged(path, f"cannot be read as JSON ({error})") from None
    problem = _header_problem(manifest) or _shards_problem(manifest)
    if problem:
        raise _damaged(path, problem)
    return manifest


def _check_size(path: Path, expected: int) -> None:
    try:
        actual = path.stat().st_size
    except FileNotFoundError:
        raise StateFileError(f"{path} is missing (listed in {path.parent / MANIFEST}): restore it, or "
                             f"{_RESTART}") from None
    if actual != expected:
        raise _damaged(path, f"{actual} bytes where the manifest lists {expected} (truncated or overwritten)")


def check_files(directory: Path) -> None:
    """Cheap check before a load, reading no data: the manifest is sane, every file it lists is
    there with its listed size. The crc32 is checked by `load_shard`, which reads the data anyway."""
    directory = Path(directory)
    for info in read_manifest(directory)["shards"]:
        _check_size(directory / info["file"], info["bytes"])


# ---- loading ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Stride:
    """Rows first, first + step, ... of an old file hold samples of this rank, at the slots
    first_slot, first_slot + slot_step, ... of its table (`count` of them in all)."""

    first: int
    step: int
    first_slot: int
    slot_step: int
    count: int


def _stride(file: int, old_world: int, rank: int, world: int, data_size: int) -> _Stride | None:
    """Where the samples of `rank` (of `world`) are in old file `file` (of `old_world`), if anywhere.

    Row s of file k holds sample i = s * K_old + k, wanted when i % K == rank: s * K_old = rank - k
    (mod K), which has solutions only when gcd(K, K_old) divides rank - k; they are one residue
    modulo K / gcd. Consecutive solutions are lcm(K, K_old) samples apart, i.e. K_old / gcd slots.
    """
    g = math.gcd(world, old_world)
    if (rank - file) % g:
        return None
    step, slot_step = world // g, old_world // g
    first = (rank - file) // g * pow(slot_step, -1, step) % step
    samples = max(0, _ceil_div(data_size - file, old_world))  # rows of file k holding real samples
    count = max(0, _ceil_div(samples - first, step))
    return _Stride(first, step, (first * old_world + file) // world, slot_step, count) if count else None


def _check_compatible(state: ShardedState, directory: Path, manifest: dict, columns: list[str]) -> None:
    path = Path(directory) / MANIFEST
    wanted = {"data_size": state.data_size, "columns": list(columns), "dtype": _dtype_name(state.table.dtype)}
    for key, value in wanted.items():
        if manifest[key] != value:
            raise StateFileError(f"{path} was written with {key} {manifest[key]!r}, this run has {value!r}: "
                                 f"resume with the settings that wrote it, or start without resuming")


def _copy_rows(chunk: torch.Tensor, start: int, stride: _Stride, table: torch.Tensor) -> None:
    """Copy the wanted rows of a chunk that starts at file row `start` into their slots."""
    first_j = max(0, _ceil_div(start - stride.first, stride.step))
    end_j = min(stride.count, _ceil_div(start + chunk.shape[0] - stride.first, stride.step))
    if end_j <= first_j:
        return
    row = stride.first + first_j * stride.step - start
    slot = stride.first_slot + first_j * stride.slot_step
    n = end_j - first_j
    source = chunk[row : row + (n - 1) * stride.step + 1 : stride.step]
    table[slot : slot + (n - 1) * stride.slot_step + 1 : stride.slot_step].copy_(source)


def _read_exactly(f: BinaryIO, view: memoryview, path: Path) -> None:
    if f.readinto(view) != len(view):
        raise _damaged(path, "ended early (truncated while being read)")


def _load_file(path: Path, info: dict, stride: _Stride, state: ShardedState, chunk_bytes: int) -> None:
    """Read one old file in full, a chunk at a time into one buffer, keeping the rows this rank owns."""
    dtype, columns = state.table.dtype, state.columns
    row_bytes = dtype.itemsize * columns
    step = _rows_per_chunk(row_bytes, chunk_bytes)
    buffer = bytearray(step * row_bytes)
    crc = 0
    with open(path, "rb") as f:
        for start in range(0, info["rows"], step):
            rows = min(step, info["rows"] - start)
            view = memoryview(buffer)[: rows * row_bytes]
            _read_exactly(f, view, path)
            crc = zlib.crc32(view, crc)
            chunk = torch.frombuffer(buffer, dtype=torch.uint8, count=len(view)).view(dtype).view(rows, columns)
            _copy_rows(chunk, start, stride, state.table)
    if crc != info["crc32"]:
        raise _damaged(path, f"crc32 {crc:08x} where the manifest lists {info['crc32']:08x}")


def needed_shards(state: ShardedState, old_world: int) -> dict[int, _Stride]:
    """The shards of a table written by `old_world` ranks that hold rows of this rank (shard k when
    k = rank mod gcd(K, K_old)), each with where those rows are."""
    strides = {k: _stride(k, old_world, state.rank, state.world_size, state.data_size) for k in range(old_world)}
    return {k: stride for k, stride in strides.items() if stride is not None}


def copy_shard_rows(state: ShardedState, rows: torch.Tensor, stride: _Stride) -> None:
    """Copy this rank's rows out of one old rank's whole table held in memory (a loaded state dict's;
    only the rows `stride` names are read, so a memory-mapped table is read no further)."""
    _copy_rows(rows, 0, stride, state.table)


def load_shard(state: ShardedState, directory: Path, columns: list[str], *,
               chunk_bytes: int = CHUNK_BYTES) -> None:
    """Fill this rank's rows (for the current K and rank) from files written with any K.

    Reads only the files that hold some of this rank's samples (file k of K_old when
    k = rank mod gcd(K, K_old)), each in full and in chunks, so memory stays at the table plus one
    chunk. Table rows past the data keep their values. Missing or cut files are refused before any
    row changes, but a checksum is known only once its file is read: after a StateFileError, do
    not train on the table.
    """
    _require_little_endian()
    if len(columns) != state.columns:
        raise ValueError(f"{len(columns)} column names for a state of {state.columns} columns")
    directory = Path(directory)
    manifest = read_manifest(directory)
    _check_compatible(state, directory, manifest, columns)
    strides = needed_shards(state, manifest["world_size"])
    needed = [info for info in manifest["shards"] if info["rank"] in strides]
    for info in needed:  # a missing or cut file is found before any row is overwritten
        _check_size(directory / info["file"], info["bytes"])
    for info in needed:
        _load_file(directory / info["file"], info, strides[info["rank"]], state, chunk_bytes)
