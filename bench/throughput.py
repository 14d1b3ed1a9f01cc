"""CPU training throughput: open_clip_train against our script (OpenCLIP and FastCLIP-v3), same setup.

All three train the same model (our ViT-Tiny-32px, registered with open_clip) on the same Fashion-MNIST
webdataset shards, batch 128, float32 on the CPU, one process with one loader worker. open_clip_train
runs its own `main` through a launcher that only registers our model configs first, with webdataset
0.2.86 on its path (open_clip_train 3.3.0 fails on webdataset 1.x: KeyError 'fname').

Training throughput is the steady state read from each program's log lines: both log every
`log_every` steps the mean step time of the window since their previous line; the windows that begin
before step `log_every` (start-up, first shard, worker launch) are dropped and the rate is samples /
time over the others (`common.steady_windows`). The data pipelines are also timed alone: decode +
augment + tokenise of one loader in one thread (as in a DataLoader worker), the first batches dropped.

    python bench/throughput.py            # ~5 min on 2 idle cores (27 min shared, load 5); bench/out/throughput.md
    python bench/throughput.py --quick    # smoke run (one repetition, few steps): numbers are no evidence
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Sequence

import common

WDS_OLD = common.BENCH_DIR / ".deps" / "wds-0.2.86"
MODEL = "ViT-Tiny-32px"
BASELINE = "open_clip_train"
PIPELINE_TAG = "PIPELINE_RESULT"


@dataclass(frozen=True)
class Setup:
    steps: int  # training steps per run
    log_every: int  # steps per log window
    batch_size: int
    repeats: int
    pipeline_batches: int  # timed batches of the data-pipeline benchmark
    pipeline_warmup: int  # batches dropped before timing (shard open, shuffle buffer fill)
    limit: int  # Fashion-MNIST training images in the shards


FULL = Setup(steps=60, log_every=10, batch_size=128, repeats=5, pipeline_batches=40, pipeline_warmup=3, limit=10_000)
QUICK = Setup(steps=8, log_every=2, batch_size=128, repeats=1, pipeline_batches=8, pipeline_warmup=2, limit=10_000)


# ------------------------------------------------------------------------------------ dependencies


def ensure_old_webdataset() -> Path:
    """webdataset 0.2.86 in bench/.deps for open_clip_train's process only; installed on first use."""
    if not (WDS_OLD / "webdataset").is_dir():
        common.run_command([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target",
                            str(WDS_OLD), "webdataset==0.2.86"])
    return WDS_OLD


def open_clip_train_env(wds_dir: Path) -> dict[str, str]:
    return {"PYTHONPATH": os.pathsep.join(p for p in (str(wds_dir), os.environ.get("PYTHONPATH")) if p)}


# ---------------------------------------------------------------------------------------- training


def train_flags(data, setup: Setup, logs: Path, name: str) -> list[str]:
    """The flags both programs spell the same way."""
    return [
        "--train-data", data.train_shards, "--train-num-samples", str(setup.steps * setup.batch_size),
        "--dataset-type", "webdataset", "--model", MODEL, "--batch-size", str(setup.batch_size),
        "--workers", "1", "--precision", "fp32", "--device", "cpu", "--epochs", "1", "--lr", "1e-3",
        "--wd", "0.1", "--warmup", "10", "--seed", "0", "--log-every-n-steps", str(setup.log_every),
        "--save-frequency", "0", "--logs", str(logs), "--name", name,
    ]


def training_trials(data, setup: Setup, logs: Path, wds_dir: Path) -> dict[str, common.Trial]:
    """The three contenders; each run gets a fresh run name (open_clip_train refuses an existing one)."""
    counter = itertools.count()
    our_script = [sys.executable, "-u", str(common.ROOT / "src" / "training" / "main.py")]
    v3_flags = common.FASTCLIP_V3_FLAGS + ["--data_size", str(data.data_size)]

    def flags(prefix: str) -> list[str]:
        return train_flags(data, setup, logs, f"{prefix}-{next(counter)}")

    def parse_theirs(output: str) -> common.Metrics:
        return common.parse_open_clip_train_log(output, setup.batch_size, setup.log_every)

    def parse_ours(output: str) -> common.Metrics:
        return common.parse_fastclip_log(output, setup.batch_size, setup.log_every)

    return {
        BASELINE: common.command_trial(lambda: common.open_clip_train_command(flags("oc") + common.OPENCLIP_FLAGS),
                                       parse_theirs, env=open_clip_train_env(wds_dir)),
        "ours OpenCLIP": common.command_trial(lambda: our_script + flags("openclip") + common.OPENCLIP_FLAGS,
                                              parse_ours),
        "ours FastCLIP-v3": common.command_trial(lambda: our_script + flags("v3") + v3_flags, parse_ours),
    }


# ----------------------------------------------------------------------------------- data pipeline


def pipeline_trials(data, setup: Setup, wds_dir: Path) -> dict[str, common.Trial]:
    """Each loader timed in a child process (open_clip_train's needs webdataset 0.2.86 on its path)."""
    def child(loader: str) -> list[str]:
        return [sys.executable, "-u", str(Path(__file__).resolve()), "--pipeline-child", loader,
                "--shards", data.train_shards, "--data-size", str(data.data_size),
                "--batch-size", str(setup.batch_size), "--batches", str(setup.pipeline_batches),
                "--warmup", str(setup.pipeline_warmup)]

    return {
        BASELINE: common.command_trial(child(BASELINE), parse_pipeline, env=open_clip_train_env(wds_dir)),
        "ours": common.command_trial(child("ours"), parse_pipeline),
    }


