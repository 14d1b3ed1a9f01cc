"""Unique captions: retrieval of OpenCLIP and FastCLIP-v0..v3 on Unicode characters drawn in fonts.

On Fashion-MNIST and the digits every caption is one of ten classes' templates, so most in-batch
negatives share the positive's text. Here (`fastclip.datasets.fonts`) every training image has its
own caption, its character's Unicode name, and the data are far larger than a batch. Each run trains
the README's flags (bench/convergence.py's VERSIONS) with K = 2 gloo processes on the CPU (torchrun,
one OMP thread per rank, `--workers 1`): OpenCLIP and FastCLIP-v3 at global batch 2x16 and 2x64,
FastCLIP-v0, v1 and v2 at 2x16, 3 seeds each, every run with the same epochs and schedules. After
every epoch the run evaluates retrieval on the test split (`--val-data`: training characters drawn in
DejaVu Sans, a font never trained on); the report is the final image->text and text->image R@1 and
R@10 (mean +- std over seeds) per (batch, version), and R@1 by epoch in docs/img/fonts_recall.png.

Budget, measured on the 2-core machine (ViT-Tiny-32px, fp32, 20,000 training pairs, 2,000 test
pairs): 2x16 steps take 0.135 s with OpenCLIP and 0.145 s with FastCLIP-v2/v3 (220-250 samples/s;
the backward pass with DDP's all-reduce and the optimizer step, ~50 ms each, are dominated by the
3.2M-parameter token embedding, whatever the batch), 2x64 steps 0.27-0.29 s (440-470 samples/s).
A whole 2-epoch run, torchrun start-up (~10 s) and two evaluations (~2 s each) included, took 186 s
at 2x16 (OpenCLIP; FastCLIP ~195 s) and 98 s at 2x64, so the 15 + 6 runs take ~58 min and building
the data ~20 s: ~59 min predicted. A third epoch would take ~87 min, past the 80 minutes allowed.
Hence 2 epochs over 20,000 pairs with `--gamma_decay_epochs 1`: FastCLIP's epoch 0 sets each pair's
`u` to its mini-batch estimate (gamma 1), and epoch 1 keeps 80 % of it (gamma 0.2), so the second
epoch weighs every pair's negatives with its history rather than with its current batch alone.

    python bench/fonts.py            # the full run: 21 runs, ~59 min on 2 cores
    python bench/fonts.py --quick    # smoke test (< 3 min): 1 seed, 600 pairs

Finished runs are kept and reused when the same command is run again (a run is redone when its
flags changed or it did not finish), so an interrupted benchmark continues where it stopped. Needs
the fonts of `python -m fastclip.datasets.fonts --check`, fontTools and matplotlib.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

from common import (
    OUT_DIR,
    ROOT,
    markdown_table,
    mean_std,
    plot_band,
    read_jsonl,
    reuse_or_train,
    run_command,
    runs_line,
    save_figure,
    write_report,
)
from convergence import VERSIONS, Optim, difference

from fastclip.datasets.fonts import FontsData, MissingFonts, build_fonts

RANKS = 2
# results.jsonl's retrieval metrics (fastclip.evaluate) and their short names
METRICS = {"image_to_text_R@1": "i→t R@1", "image_to_text_R@10": "i→t R@10",
           "text_to_image_R@1": "t→i R@1", "text_to_image_R@10": "t→i R@10"}
# Calibrated with two OpenCLIP runs at 2x64 (seed 0, 2 epochs of the full data, scored on the test split:
# there is no separate validation split): lr 1e-3 reached R@10 3.40 % (i->t) and 2.55 % (t->i), lr 3e-3
# 2.85 % and 2.40 %; hence convergence.py's 1e-3, with its wd 0.1, 10 % warmup and gamma 0.2.
OPTIM = Optim(lr=1e-3, wd=0.1, warmup_fraction=0.1, gamma=0.2)


@dataclass(frozen=True)
class Scale:
    train_pairs: int
    test_pairs: int
    epochs: int
    seeds: tuple[int, ...]
    runs: tuple[tuple[int, tuple[str, ...]], ...]  # (batch per rank, versions trained at it)


SMALL_BATCH = (16, tuple(VERSIONS))
LARGE_BATCH = (64, ("OpenCLIP", "FastCLIP-v3"))
FULL = Scale(train_pairs=20_000, test_pairs=2_000, epochs=2, seeds=(0, 1, 2), runs=(SMALL_BATCH, LARGE_BATCH))
QUICK = Scale(train_pairs=600, test_pairs=100, epochs=2, seeds=(0,), runs=(SMALL_BATCH, LARGE_BATCH))


@dataclass(frozen=True)
class Run:
    batch: int  # per rank
    version: str
    seed: int

    @property
    def name(self) -> str:
        return f"{RANKS}x{self.batch}-{self.version}-s{self.seed}"


@dataclass
class Result:
    run: Run
    curves: dict[str, list[float]]  # METRICS key -> value after epochs 1..E
    seconds: float


# -------------------------------------------------------------------------------------- training


def run_argv(run: Run, data: FontsData, epochs: int, optim: Optim, logs: Path,
             loss_flags: Sequence[str] | None = None) -> list[str]:
    """The training flags of one run: the version's loss flags (`loss_flags`, by default the README's for
    `run.version`) on a schedule shared by all versions.

    `--logs-dir`, not `--logs`: torchrun would read the latter as its own `--logs-specs`."""
    steps = math.ceil(data.num_samples / (RANKS * run.batch)) * epochs
    return [
        "--train-data", data.train_shards, "--train-num-samples", str(data.num_samples),
        "--data_size", str(data.data_size), "--val-data", data.test_shards, "--val-frequency", "1",
        "--model", "ViT-Tiny-32px", "--precision", "fp32", "--batch-size", str(run.batch), "--workers", "1",
        "--epochs", str(epochs), "--lr", str(optim.lr), "--wd", str(optim.wd),
        "--warmup", str(max(1, round(optim.warmup_fraction * steps))), "--seed", str(run.seed),
        "--gamma", str(optim.gamma), "--gamma_schedule", "cosine", "--gamma_decay_epochs", str(max(1, epochs // 2)),
        *(VERSIONS[run.version] if loss_flags is None else loss_flags),
        "--logs-dir", str(logs), "--name", run.name, "--save-frequency", "0", "--log-every-n-steps", "100",
    ]


TORCHRUN_ENV = {"OMP_NUM_THREADS": "1"}  # one thread per rank
TORCHRUN_CWD = ROOT / "src"


def torchrun_command(argv: Sequence[str]) -> list[str]:
    """`torchrun --standalone --nproc_per_node=K -m training.main ...`, to run from TORCHRUN_CWD."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={RANKS}",
            "-m", "training.main", *argv]


