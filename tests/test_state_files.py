"""Per-rank state files on real gloo processes: write with K, read with K', damaged files refused."""

from __future__ import annotations

import json
import shutil
import zlib
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from multiprocess import spawn

from fastclip.checkpoint.sharded import (MANIFEST, StateFileError, _stride, check_files, load_shard,
                                         read_manifest, shard_file, write_manifest, write_shard)
from fastclip.distributed import comm
from fastclip.losses.state import ShardedState

N = 13  # divisible by none of the K used: every layout has ragged shards
INITIAL = (0.0, 0.07, -1.0)
COLUMNS = ["u1", "u2", "tau"]
SENTINEL = 999.0  # what writers leave in rows past the data: a reader must never take it
WRITE_CHUNK = 40  # 3 rows of 12 bytes per chunk
READ_CHUNK = 28  # 2 rows: chunks that do not line up with the writer's
WRITTEN_WORLDS = (1, 2, 3, 4)


def values() -> torch.Tensor:
    """Every sample's values: the same in every process."""
    return torch.randn(N, len(INITIAL), generator=torch.Generator().manual_seed(7))


def save(directory: Path) -> None:
    """What the caller of the module does: every rank its file, rank 0 the manifest once all are written."""
    world, rank = comm.world_size(), comm.rank()
    state = ShardedState(N, INITIAL)
    state.table.fill_(SENTINEL)
    owned = torch.arange(rank, N, world)
    state.table[: len(owned)] = values()[owned]
    info = write_shard(state, directory, chunk_bytes=WRITE_CHUNK)
    infos: list = [None] * world
    dist.all_gather_object(infos, info)
    if rank == 0:
        write_manifest(directory, infos, N, world, COLUMNS, state.table.dtype)
    dist.barrier()