def parse_pipeline(output: str) -> common.Metrics:
    line = next(line for line in output.splitlines() if line.startswith(PIPELINE_TAG))
    return json.loads(line[len(PIPELINE_TAG):])


def our_batches(shards: str, preprocess, tokenizer, batch_size: int, data_size: int) -> Iterator:
    from fastclip.data.loader import build_train_loader

    loader = build_train_loader(shards, preprocess, tokenizer, batch_size, num_samples=10**9, workers=0,
                                data_size=data_size)
    return (batch["image"] for batch in loader)


def open_clip_train_batches(shards: str, preprocess, tokenizer, batch_size: int, num_batches: int) -> Iterator:
    from open_clip_train.data import get_wds_dataset

    args = argparse.Namespace(
        train_data=shards, train_num_samples=num_batches * batch_size, dataset_resampled=False,
        train_data_upsampling_factors=None, seed=0, batch_size=batch_size, workers=0, world_size=1,
    )
    info = get_wds_dataset(args, preprocess, is_train=True, epoch=0, tokenizer=tokenizer)
    info.set_epoch(0)
    return (images for images, _ in info.dataloader)


def time_pipeline(loader: str, shards: str, data_size: int, batch_size: int, batches: int, warmup: int) -> float:
    """Images/s of one loader in one thread, the first `warmup` batches not counted."""
    import torch

    from fastclip.models import build_model

    torch.set_num_threads(1)  # what a DataLoader worker process gets
    bundle = build_model(MODEL)
    if loader == "ours":
        stream = our_batches(shards, bundle.preprocess_train, bundle.tokenizer, batch_size, data_size)
    else:
        stream = open_clip_train_batches(shards, bundle.preprocess_train, bundle.tokenizer, batch_size,
                                         warmup + batches)
    for _ in range(warmup):
        next(stream)
    start = time.perf_counter()
    images = sum(next(stream).shape[0] for _ in range(batches))
    return images / (time.perf_counter() - start)


# ---------------------------------------------------------------------------------------- reporting


def report(setup: Setup, train_runs: common.Runs, pipe_runs: common.Runs, quick: bool, info: dict) -> Path:
    body = "\n\n".join([
        "Training: ViT-Tiny-32px on Fashion-MNIST shards (32 px), batch "
        f"{setup.batch_size}, fp32, CPU, 1 process, 1 loader worker, {setup.steps} steps per run, "
        f"{setup.repeats} alternating repetitions. Samples/s: steady state from the programs' own log "
        f"lines (mean step time of each {setup.log_every}-step window; the windows that begin before step "
        f"{setup.log_every}, with the start-up, are dropped). open_clip_train's share of step time spent "
        "waiting for data is in the JSON (`data_wait_frac`).",
        common.comparison_table(train_runs, "samples_per_s", BASELINE, "samples/s"),
        "Whole process wall time, start-up and checkpoint included (seconds):",
        common.comparison_table(train_runs, "wall_s", BASELINE, "s"),
        f"Data pipeline alone (decode + augment + tokenise, one thread as in one loader worker, "
        f"{setup.pipeline_batches} batches of {setup.batch_size} after {setup.pipeline_warmup} dropped):",
        common.comparison_table(pipe_runs, "images_per_s", BASELINE, "images/s"),
    ])
    if quick:
        body = "**--quick smoke run: one repetition of a few steps; these numbers are no evidence.**\n\n" + body
    raw = {"setup": asdict(setup), "quick": quick, "training": train_runs, "pipeline": pipe_runs}
    return common.write_report("throughput", "CPU throughput vs open_clip_train", body, raw, info)


def run(setup: Setup, quick: bool) -> Path:
    info = common.machine()
    data = common.demo_shards(setup.limit)
    wds_dir = ensure_old_webdataset()
    logs = Path(tempfile.mkdtemp(prefix="throughput-", dir=common.OUT_DIR))
    try:
        train_runs = common.alternate(training_trials(data, setup, logs, wds_dir), setup.repeats)
    finally:
        shutil.rmtree(logs, ignore_errors=True)
    pipe_runs = common.alternate(pipeline_trials(data, setup, wds_dir), setup.repeats)
    path = report(setup, train_runs, pipe_runs, quick, info)
    print(path.read_text())
    return path


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run in under a minute")
    parser.add_argument("--repeats", type=int, default=None, help=f"alternating repetitions (default {FULL.repeats})")
    parser.add_argument("--pipeline-child", choices=(BASELINE, "ours"), help=argparse.SUPPRESS)
    for flag in ("--shards", "--data-size", "--batch-size", "--batches", "--warmup"):  # child only
        parser.add_argument(flag, type=str if flag == "--shards" else int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.pipeline_child:
        rate = time_pipeline(args.pipeline_child, args.shards, args.data_size, args.batch_size, args.batches,
                             args.warmup)
        print(PIPELINE_TAG + json.dumps({"images_per_s": rate}), flush=True)
        return
    setup = QUICK if args.quick else FULL
    if args.repeats is not None:
        setup = Setup(**{**asdict(setup), "repeats": args.repeats})
    run(setup, args.quick)


if __name__ == "__main__":
    main()