def torchrun(argv: list[str]) -> None:
    """`cd src && torchrun --standalone --nproc_per_node=K -m training.main ...` with one thread per rank."""
    run_command(torchrun_command(argv), env=TORCHRUN_ENV, cwd=TORCHRUN_CWD)


def read_result(run: Run, run_dir: Path, epochs: int, seconds: float) -> Result:
    """The recall curves from the run folder's results.jsonl (one evaluation per epoch)."""
    by_epoch = {r["epoch"]: r for r in read_jsonl(run_dir / "results.jsonl")}
    return Result(run, {m: [by_epoch[e][m] for e in range(1, epochs + 1)] for m in METRICS}, seconds)


def run_all(scale: Scale, data: FontsData, optim: Optim, logs: Path) -> list[Result]:
    """Every (batch, seed, version); versions innermost, so that a machine whose speed drifts (shared
    cores) slows all versions alike, and partial results compare all versions."""
    runs = [Run(batch, version, seed) for batch, versions in scale.runs for seed in scale.seeds for version in versions]
    results = []
    for run in runs:
        argv = run_argv(run, data, scale.epochs, optim, logs)
        seconds = reuse_or_train(logs / run.name, ["torchrun", f"--nproc_per_node={RANKS}", *argv],
                                 lambda: torchrun(argv))
        result = read_result(run, logs / run.name, scale.epochs, seconds)
        results.append(result)
        shown = ", ".join(f"{short} {100 * result.curves[m][-1]:.2f} %" for m, short in METRICS.items())
        print(f"[{len(results)}/{len(runs)}] {run.name}: {shown}, {seconds:.0f} s", flush=True)
    return results


