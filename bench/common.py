"""The harness every benchmark shares: alternate the contenders, summarise, write bench/out/<name>.{md,json}.

Contenders run alternately (A, B, C, A, B, C, ...) rather than one block after another, so that the
drift of a shared or throttling machine spreads over all of them instead of favouring one. A result
is the min / median / max of the repetitions and the ratio of medians against a baseline.
"""

from __future__ import annotations

import json
import os
import platform
import re
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
OUT_DIR = BENCH_DIR / "out"
MIN_REPEATS = 5
# The seed's FastCLIP-v3 loss flags (with --local-loss as in its commands); --data_size comes separately.
FASTCLIP_V3_FLAGS = [
    "--local-loss", "--fastclip", "--multiply_tau", "--temperature_scheme", "global_learnable",
    "--lr_tau", "2e-4", "--lr_tau_scheduler", "step_thresh", "--rho", "6.5",
    "--gamma", "0.2", "--gamma_schedule", "cosine", "--gamma_decay_epochs", "18",
]
OPENCLIP_FLAGS = ["--local-loss", "--gather-with-grad"]  # the seed's OpenCLIP row; no-ops in one process

Metrics = dict[str, float]
Trial = Callable[[], "Metrics | float"]  # one measurement; a bare float is stored as {"value": x}
Runs = dict[str, list[Metrics]]  # contender -> one Metrics per repetition, in run order


class CommandFailed(RuntimeError):
    """A benchmarked command exited non-zero; the message ends with the tail of its output."""


# ---------------------------------------------------------------------------------------- running


def alternate(trials: Mapping[str, Trial], repeats: int = MIN_REPEATS, deadline_s: float | None = None,
              progress: Callable[[str], None] = print) -> Runs:
    """Run every trial once per round, in the given order, for `repeats` rounds.

    `deadline_s` (seconds from now) skips the rounds that the last round's duration says would end
    past it, so a benchmark with a time budget keeps whole rounds; the tables show how many ran.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    runs: Runs = {name: [] for name in trials}
    stop_at = None if deadline_s is None else time.monotonic() + deadline_s
    for round_index in range(repeats):
        round_start = time.monotonic()
        for name, trial in trials.items():
            result = trial()
            metrics = {"value": float(result)} if isinstance(result, (int, float)) else dict(result)
            runs[name].append(metrics)
            shown = " ".join(f"{k}={v:.4g}" for k, v in metrics.items())
            progress(f"[{round_index + 1}/{repeats}] {name}: {shown}")
        next_end = time.monotonic() + (time.monotonic() - round_start)
        if stop_at is not None and next_end > stop_at and round_index + 1 < repeats:
            progress(f"time budget: stopping after {round_index + 1} of {repeats} rounds")
            break
    return runs


def run_command(cmd: Sequence[str], env: Mapping[str, str] | None = None, cwd: Path = ROOT,
                timeout: float | None = None) -> str:
    """Run a command to completion and return its stdout and stderr interleaved.

    `env` entries are added to (not substituted for) this process's environment.
    """
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.run(list(cmd), cwd=cwd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=timeout)
    if proc.returncode != 0:
        tail = "\n".join(proc.stdout.splitlines()[-40:])
        raise CommandFailed(f"exit {proc.returncode}: {' '.join(cmd)}\n{tail}")
    return proc.stdout


def command_trial(cmd: Sequence[str] | Callable[[], Sequence[str]], parse: Callable[[str], Metrics],
                  env: Mapping[str, str] | None = None, timeout: float | None = None, cwd: Path = ROOT) -> Trial:
    """A trial that runs a command (or a fresh one from a factory) and parses its output into metrics.

    The metrics also get `wall_s`, the command's wall time start-up included.
    """
    def trial() -> Metrics:
        argv = cmd() if callable(cmd) else cmd
        start = time.perf_counter()
        output = run_command(argv, env=env, cwd=cwd, timeout=timeout)
        return {**parse(output), "wall_s": time.perf_counter() - start}

    return trial


def open_clip_train_command(argv: Sequence[str], python: str = sys.executable) -> list[str]:
    """Run open_clip_train's own `main` with our model configs (ViT-Tiny-32px, ...) registered first.

    Also prints the peak CUDA memory at exit when a GPU was used (open_clip_train does not log it).
    """
    code = (
        "import sys; from fastclip.models import register_model_configs; register_model_configs(); "
        f"{_PEAK_MEMORY_HOOK}"
        "from open_clip_train.main import main; main(sys.argv[1:])"
    )
    return [python, "-u", "-c", code, *argv]


def fastclip_train_command(argv: Sequence[str], python: str = sys.executable) -> list[str]:
    """Our training script, `training.main.main(argv)`, with the same peak-memory line at exit."""
    code = f"import sys; {_PEAK_MEMORY_HOOK}from training.main import main; main(sys.argv[1:])"
    return [python, "-u", "-c", code, *argv]


_PEAK_MEMORY_HOOK = (
    "import atexit, torch; atexit.register(lambda: torch.cuda.is_initialized() and print("
    "'PEAK_CUDA_BYTES', torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved(), flush=True)); "
)


def parse_peak_cuda(output: str) -> Metrics:
    """The launchers' PEAK_CUDA_BYTES line as GiB (empty when the run did not use CUDA)."""
    for line in reversed(output.splitlines()):
        if line.startswith("PEAK_CUDA_BYTES"):
            allocated, reserved = (int(x) for x in line.split()[1:3])
            return {"peak_allocated_gib": allocated / 2**30, "peak_reserved_gib": reserved / 2**30}
    return {}


