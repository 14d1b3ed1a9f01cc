"""Start-up: launch -> first training step, our script against open_clip_train, side by side.

Every requeue of a preempted job, every test and a newcomer's first try pay for the start. Both
programs train the same model (our ViT-Tiny-32px, registered with open_clip) on the same Fashion-MNIST
shards: one process, one loader worker, batch 128, float32 on the CPU, 15 steps, logging every step.
Runs alternate between the two (open_clip_train with webdataset 0.2.86 on its own path, as in
bench/throughput.py); each run gives the seconds from launching the interpreter to its first
"Train Epoch" line (the first step done) and the whole run's wall time. The report gives the medians
and the ratios ours / open_clip_train.

    python bench/startup.py            # 7 alternating pairs (~5 min on 2 cores); bench/out/startup.md
    python bench/startup.py --quick    # 2 pairs
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

import common
from throughput import MODEL, ensure_old_webdataset, open_clip_train_env

STEPS, BATCH = 15, 128
FIRST_STEP = "Train Epoch: 0 ["


def flags(data, logs: Path, name: str) -> list[str]:
    """The flags both programs spell the same way."""
    return ["--train-data", data.train_shards, "--train-num-samples", str(STEPS * BATCH), "--dataset-type",
            "webdataset", "--model", MODEL, "--batch-size", str(BATCH), "--workers", "1", "--precision", "fp32",
            "--device", "cpu", "--epochs", "1", "--lr", "1e-3", "--wd", "0.1", "--warmup", "5", "--seed", "0",
            "--log-every-n-steps", "1", "--save-frequency", "0", "--logs", str(logs), "--name", name,
            *common.OPENCLIP_FLAGS]


def timed(command: Sequence[str], env: dict[str, str] | None) -> common.Metrics:
    """Seconds to the first step's log line and to the end of the run."""
    started = time.perf_counter()
    process = subprocess.Popen(list(command), cwd=common.ROOT, env={**os.environ, **(env or {})},
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    first, lines = None, []
    for line in process.stdout:
        lines.append(line)
        if first is None and FIRST_STEP in line:
            first = time.perf_counter() - started
    if process.wait() != 0 or first is None:
        raise common.CommandFailed(f"exit {process.returncode}: {' '.join(command)}\n{''.join(lines[-40:])}")
    return {"first_step_s": first, "wall_s": time.perf_counter() - started}


def trials(data, logs: Path, wds_dir: Path) -> dict[str, common.Trial]:
    counter = itertools.count()
    ours = [sys.executable, "-u", str(common.ROOT / "src" / "training" / "main.py")]
    return {
        "open_clip_train": lambda: timed(common.open_clip_train_command(flags(data, logs, f"oc-{next(counter)}")),
                                         open_clip_train_env(wds_dir)),
        "ours (OpenCLIP)": lambda: timed(ours + flags(data, logs, f"ours-{next(counter)}"), None),
    }


def main(argv: Sequence[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 alternating pairs")
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args(argv)
    repeats = args.repeats or (2 if args.quick else 7)
    data, wds_dir = common.demo_shards(limit=2_500), ensure_old_webdataset()
    info = common.machine()
    with tempfile.TemporaryDirectory() as logs:
        runs = common.alternate(trials(data, Path(logs), wds_dir), repeats=repeats)
    rows = []
    theirs = {m: statistics.median(r[m] for r in runs["open_clip_train"]) for m in ("first_step_s", "wall_s")}
    for name, results in runs.items():
        medians = {m: statistics.median(r[m] for r in results) for m in theirs}
        rows.append([name, str(len(results)), *(f"{medians[m]:.2f}" for m in theirs),
                     *(f"{medians[m] / theirs[m]:.2f}" for m in theirs)])
    table = common.markdown_table(["program", "runs", "launch -> first step (s, median)", f"whole {STEPS}-step run (s)",
                                   "first step / open_clip_train's", "whole run / open_clip_train's"], rows)
    body = (f"One process, `--workers 1`, batch {BATCH}, fp32, `{MODEL}`, Fashion-MNIST shards, {STEPS} steps, "
            f"{repeats} alternating runs each:\n\n{table}\n")
    name = "startup-quick" if args.quick else "startup"
    path = common.write_report(name, "Start-up: launch to first step, against open_clip_train", body,
                               {"runs": runs}, info)
    print(path.read_text())
    return path


if __name__ == "__main__":
    main()