# --------------------------------------------------------------------------------------- summary


def summarize(results: list[Result]) -> list[dict]:
    """Per (batch, version): each final recall, mean and std over seeds (keys `<metric>_mean`, `_std`)."""
    groups: dict[tuple[int, str], list[Result]] = {}
    for result in results:
        groups.setdefault((result.run.batch, result.run.version), []).append(result)
    rows = []
    for (batch, version), runs in groups.items():
        row = {"batch": batch, "version": version, "seeds": len(runs)}
        for metric in METRICS:
            row[f"{metric}_mean"], row[f"{metric}_std"] = mean_std([r.curves[metric][-1] for r in runs])
        rows.append(row)
    return rows


def recall_table(summary: list[dict]) -> str:
    """Final recalls in %, one row per (batch, version), the best mean of each batch in bold."""
    rows = []
    for s in summary:
        same_batch = [t for t in summary if t["batch"] == s["batch"]]
        cells = []
        for metric in METRICS:
            cell = f"{100 * s[f'{metric}_mean']:.2f} ± {100 * s[f'{metric}_std']:.2f}"
            best = max(t[f"{metric}_mean"] for t in same_batch)
            cells.append(f"**{cell}**" if s[f"{metric}_mean"] == best and len(same_batch) > 1 else cell)
        rows.append([f"{RANKS}x{s['batch']}", s["version"], *cells])
    return markdown_table(["global batch", "version", *METRICS.values()], rows)


def difference_table(summary: list[dict]) -> str:
    """FastCLIP-v3 minus OpenCLIP per batch, in pp with the standard error over seeds."""
    cells = {(s["batch"], s["version"]): s for s in summary}
    rows = [[f"{RANKS}x{batch}", *(difference(cells[batch, "FastCLIP-v3"], cells[batch, "OpenCLIP"], m, digits=2)
                                   for m in METRICS)]
            for batch in dict.fromkeys(s["batch"] for s in summary)
            if (batch, "FastCLIP-v3") in cells and (batch, "OpenCLIP") in cells]
    return markdown_table(["global batch", *METRICS.values()], rows)


