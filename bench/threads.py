"""CPU threads per rank: the start-up rule against every rank taking every core, side by side.

The training script runs on the Fashion-MNIST demo shards (ViT-Tiny-32px, FastCLIP-v3, float32 on the
CPU) as one process and as two srun-style processes (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID,
MASTER_ADDR, MASTER_PORT, as `srun python -u src/training/main.py` sets them), each with
OMP_NUM_THREADS unset (the rule of fastclip.distributed.threads picks the threads) and with
OMP_NUM_THREADS set to every usable core (what torch does when nobody sets it: each rank takes every
core). The contenders alternate (common.alternate); the rate is the steady samples/s of rank 0's log
lines, start-up windows dropped.

    python bench/threads.py            # a few minutes on 2 cores; bench/out/threads.md
    python bench/threads.py --quick    # smoke run: numbers are no evidence
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import common

MODEL = "ViT-Tiny-32px"
THREADS_LINE = re.compile(r"CPU threads per rank\s+(\d+)")
LAUNCHER_VARIABLES = ("SLURM_", "MASTER_", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "TORCHELASTIC",
                      "OMP_NUM_THREADS", "MKL_NUM_THREADS")


@dataclass(frozen=True)
class Setup:
    steps: int  # training steps per run
    log_every: int  # steps per log window; the first window (start-up) is dropped
    batch_size: int  # per rank
    workers: int  # loader workers per rank
    repeats: int
    limit: int  # Fashion-MNIST training images in the shards


FULL = Setup(steps=16, log_every=4, batch_size=32, workers=2, repeats=2, limit=4000)
QUICK = Setup(steps=4, log_every=2, batch_size=32, workers=2, repeats=1, limit=4000)


def base_env() -> dict[str, str]:
    """This environment without any launcher's or thread variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(LAUNCHER_VARIABLES)}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(common.ROOT / "src"), env.get("PYTHONPATH")]))
    return env


def train_argv(setup: Setup, data, ranks: int, logs: Path, name: str) -> list[str]:
    return [
        "--train-data", data.train_shards, "--train-num-samples", str(setup.steps * setup.batch_size * ranks),
        "--data_size", str(data.data_size), "--model", MODEL, "--batch-size", str(setup.batch_size),
        "--workers", str(setup.workers), "--epochs", "1", "--warmup", "2", "--save-frequency", "0",
        "--log-every-n-steps", str(setup.log_every), "--logs-dir", str(logs), "--name", name,
        *common.FASTCLIP_V3_FLAGS,
    ]


def launch(argv: list[str], ranks: int, omp_threads: int | None) -> str:
    """Rank 0's output of one run: `ranks` srun-style processes, OMP_NUM_THREADS as given (None: unset)."""
    port = common.free_port()
    processes = []
    for rank in range(ranks):
        env = base_env()
        if omp_threads is not None:
            env["OMP_NUM_THREADS"] = str(omp_threads)
        if ranks > 1:
            env.update(SLURM_PROCID=str(rank), SLURM_NTASKS=str(ranks), SLURM_LOCALID=str(rank),
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        processes.append(subprocess.Popen([sys.executable, "-u", "src/training/main.py", *argv], cwd=common.ROOT,
                                          env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [process.communicate()[0] for process in processes]
    for process, output in zip(processes, outputs):
        if process.returncode != 0:
            tail = "\n".join(output.splitlines()[-30:])
            raise common.CommandFailed(f"exit {process.returncode}: rank {processes.index(process)}\n{tail}")
    return outputs[0]


def trial(setup: Setup, data, ranks: int, omp_threads: int | None, logs: Path, name: str) -> common.Trial:
    runs = iter(range(10_000))

    def run() -> common.Metrics:
        output = launch(train_argv(setup, data, ranks, logs, f"{name}-{next(runs)}"), ranks, omp_threads)
        metrics = common.parse_fastclip_log(output, setup.batch_size * ranks, setup.log_every)
        threads = THREADS_LINE.search(output)
        return {**metrics, "threads": float(threads.group(1)) if threads else float("nan")}

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one short repetition: a smoke test, not evidence")
    setup = QUICK if parser.parse_args().quick else FULL
    info = common.machine()
    cores = len(os.sched_getaffinity(0))
    data = common.demo_shards(limit=setup.limit, samples_per_shard=500)
    with tempfile.TemporaryDirectory(prefix="bench-threads-") as logs:
        contenders = {}
        for ranks in (1, 2):
            label = "1 process" if ranks == 1 else f"{ranks} srun ranks"
            rule, every_core = f"{label}, rule (OMP_NUM_THREADS unset)", f"{label}, OMP_NUM_THREADS={cores}"
            contenders[rule] = trial(setup, data, ranks, None, Path(logs), f"r{ranks}")
            contenders[every_core] = trial(setup, data, ranks, cores, Path(logs), f"o{ranks}")
        runs = common.alternate(contenders, setup.repeats)
    rows = []
    names = list(runs)
    for rule, every_core in zip(names[::2], names[1::2]):
        rule_rate = common.summarize(common.metric_values(runs, rule, "samples_per_s")).median
        old_rate = common.summarize(common.metric_values(runs, every_core, "samples_per_s")).median
        for contender, rate in ((every_core, old_rate), (rule, rule_rate)):
            threads = common.metric_values(runs, contender, "threads")[0]
            rows.append([contender, f"{threads:.0f}", str(len(runs[contender])), f"{rate:.1f}",
                         f"{rate / old_rate:.2f}x"])
    body = (
        f"{MODEL}, FastCLIP-v3, batch {setup.batch_size} per rank, {setup.workers} loader workers per rank, "
        f"{setup.steps} steps per run (first {setup.log_every} dropped), {setup.repeats} alternating repetitions; "
        "samples/s over all ranks (median). The ratio is against the same launch with every rank taking "
        "every core.\n\n"
        + common.markdown_table(["launch", "threads per rank", "n", "samples/s", "vs every core"], rows)
    )
    path = common.write_report("threads", "CPU threads per rank", body, {"setup": setup, "runs": runs}, info)
    print(path.read_text())


if __name__ == "__main__":
    main()
