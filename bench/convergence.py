"""Convergence at small batch: zero-shot top-1 per epoch of OpenCLIP, SigLIP and FastCLIP-v0..v3.

The paper's claim is that FastCLIP's global contrastive losses (moving-average estimators `u` of each
pair's contrastive denominator) train better than OpenCLIP's mini-batch loss when the batch is small.
SigLIP (open_clip_train's `--siglip`: a sigmoid loss per image-text pair, no softmax over the batch)
is the second baseline. This trains every version with the README's flags, and SigLIP with its own,
at global batch 64 and 256 (one process, so the batch is the global batch), several seeds, the same
epochs and learning-rate schedule for all, on two real data sets:

- Fashion-MNIST (the demo data): the first `limit` training and test images (build_demo's `limit`);
- scikit-learn's handwritten digits (`fastclip.datasets.digits`): 1,297 training pairs, 500 test images.

Every run goes through the training script (`training.main.main`, in-process: no interpreter or
import start-up per run) with `--zeroshot-frequency 1`, so `logs/NAME/results.jsonl` holds one
zero-shot evaluation per epoch. The report is the final top-1 (mean +- std over seeds) per
(data set, batch, version), the final temperature, and curves (mean with a +-std band) in
docs/img/convergence_<data set>.png.

    python bench/convergence.py            # the full run: 72 runs, ~43 min on 2 shared cores (load 2-8)
    python bench/convergence.py --quick    # smoke test (< 2 min): 1 seed, tiny subset, batch 64

Finished runs are kept and reused when the same command is run again (a run is redone when its
flags changed or it did not finish), so an interrupted benchmark continues where it stopped.
Needs scikit-learn and matplotlib.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch
from common import (
    OUT_DIR,
    ROOT,
    demo_shards,
    markdown_table,
    mean_std,
    plot_band,
    read_jsonl,
    reuse_or_train,
    runs_line,
    save_figure,
    write_report,
)

from fastclip.datasets.demo import DemoData
from fastclip.datasets.digits import build_digits
from training.main import main as train

TOP1 = "imagenet-zeroshot-val-top1"
CHANCE = 0.1  # both data sets have 10 balanced classes
# Loss flags of the README's versions table (the seed commands also pass --local-loss to FastCLIP).
VERSIONS: dict[str, list[str]] = {
    "OpenCLIP": ["--local-loss", "--gather-with-grad"],
    "FastCLIP-v0": ["--local-loss", "--fastclip", "--temperature_scheme", "global_learnable"],
    "FastCLIP-v1": ["--local-loss", "--fastclip", "--temperature_scheme", "global_constant"],
    "FastCLIP-v2": ["--local-loss", "--fastclip", "--temperature_scheme", "individual_learnable",
                    "--lr_tau", "0.0133", "--lr_tau_scheduler", "const", "--temperature", "0.03", "--rho", "7.0"],
    "FastCLIP-v3": ["--local-loss", "--fastclip", "--multiply_tau", "--temperature_scheme", "global_learnable",
                    "--lr_tau", "2e-4", "--lr_tau_scheduler", "step_thresh", "--rho", "6.5"],
}
# What this benchmark trains: the baselines first, then FastCLIP's versions. SigLIP stays out of VERSIONS,
# which bench/fonts.py trains too. `--siglip` also builds the model with a logit bias (-10) and tau 0.1.
BASELINES: dict[str, list[str]] = {"OpenCLIP": VERSIONS["OpenCLIP"], "SigLIP": ["--siglip"]}
CONTENDERS: dict[str, list[str]] = {**BASELINES, **VERSIONS}


@dataclass(frozen=True)
class Optim:
    """One optimiser setting for every version and batch, so that only the loss differs.

    lr 1e-3 comes from a pilot (seed 0, OpenCLIP and FastCLIP-v3, both batches, on the same test
    folders: there is no separate validation split): the demo's 2e-3 left digits at chance at batch
    256 within 10 epochs, 4e-3 made OpenCLIP collapse at batch 64, and 1e-3 learned on both data sets
    and matched 2e-3 on Fashion-MNIST. wd 0.1 is the demo's. Warmup is a fraction of the run, since
    the paper's 10,000 steps would exceed these runs' few hundred.
    """

    lr: float = 1e-3
    wd: float = 0.1
    warmup_fraction: float = 0.1
    gamma: float = 0.2  # the paper's; gamma decays (cosine) over the first half of the epochs


@dataclass(frozen=True)
class DatasetSpec:
    name: str  # "fashion-mnist" or "digits"
    epochs: int
    limit: int | None = None  # Fashion-MNIST only: first `limit` training and test images


@dataclass(frozen=True)
class Scale:
    datasets: tuple[DatasetSpec, ...]
    batches: tuple[int, ...]
    seeds: tuple[int, ...]


# Sized to ~50 s per run on a shared 2-core machine (60 runs): Fashion-MNIST keeps the first 3,000
# training and 3,000 test images (build_demo's `limit` cuts both; 282-324 images per class in either
# split, and 3,000 test images give a binomial standard error under 1 pp, below the spread over seeds),
# since evaluating all 10,000 after every epoch would cost as much as the training itself; digits is
# small enough to use whole, for twice the epochs.
FULL = Scale((DatasetSpec("fashion-mnist", epochs=5, limit=3000), DatasetSpec("digits", epochs=10)),
             batches=(64, 256), seeds=(0, 1, 2))
QUICK = Scale((DatasetSpec("fashion-mnist", epochs=2, limit=300), DatasetSpec("digits", epochs=2)),
              batches=(64,), seeds=(0,))


@dataclass(frozen=True)
class Run:
    dataset: str
    batch: int
    version: str
    seed: int

    @property
    def name(self) -> str:
        return f"{self.dataset}-b{self.batch}-{self.version}-s{self.seed}"


@dataclass
class Result:
    run: Run
    curve: list[float]  # zero-shot top-1 after epochs 1..E
    final_tau: float  # the model's temperature (v2: mean over the last batch's per-sample taus)
    seconds: float


# ------------------------------------------------------------------------------------------ data


def load_dataset(spec: DatasetSpec) -> DemoData:
    """Shards and zero-shot folder of a data set, built once under bench/out/data."""
    if spec.name == "fashion-mnist":
        return demo_shards(limit=spec.limit)
    return build_digits(OUT_DIR / "data" / "digits")


# -------------------------------------------------------------------------------------- training


def run_argv(run: Run, data: DemoData, epochs: int, optim: Optim, logs: Path) -> list[str]:
    """The training command of one run: the contender's loss flags on a schedule shared by all."""
    steps = math.ceil(data.num_samples / run.batch) * epochs
    return [
        "--train-data", data.train_shards, "--train-num-samples", str(data.num_samples),
        "--data_size", str(data.data_size), "--imagenet-val", str(data.test_dir), "--zeroshot-frequency", "1",
        "--model", "ViT-Tiny-32px", "--precision", "fp32", "--batch-size", str(run.batch), "--workers", "1",
        "--epochs", str(epochs), "--lr", str(optim.lr), "--wd", str(optim.wd),
        "--warmup", str(max(1, round(optim.warmup_fraction * steps))), "--seed", str(run.seed),
        "--gamma", str(optim.gamma), "--gamma_schedule", "cosine", "--gamma_decay_epochs", str(max(1, epochs // 2)),
        *CONTENDERS[run.version],
        "--logs", str(logs), "--name", run.name, "--save-frequency", "0", "--log-every-n-steps", "100000",
    ]


def read_result(run: Run, run_dir: Path, epochs: int, seconds: float) -> Result:
    """Curve and final temperature from the run folder's results.jsonl and metrics.jsonl."""
    by_epoch = {r["epoch"]: r[TOP1] for r in read_jsonl(run_dir / "results.jsonl")}
    last = read_jsonl(run_dir / "metrics.jsonl")[-1]
    tau = last["tau"] if "tau" in last else 1.0 / last["logit_scale"]  # OpenCLIP and SigLIP log no "tau"
    return Result(run, [by_epoch[e] for e in range(1, epochs + 1)], tau, seconds)


def train_or_reuse(run: Run, argv: list[str], run_dir: Path, epochs: int) -> Result:
    """Train in this process unless run_dir holds a finished run with the same flags."""
    seconds = reuse_or_train(run_dir, argv, lambda: train(argv))
    return read_result(run, run_dir, epochs, seconds)


def run_all(scale: Scale, data: dict[str, DemoData], optim: Optim, logs: Path) -> list[Result]:
    """Every (data set, batch, seed, version); versions innermost, so that a machine whose speed drifts
    (shared cores) slows all versions alike, and partial results compare all versions."""
    results = []
    total = len(scale.datasets) * len(scale.batches) * len(scale.seeds) * len(CONTENDERS)
    for spec in scale.datasets:
        for batch in scale.batches:
            for seed in scale.seeds:
                for version in CONTENDERS:
                    run = Run(spec.name, batch, version, seed)
                    argv = run_argv(run, data[spec.name], spec.epochs, optim, logs)
                    result = train_or_reuse(run, argv, logs / run.name, spec.epochs)
                    results.append(result)
                    print(f"[{len(results)}/{total}] {run.name}: top-1 {result.curve[-1]:.4f}, "
                          f"tau {result.final_tau:.4f}, {result.seconds:.0f} s", flush=True)
    return results


# --------------------------------------------------------------------------------------- summary


def group(results: list[Result]) -> dict[tuple[str, int, str], list[Result]]:
    """Results by (data set, batch, version), in run order."""
    groups: dict[tuple[str, int, str], list[Result]] = {}
    for result in results:
        groups.setdefault((result.run.dataset, result.run.batch, result.run.version), []).append(result)
    return groups


def summarize(results: list[Result]) -> list[dict]:
    """Per (data set, batch, version): final top-1 and final temperature, mean and std over seeds."""
    rows = []
    for (dataset, batch, version), runs in group(results).items():
        top1, top1_std = mean_std([r.curve[-1] for r in runs])
        tau, tau_std = mean_std([r.final_tau for r in runs])
        rows.append({"dataset": dataset, "batch": batch, "version": version, "seeds": len(runs),
                     "top1_mean": top1, "top1_std": top1_std, "tau_mean": tau, "tau_std": tau_std})
    return rows


def accuracy_table(summary: list[dict]) -> str:
    """Final top-1 in %, one row per (data set, batch), best mean in bold, and v3 minus each baseline."""
    cells = {(s["dataset"], s["batch"], s["version"]): s for s in summary}
    rows = []
    for dataset, batch in dict.fromkeys((s["dataset"], s["batch"]) for s in summary):
        entries = [cells[dataset, batch, v] for v in CONTENDERS]
        best = max(e["top1_mean"] for e in entries)
        shown = [f"{100 * e['top1_mean']:.1f} ± {100 * e['top1_std']:.1f}" for e in entries]
        shown = [f"**{s}**" if e["top1_mean"] == best else s for s, e in zip(shown, entries)]
        v3 = cells[dataset, batch, "FastCLIP-v3"]
        rows.append([dataset, str(batch), *shown, *(difference(v3, cells[dataset, batch, b]) for b in BASELINES)])
    return markdown_table(["data set", "batch", *CONTENDERS, *(f"v3 − {b} (pp ± s.e.)" for b in BASELINES)], rows)


def difference(a: dict, b: dict, key: str = "top1", digits: int = 1) -> str:
    """a - b of the summaries' `key` in percentage points with the standard error of a difference of
    two means over seeds, so a reader sees whether the gap exceeds the seed noise."""
    error = math.sqrt(a[f"{key}_std"] ** 2 / a["seeds"] + b[f"{key}_std"] ** 2 / b["seeds"])
    return f"{100 * (a[f'{key}_mean'] - b[f'{key}_mean']):+.{digits}f} ± {100 * error:.{digits}f}"


def temperature_table(summary: list[dict]) -> str:
    """Final tau per contender: whether a temperature moved explains part of the accuracy."""
    cells = {(s["dataset"], s["batch"], s["version"]): s for s in summary}
    rows = [[dataset, str(batch), *(f"{cells[dataset, batch, v]['tau_mean']:.4f}" for v in CONTENDERS)]
            for dataset, batch in dict.fromkeys((s["dataset"], s["batch"]) for s in summary)]
    return markdown_table(["data set", "batch", *CONTENDERS], rows)


def plot_curves(results: list[Result], dataset: str, batches: Sequence[int], path: Path) -> None:
    """Top-1 per epoch, mean over seeds with a +-std band; one panel per batch size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    groups = group(results)
    fig, axes = plt.subplots(1, len(batches), figsize=(5 * len(batches), 4), squeeze=False, sharey=True)
    for ax, batch in zip(axes[0], batches):
        for version in CONTENDERS:
            curves = [r.curve for r in groups[dataset, batch, version]]
            plot_band(ax, curves, version)
        ax.axhline(CHANCE, color="grey", lw=0.8, ls=":", label="chance")
        ax.set(title=f"{dataset}, batch {batch} ({len(curves)} seeds)", xlabel="epoch", ylabel="zero-shot top-1")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    save_figure(fig, path)


def setup_lines(scale: Scale, data: dict[str, DemoData], optim: Optim, threads: int) -> str:
    lines = [
        f"- `ViT-Tiny-32px`, fp32, one process on the CPU ({threads} torch thread(s), `--workers 1`); "
        f"global batch {', '.join(map(str, scale.batches))}; seeds {', '.join(map(str, scale.seeds))}.",
        f"- Same for every version: AdamW lr {optim.lr:g}, wd {optim.wd:g}, cosine schedule with linear warmup over "
        f"the first {optim.warmup_fraction:.0%} of the steps; FastCLIP `--gamma {optim.gamma:g} --gamma_schedule "
        "cosine --gamma_decay_epochs E/2`. Temperatures: the README's flags (initial tau 0.07, v2 0.03); "
        "SigLIP open_clip_train's (tau 0.1, logit bias -10, both learned).",
    ]
    for spec in scale.datasets:
        d = data[spec.name]
        lines.append(f"- {spec.name}: {d.num_samples} training pairs, {count_images(d.test_dir)} zero-shot test "
                     f"images, {spec.epochs} epochs.")
    return "\n".join(lines)


def count_images(folder: Path) -> int:
    return sum(1 for _ in folder.rglob("*.png"))


def report(results: list[Result], scale: Scale, data: dict[str, DemoData], optim: Optim, threads: int,
           figures: dict[str, Path], minutes: float, name: str) -> Path:
    summary = summarize(results)
    figure_lines = "\n".join(f"![{d}]({os.path.relpath(p, ROOT / 'docs')})" for d, p in figures.items())  # as seen from docs/benchmarks.md
    body = (
        f"{setup_lines(scale, data, optim, threads)}\n{runs_line(results, minutes)}\n\n"
        f"Final zero-shot top-1 (%), mean ± std over seeds:\n\n{accuracy_table(summary)}\n\n"
        f"Final temperature tau (mean over seeds):\n\n{temperature_table(summary)}\n\n{figure_lines}\n"
    )
    raw = {"scale": asdict(scale), "optim": asdict(optim), "versions": CONTENDERS, "threads": threads,
           "minutes": minutes, "summary": summary,
           "runs": [{**asdict(r.run), "curve": r.curve, "final_tau": r.final_tau, "seconds": r.seconds}
                    for r in results]}
    return write_report(name, "Convergence at small batch: OpenCLIP and SigLIP vs FastCLIP-v0..v3", body, raw)


def main(argv: Sequence[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke test: 1 seed, tiny subset, batch 64, 2 epochs")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads: 1 is fastest on a shared 2-core machine (2 threads wait on each "
                             "other under contention) and leaves a core to the data loader worker")
    opts = parser.parse_args(argv)
    torch.set_num_threads(opts.threads)
    scale, name = (QUICK, "convergence-quick") if opts.quick else (FULL, "convergence")
    optim = Optim()
    started = time.perf_counter()
    data = {spec.name: load_dataset(spec) for spec in scale.datasets}
    results = run_all(scale, data, optim, OUT_DIR / name / "logs")
    figure_dir = OUT_DIR / name if opts.quick else ROOT / "docs" / "img"  # the smoke test leaves docs alone
    figures = {spec.name: figure_dir / f"convergence_{spec.name}.png" for spec in scale.datasets}
    for dataset, path in figures.items():
        plot_curves(results, dataset, scale.batches, path)
    path = report(results, scale, data, optim, opts.threads, figures, (time.perf_counter() - started) / 60, name)
    print(path.read_text())
    return path


if __name__ == "__main__":
    main()
