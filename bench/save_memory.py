"""Saving and loading the per-sample state: peak extra memory per rank, gathered table vs per-rank files.

Before, a save all-gathered every shard onto every rank, put the rows in global order, copied them to
the CPU (ShardedState.state_dict) and rank 0 torch.save'd the dense (n x C) table; a load torch.load'ed
the dense table on every rank and kept its rows. Now every rank writes its own rows to its own file
and reads only the files holding its rows (fastclip.checkpoint.sharded), a chunk at a time.

Each measurement is a fresh pair of gloo processes of 1 thread: resident memory after building the
state table, then the peak (ru_maxrss, a high-water mark) after the operation; their difference is
the operation's extra memory. Loads are measured at K = 2 from files written at K = 2 and at K = 1.

    python bench/save_memory.py           # 50M pairs x 4 columns (v0/v1/v3), 30M x 10 (v2)
    python bench/save_memory.py --quick   # 2M pairs x 4 columns, K = 2 only, < 1 min
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from common import current_rss, machine, markdown_table, peak_rss, write_report
from fastclip.checkpoint.sharded import load_shard, write_manifest, write_shard
from fastclip.distributed import comm
from fastclip.losses.state import ShardedState
from ranks import run_on_ranks
from tables import human_bytes

WORLD = 2
FILL_ROWS = 1 << 12  # the table is filled in pieces, so that building it leaves no high-water mark above it
SCHEMES = {"v0/v1/v3": 4, "v2": 10}  # columns per pair
FULL_SIZES = {"v0/v1/v3": 50_000_000, "v2": 30_000_000}  # v2 smaller: the gather's copies stay under ~12 GB
QUICK_SIZES = {"v0/v1/v3": 2_000_000}
DENSE_FILE = "dense.pt"


# ---- one measured operation on every rank -------------------------------------------------------

def _barrier() -> None:
    if comm.world_size() > 1:
        dist.barrier()


def built_state(data_size: int, columns: int) -> ShardedState:
    """A state whose sample i holds values of i only, so files written with any K hold the same data."""
    state = ShardedState(data_size, [0.0] * columns)
    for start in range(0, state.rows, FILL_ROWS):
        samples = torch.arange(start, min(start + FILL_ROWS, state.rows)) * state.world_size + state.rank
        values = (samples[:, None] * columns + torch.arange(columns)) % 1_000_003
        state.table[start : start + len(samples)] = values
    return state


def column_names(columns: int) -> list[str]:
    return [f"c{j}" for j in range(columns)]


def gather_dense(state: ShardedState) -> torch.Tensor:
    """What ShardedState.state_dict did: every shard on every rank, in global order, copied to the CPU."""
    shards = comm.all_gather_no_grad(state.table)
    by_slot = shards.view(state.world_size, state.rows, state.columns).transpose(0, 1)
    return by_slot.reshape(-1, state.columns)[: state.data_size].to("cpu", copy=True)


def save_gathered(state: ShardedState, directory: Path) -> None:
    dense = gather_dense(state)
    if state.rank == 0:
        torch.save(dense, directory / DENSE_FILE)
    _barrier()


def load_gathered(state: ShardedState, directory: Path) -> None:
    """What the load did: the dense table on every rank, which keeps rows rank, rank + K, ..."""
    dense = torch.load(directory / DENSE_FILE, map_location="cpu", weights_only=True)
    mine = dense[state.rank :: state.world_size]
    state.table[: mine.shape[0]] = mine


def save_files(state: ShardedState, directory: Path) -> None:
    target = directory / f"files-k{state.world_size}"
    info = write_shard(state, target)
    infos: list = [info]
    if state.world_size > 1:
        infos = [None] * state.world_size
        dist.all_gather_object(infos, info)
    if state.rank == 0:
        write_manifest(target, infos, state.data_size, state.world_size, column_names(state.columns),
                       state.table.dtype)
    _barrier()


def load_files_from(old_world: int) -> Callable[[ShardedState, Path], None]:
    def load(state: ShardedState, directory: Path) -> None:
        load_shard(state, directory / f"files-k{old_world}", column_names(state.columns))
    return load


OPERATIONS: dict[str, Callable[[ShardedState, Path], None]] = {
    "save gathered": save_gathered, "save files": save_files, "load gathered": load_gathered,
    "load files from K=2": load_files_from(2), "load files from K=1": load_files_from(1),
}


def measure_rank(operation: str, data_size: int, columns: int, directory: str) -> dict:
    """On one rank of a fresh process group: build the table, run the operation, report the peak."""
    loading = operation.startswith("load")
    state = ShardedState(data_size, [0.0] * columns) if loading else built_state(data_size, columns)
    _barrier()
    built, peak_before = current_rss(), peak_rss()
    start = time.perf_counter()
    OPERATIONS[operation](state, Path(directory))
    wall = time.perf_counter() - start
    return {"rank": comm.rank(), "table_bytes": state.table.numel() * state.table.element_size(),
            "rss_built": built, "peak_before": peak_before, "peak_after": peak_rss(), "wall_s": wall,
            "checksum": float(torch.sum(state.table, dtype=torch.float64))}


# ---- the runs -----------------------------------------------------------------------------------

# (operation, K), in order: a load reads what the saves before it wrote; the K=1 save writes the
# files that the K-changed load reads. --quick skips that pair (each run starts two processes).
QUICK_RUNS = (("save gathered", WORLD), ("save files", WORLD), ("load gathered", WORLD),
              ("load files from K=2", WORLD))
FULL_RUNS = (*QUICK_RUNS, ("save files", 1), ("load files from K=1", WORLD))


def check_loads(runs: list[dict]) -> None:
    """Every load must give each rank the rows that the K=2 save had on that rank."""
    saved = next([r["checksum"] for r in run["ranks"]] for run in runs if run["operation"] == "save gathered")
    for run in runs:
        if run["operation"].startswith("load") and [r["checksum"] for r in run["ranks"]] != saved:
            raise AssertionError(f"{run['operation']} loaded other values than were saved")


def measure_scheme(columns: int, data_size: int, plan: tuple[tuple[str, int], ...]) -> list[dict]:
    """The runs of `plan` on fresh processes, sharing one folder of files."""
    with tempfile.TemporaryDirectory(prefix="save_memory-") as directory:
        runs = [{"operation": op, "K": k, "ranks": run_on_ranks(k, measure_rank, op, data_size, columns, directory)}
                for op, k in plan]
    check_loads(runs)
    return runs


ROW_LABELS = {
    "save gathered": ("save", "gather (before): all-gather + rank 0 torch.save"),
    "save files": ("save", "per-rank files (now): write_shard + manifest"),
    "load gathered": ("load", "gather (before): torch.load dense + keep own rows"),
    "load files from K=2": ("load, same K (2 -> 2)", "per-rank files (now): load_shard"),
    "load files from K=1": ("load, K changed (1 -> 2)", "per-rank files (now): load_shard"),
}


def table_rows(scheme: str, columns: int, data_size: int, runs: list[dict]) -> list[list[str]]:
    rows = []
    for run in (r for r in runs if r["K"] == WORLD):
        ranks = run["ranks"]
        own = max(r["table_bytes"] for r in ranks)
        extra = max(r["peak_after"] - r["rss_built"] for r in ranks)
        operation, method = ROW_LABELS[run["operation"]]
        rows.append([f"{scheme}: {data_size / 1e6:g}M x {columns}", operation, method, human_bytes(own),
                     human_bytes(extra), f"{extra / own:.3f}", f"{max(r['wall_s'] for r in ranks):.2f}"])
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="2M pairs x 4 columns, no K-changed load")
    args = p.parse_args(argv)
    sizes, plan = (QUICK_SIZES, QUICK_RUNS) if args.quick else (FULL_SIZES, FULL_RUNS)
    info = machine()
    results = {scheme: measure_scheme(SCHEMES[scheme], n, plan) for scheme, n in sizes.items()}
    rows = [row for scheme, runs in results.items()
            for row in table_rows(scheme, SCHEMES[scheme], sizes[scheme], runs)]
    headers = ["state (pairs x float32 columns)", "operation", "method", "per-rank own table",
               "peak extra RSS per rank", "extra / own table", "wall s (max over ranks)"]
    body = "\n\n".join([
        f"K = {WORLD} gloo processes of 1 thread on the CPU, a fresh pair per row. Peak extra RSS: "
        "ru_maxrss after the operation minus the resident memory after building the table (max over ranks). "
        "Files go to the local disk; the per-rank writer fsyncs, the old torch.save did not; loads read from "
        "the page cache. The K = 1 -> 2 load reads a file written by one process (all rows on one rank).",
        markdown_table(headers, rows),
    ])
    raw = {"sizes": sizes, "columns": SCHEMES, "results": results}
    path = write_report("save_memory", "Saving and loading the per-sample state: memory per rank", body, raw, info)
    print(path.read_text())


if __name__ == "__main__":
    main()