def expected_table(world: int, rank: int) -> torch.Tensor:
    """Sample i on rank i % K' at row i // K'; rows past the data keep the initial values."""
    table = torch.tensor(INITIAL).repeat(-(-N // world), 1)
    owned = torch.arange(rank, N, world)
    table[: len(owned)] = values()[owned]
    return table


def load_and_check(directories: list[Path]) -> None:
    for directory in directories:
        state = ShardedState(N, INITIAL)
        load_shard(state, directory, COLUMNS, chunk_bytes=READ_CHUNK)
        assert torch.equal(state.table, expected_table(comm.world_size(), comm.rank())), directory


def load_without_unneeded_files(source: Path, scratch: Path) -> None:
    """Each rank of 2 loads from its own copy of K=4 files that lacks those it should not read
    (k != rank mod gcd(2, 4))."""
    rank, world = comm.rank(), comm.world_size()
    old_world = read_manifest(source)["world_size"]
    mine = scratch / f"rank{rank}"
    shutil.copytree(source, mine)
    for k in range(old_world):
        if k % world != rank:
            (mine / shard_file(k, old_world)).unlink()
    load_and_check([mine])


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> dict[int, Path]:
    root = tmp_path_factory.mktemp("state")
    for world in WRITTEN_WORLDS:
        spawn(world, save, root / f"k{world}")
    return {world: root / f"k{world}" for world in WRITTEN_WORLDS}


def test_files_hold_the_raw_rows_and_the_manifest_describes_them(written):
    manifest = read_manifest(written[2])
    assert (manifest["data_size"], manifest["world_size"], manifest["columns"]) == (N, 2, COLUMNS)
    assert manifest["dtype"] == "float32" and manifest["layout"].startswith("strided")
    for rank, info in enumerate(manifest["shards"]):
        data = (written[2] / info["file"]).read_bytes()
        table = torch.frombuffer(bytearray(data), dtype=torch.float32).view(-1, len(INITIAL))
        owned = torch.arange(rank, N, 2)
        assert torch.equal(table[: len(owned)], values()[owned])
        assert (info["rows"], info["bytes"], info["crc32"]) == (7, len(data), zlib.crc32(data))


def test_reads_with_one_process(written):
    load_and_check([written[1], written[2]])  # 1 -> 1, 2 -> 1 (no process group: K = 1)


def load_on_two(written: dict[int, Path], scratch: Path) -> None:
    load_and_check([written[1], written[2], written[3], written[4]])  # 1, 2, 3, 4 -> 2
    load_without_unneeded_files(written[4], scratch)


def test_reads_with_two_processes(written, tmp_path):
    spawn(2, load_on_two, written, tmp_path)


def test_reads_with_three_processes(written):
    spawn(3, load_and_check, [written[2]])  # 2 -> 3


def test_strides_cover_exactly_the_owned_samples():
    """The arithmetic behind the reads, against a brute-force listing for many K, K' and n."""
    for n, world, old_world in ((n, k, ko) for n in (1, 5, 13, 24) for k in range(1, 7) for ko in range(1, 7)):
        for rank in range(world):
            found = {}
            for file in range(old_world):
                stride = _stride(file, old_world, rank, world, n)
                for j in range(stride.count if stride else 0):
                    found[file, stride.first + j * stride.step] = stride.first_slot + j * stride.slot_step
            wanted = {(i % old_world, i // old_world): i // world for i in range(n) if i % world == rank}
            assert found == wanted, (n, world, old_world, rank)


# ---- damaged or mismatched files, read by one process (world size 1: it needs every file) --------

@pytest.fixture
def copy(written, tmp_path) -> Path:
    return Path(shutil.copytree(written[2], tmp_path / "copy"))


def load_one(directory: Path, columns: list[str] = COLUMNS, data_size: int = N,
             dtype: torch.dtype = torch.float32) -> None:
    load_shard(ShardedState(data_size, INITIAL, dtype=dtype), directory, columns, chunk_bytes=READ_CHUNK)


def test_truncated_file(copy):
    path = copy / shard_file(1, 2)
    path.write_bytes(path.read_bytes()[:-4])
    for check in (check_files, load_one):
        with pytest.raises(StateFileError, match=f"{path.name}.*truncated"):
            check(copy)


def test_flipped_byte_fails_the_checksum(copy):
    path = copy / shard_file(0, 2)
    data = bytearray(path.read_bytes())
    data[17] ^= 0x40
    path.write_bytes(data)
    check_files(copy)  # sizes are right: only reading the data can tell
    with pytest.raises(StateFileError, match=f"{path.name}: crc32"):
        load_one(copy)


def test_missing_file_is_refused_before_any_row_changes(copy):
    (copy / shard_file(1, 2)).unlink()
    with pytest.raises(StateFileError, match=f"{shard_file(1, 2)} is missing"):
        check_files(copy)
    state = ShardedState(N, INITIAL)
    with pytest.raises(StateFileError, match=f"{shard_file(1, 2)} is missing"):
        load_shard(state, copy, COLUMNS)
    assert torch.equal(state.table, torch.tensor(INITIAL).repeat(N, 1))


def test_missing_manifest(copy):
    (copy / MANIFEST).unlink()
    for check in (check_files, load_one):
        with pytest.raises(StateFileError, match=f"{MANIFEST} is missing.*incomplete"):
            check(copy)


def test_damaged_manifest(copy):
    (copy / MANIFEST).write_text("{")
    with pytest.raises(StateFileError, match="cannot be read as JSON"):
        check_files(copy)


def test_manifest_with_wrong_sizes(copy):
    manifest = read_manifest(copy)
    manifest["shards"][0]["bytes"] += 1
    (copy / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(StateFileError, match="entry of rank 0 is inconsistent"):
        check_files(copy)


def test_columns_mismatch(copy):
    with pytest.raises(StateFileError, match=r"manifest.json was written with columns \['u1', 'u2', 'tau'\]"):
        load_one(copy, columns=["u1", "u2", "c1"])


def test_data_size_mismatch(copy):
    with pytest.raises(StateFileError, match="written with data_size 13, this run has 14"):
        load_one(copy, data_size=N + 1)


def test_dtype_mismatch(copy):
    with pytest.raises(StateFileError, match="written with dtype 'float32', this run has 'float64'"):
        load_one(copy, dtype=torch.float64)