def plot_recall(results: list[Result], scale: Scale, test_pairs: int, path: Path) -> None:
    """R@1 by epoch (mean over seeds, +-std band): image->text on top, text->image below, a column per batch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    rows = ("image_to_text_R@1", "text_to_image_R@1")
    fig, axes = plt.subplots(len(rows), len(scale.runs), figsize=(5 * len(scale.runs), 3.6 * len(rows)),
                             squeeze=False, sharey="row")
    for column, (batch, versions) in enumerate(scale.runs):
        for row, metric in enumerate(rows):
            ax = axes[row][column]
            for version in versions:
                plot_band(ax, [r.curves[metric] for r in results if (r.run.batch, r.run.version) == (batch, version)],
                          version)
            ax.axhline(1 / test_pairs, color="grey", lw=0.8, ls=":", label="chance")
            ax.set(title=f"global batch {RANKS}x{batch} ({len(scale.seeds)} seeds)", xlabel="epoch",
                   ylabel=METRICS[metric])
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    save_figure(fig, path)


def setup_lines(scale: Scale, data: FontsData, optim: Optim) -> str:
    skipped = ", ".join(f"{reason} {count:,}" for reason, count in data.skipped.items())
    return "\n".join([
        f"- Data (`fastclip.datasets.fonts`): {data.num_samples:,} training pairs, each a 32x32 character with "
        f"its own caption (its Unicode name), drawn in one of {len(data.train_fonts)} training fonts (Noto "
        f"Regular, FreeFont, Unifont); test split: {data.test_samples:,} of the training characters drawn in "
        f"`{Path(data.test_font).name}`, a font never trained on (chance: R@1 {100 / data.test_samples:.2f} %, "
        f"R@10 {1000 / data.test_samples:.2f} %). Skipped characters of the fonts' maps: {skipped}.",
        f"- `ViT-Tiny-32px`, fp32, K = {RANKS} gloo processes on the CPU (torchrun, 1 thread per rank, "
        f"`--workers 1`); seeds {', '.join(map(str, scale.seeds))}; FastCLIP-v0..v2 at global batch "
        f"{RANKS}x{scale.runs[0][0]} only.",
        f"- Same for every run: {scale.epochs} epochs, AdamW lr {optim.lr:g}, wd {optim.wd:g}, cosine schedule with "
        f"linear warmup over the first {optim.warmup_fraction:.0%} of the steps; FastCLIP `--gamma {optim.gamma:g} "
        f"--gamma_schedule cosine --gamma_decay_epochs {max(1, scale.epochs // 2)}` (gamma 1 in epoch 0, "
        f"{optim.gamma:g} from epoch {max(1, scale.epochs // 2)} on). Temperatures: the README's flags.",
    ])


def report(results: list[Result], scale: Scale, data: FontsData, optim: Optim, figure: Path, minutes: float,
           name: str) -> Path:
    summary = summarize(results)
    body = (
        f"{setup_lines(scale, data, optim)}\n{runs_line(results, minutes)}\n\n"
        f"Final retrieval recall on the test split (%), mean ± std over seeds:\n\n{recall_table(summary)}\n\n"
        f"FastCLIP-v3 − OpenCLIP (pp ± s.e. over seeds):\n\n{difference_table(summary)}\n\n"
        f"![fonts recall]({os.path.relpath(figure, ROOT / 'docs')})\n"  # as seen from docs/benchmarks.md
    )
    raw = {"scale": asdict(scale), "optim": asdict(optim), "data": asdict(data), "versions": VERSIONS,
           "minutes": minutes, "summary": summary,
           "runs": [{**asdict(r.run), "curves": r.curves, "seconds": r.seconds} for r in results]}
    return write_report(name, "Unique captions: retrieval on Unicode characters drawn in fonts", body, raw)


def fonts_data(train_pairs: int | None, test_pairs: int) -> FontsData:
    """The shards of that size under bench/out/data (train_pairs None: every character the fonts draw), built on
    first use and shared by the benchmarks; missing fonts end the program."""
    try:
        return build_fonts(OUT_DIR / "data" / f"fonts-{train_pairs or 'all'}-{test_pairs}",
                           train_pairs=train_pairs, test_pairs=test_pairs)
    except MissingFonts as error:
        raise SystemExit(f"error: {error}") from None


def load_data(scale: Scale) -> FontsData:
    """The scale's shards (fonts_data)."""
    return fonts_data(scale.train_pairs, scale.test_pairs)


def main(argv: Sequence[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke test: 1 seed, 600 training pairs, 2 epochs")
    opts = parser.parse_args(argv)
    scale, name = (QUICK, "fonts-quick") if opts.quick else (FULL, "fonts")
    started = time.perf_counter()
    data = load_data(scale)
    print(f"data: {data.num_samples} training pairs, {data.test_samples} test pairs "
          f"({time.perf_counter() - started:.0f} s)", flush=True)
    results = run_all(scale, data, OPTIM, OUT_DIR / name / "logs")
    figure = (OUT_DIR / name if opts.quick else ROOT / "docs" / "img") / "fonts_recall.png"  # quick leaves docs alone
    plot_recall(results, scale, data.test_samples, figure)
    path = report(results, scale, data, OPTIM, figure, (time.perf_counter() - started) / 60, name)
    print(path.read_text())
    return path


if __name__ == "__main__":
    main()