# ---------------------------------------------------------------------------------- this process


def free_port() -> int:
    """A TCP port free on this host now, for a process group's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def current_rss() -> int:
    """Bytes resident now (Linux /proc), to tell what building took from what running added."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss() -> int:
    """Bytes resident at this process's high-water mark."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


# ------------------------------------------------------------------------------- convergence runs


def reuse_or_train(run_dir: Path, argv: Sequence[str], train: Callable[[], None]) -> float:
    """Seconds that the run in `run_dir` took: a finished run there (done.json) with the same `argv`
    is reused; otherwise the folder is cleared and `train()` runs it from scratch (results.jsonl is
    appended to, so an unfinished run's lines must not stay). An interrupted benchmark thus continues
    with the runs it has not finished."""
    done = run_dir / "done.json"
    if done.is_file():
        record = json.loads(done.read_text())
        if record["argv"] == list(argv):
            return record["seconds"]
    shutil.rmtree(run_dir, ignore_errors=True)
    started = time.perf_counter()
    train()
    seconds = time.perf_counter() - started
    done.write_text(json.dumps({"argv": list(argv), "seconds": seconds}))
    return seconds


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single seed)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def plot_band(ax, curves: Sequence[Sequence[float]], label: str) -> None:
    """One line per contender: the mean over seeds of per-epoch values (epochs 1..E), with a +-std band."""
    epochs = range(1, len(curves[0]) + 1)
    stats = [mean_std(values) for values in zip(*curves)]
    ax.plot(epochs, [m for m, _ in stats], "o-", ms=3, label=label)
    ax.fill_between(epochs, [m - s for m, s in stats], [m + s for m, s in stats], alpha=0.2)


def save_figure(fig, path: Path) -> None:
    """A benchmark's finished figure as a PNG (its folder made), closed afterwards."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- training log lines

# open_clip_train: "Train Epoch: 0 [ 1408/3840 (37%)] Data (t): 0.009 Batch (t): 1.889, ..." (window means)
OPEN_CLIP_TRAIN_LINE = re.compile(
    r"Train Epoch: \d+ \[\s*(\d+)/\d+ \(\d+%\)\] Data \(t\): ([\d.]+) Batch \(t\): ([\d.]+)")
# ours: "Train Epoch: 0 [ 640/1280 (50%)] Step time: 1.926s, 66.5 samples/s, ..." (window mean; the rate
# has more digits than the step time)
FASTCLIP_LINE = re.compile(r"Train Epoch: \d+ \[\s*(\d+)/\d+ \(\d+%\)\] Step time: [\d.]+s, ([\d.]+) samples/s")


def steady_windows(seen: Sequence[int], step_times: Sequence[float], batch_size: int,
                   warmup_steps: int) -> tuple[float, float]:
    """(steps, seconds) of the log windows that start after `warmup_steps`.

    Both programs log, every few steps, the samples seen so far and the mean step time of the window
    since their previous line, but open_clip_train's windows begin one step later than ours (it logs
    after step 1 as well). Dropping whole windows up to the same step leaves nearly the same steps of
    both, without the start-up (worker launch, first shard, lazy initialisation, autotuning).
    """
    ends = [s // batch_size for s in seen]
    windows = [(start, end, t) for start, end, t in zip([0, *ends], ends, step_times) if start >= warmup_steps]
    if not windows:
        raise ValueError(f"no log window starts after step {warmup_steps}: run more steps")
    return sum(end - start for start, end, _ in windows), sum((end - start) * t for start, end, t in windows)


def parse_open_clip_train_log(output: str, batch_size: int, warmup_steps: int) -> Metrics:
    """Steady samples/s and the share of step time spent waiting for data, from open_clip_train's lines."""
    lines = [(int(m[1]), float(m[2]), float(m[3])) for m in OPEN_CLIP_TRAIN_LINE.finditer(output)]
    seen = [s for s, _, _ in lines]
    steps, seconds = steady_windows(seen, [b for _, _, b in lines], batch_size, warmup_steps)
    _, data_seconds = steady_windows(seen, [d for _, d, _ in lines], batch_size, warmup_steps)
    return {"samples_per_s": steps * batch_size / seconds, "data_wait_frac": data_seconds / seconds}


def parse_fastclip_log(output: str, batch_size: int, warmup_steps: int) -> Metrics:
    """Steady samples/s from our training script's lines (one process: step time = batch / rate)."""
    lines = [(int(m[1]), batch_size / float(m[2])) for m in FASTCLIP_LINE.finditer(output)]
    steps, seconds = steady_windows([s for s, _ in lines], [t for _, t in lines], batch_size, warmup_steps)
    return {"samples_per_s": steps * batch_size / seconds}


# ------------------------------------------------------------------------------------ summarising


@dataclass(frozen=True)
class Summary:
    n: int
    min: float
    median: float
    max: float


def summarize(values: Sequence[float]) -> Summary:
    return Summary(len(values), min(values), statistics.median(values), max(values))


def metric_values(runs: Runs, contender: str, metric: str) -> list[float]:
    return [m[metric] for m in runs[contender] if metric in m]


def comparison_table(runs: Runs, metric: str, baseline: str, unit: str, digits: int = 1) -> str:
    """Markdown: one row per contender with n, min, median, max of `metric` and median / baseline median."""
    base = summarize(metric_values(runs, baseline, metric)).median
    rows = []
    for contender in runs:
        values = metric_values(runs, contender, metric)
        if not values:
            continue
        s = summarize(values)
        rows.append([contender, str(s.n), *(f"{v:.{digits}f}" for v in (s.min, s.median, s.max)),
                     f"{s.median / base:.3f}"])
    headers = ["", "n", f"min {unit}", f"median {unit}", f"max {unit}", f"median / {baseline}"]
    return markdown_table(headers, rows)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


# -------------------------------------------------------------------------------------- reporting


def machine() -> dict:
    """What the numbers are measured on; call it at the start (the load average tells whether the
    machine was shared; `write_report` adds the load average at the end)."""
    import torch

    info = {
        "cpu": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "load_average_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_line(info: Mapping) -> str:
    parts = [f"{info['cpu']}, {info['usable_cpus']} of {info['logical_cpus']} CPUs usable"]
    if info.get("gpu"):
        parts.append(f"{info['gpu']} (CUDA {info['cuda']})")
    parts.append(f"torch {info['torch']} ({info['torch_threads']} threads), Python {info['python']}")
    load = f"1-min load average {info['load_average_1m']} at start"
    if "load_average_1m_end" in info:
        load += f", {info['load_average_1m_end']} at end"
    parts.append(load)
    return "; ".join(parts)


def write_report(name: str, title: str, body: str, raw: Mapping, info: Mapping | None = None,
                 out_dir: Path = OUT_DIR) -> Path:
    """Write `out_dir/<name>.md` (one '## title' section: machine, then `body`) and `<name>.json`.

    `info` is `machine()` as taken at the start of the benchmark (taken now when not given).
    """
    info = dict(info or machine())
    info["load_average_1m_end"] = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    section = f"## {title}\n\n_{stamp}; {machine_line(info)}._\n\n{body.rstrip()}\n"
    (out_dir / f"{name}.md").write_text(section)
    (out_dir / f"{name}.json").write_text(json.dumps({"name": name, "date": stamp, "machine": info, **raw},
                                                     indent=1, default=_json_default) + "\n")
    return out_dir / f"{name}.md"


def _json_default(value: object) -> object:
    """Dataclasses (a `Summary`, a setup) as their fields; anything else JSON lacks (paths) as text."""
    return asdict(value) if is_dataclass(value) and not isinstance(value, type) else str(value)


# ------------------------------------------------------------------------------------------- data


def demo_shards(limit: int | None = 10_000, samples_per_shard: int = 2500):
    """Fashion-MNIST demo shards (`fastclip.datasets.demo.DemoData`), built once under bench/out/data.

    Each `limit` has its own folder, so benchmarks that use different sizes never rebuild each other's.
    """
    from fastclip.datasets.demo import build_demo

    folder = OUT_DIR / "data" / f"fashion-mnist-{limit or 'all'}-{samples_per_shard}"
    return build_demo(folder, samples_per_shard=samples_per_shard, limit=limit)


def runs_line(results: Sequence, minutes: float) -> str:
    """A report's line on the training its tables stand on (results with `seconds`)."""
    training = sum(r.seconds for r in results) / 60
    return (f"- {len(results)} runs, {training:.1f} min of training and evaluation in all (this invocation: "
            f"{minutes:.1f} min; finished runs are reused).")
