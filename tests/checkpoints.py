"""Reading what a run saved, for comparisons: weights, optimizer moments and the per-sample table."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import torch

from fastclip.checkpoint import files, sharded
from fastclip.losses.state import ShardedState


def per_sample_table(path: Path) -> torch.Tensor | None:
    """The whole per-sample table of a checkpoint in sample order (read as one rank), or None."""
    checkpoint = files.peek(path)
    folder = files.per_sample_dir(path, checkpoint)
    if folder is None:
        return None
    manifest = sharded.read_manifest(folder)
    state = ShardedState(manifest["data_size"], [0.0] * len(manifest["columns"]))
    sharded.load_shard(state, folder, manifest["columns"])
    return state.table.clone()


def assert_same_training_state(got: Path, want: Path, rtol: float = 0.0, atol: float = 0.0) -> None:
    """Weights, Adam moments and per-sample state of two checkpoints agree (bit for bit by default:
    a resumed run repeats the same float operations on the same inputs)."""
    a = torch.load(got, weights_only=True, map_location="cpu")
    b = torch.load(want, weights_only=True, map_location="cpu")
    assert (a["epoch"], a["step"]) == (b["epoch"], b["step"])
    for name, value in b["state_dict"].items():
        torch.testing.assert_close(a["state_dict"][name], value, rtol=rtol, atol=atol, msg=name)
    for index, state in b["optimizer"]["state"].items():
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(a["optimizer"]["state"][index][key], state[key], rtol=rtol, atol=atol,
                                       msg=f"optimizer state {index} {key}")
    table_a, table_b = per_sample_table(got), per_sample_table(want)
    assert (table_a is None) == (table_b is None)
    if table_b is not None:
        torch.testing.assert_close(table_a, table_b, rtol=rtol, atol=atol, msg="per-sample state")


def last_step(run_dir: Path) -> int:
    """The global step of the last line of the run's metrics.jsonl (0 before the first)."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    lines = path.read_text().splitlines()
    return json.loads(lines[-1])["step"] if lines else 0


def signal_when(run_dir: Path, step: int, signum: int, pid: int | None = None,
                timeout: float = 300) -> threading.Thread:
    """A thread that sends `signum` to `pid` (this process by default) once the run logged `step`."""

    def watch() -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and last_step(run_dir) < step:
            time.sleep(0.05)
        os.kill(os.getpid() if pid is None else pid, signum)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def children(pid: int) -> list[int]:
    """Process ids whose parent is `pid` (from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


STOP_SIGNALS = {"SIGTERM": signal.SIGTERM, "SIGUSR1": signal.SIGUSR1, "SIGINT": signal.SIGINT}
