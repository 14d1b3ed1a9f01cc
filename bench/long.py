"""Many visits per pair: OpenCLIP against FastCLIP once every pair's u has averaged tens of visits.

FastCLIP's estimator u of a pair's negatives is an average over the pair's past visits: gamma is 1 in
epoch 0 and decays to --gamma over --gamma_decay_epochs. In a run of 2-4 epochs (bench/fonts.py) u
has seen 2-4 mini-batches and FastCLIP is close to the mini-batch loss; the paper's lead appears after
6-25 epochs. Here a subset of the fonts data (`fastclip.datasets.fonts`: every caption distinct, a
held-out split drawn in a font never trained on) is small enough that each pair is visited 30 times
in the budget, at global batches 2x16 and 2x32 (K = 2 gloo processes, one thread each), 3 seeds:
- OpenCLIP, the README's flags (its temperature learnt at the model's lr);
- OpenCLIP with its temperature fixed at 0.07 (`--temperature_scheme global_constant`), against
- FastCLIP-v1, the same fixed temperature: the two differ in u alone;
- FastCLIP-v3, the README's flags.
Every run shares the data, the schedule (AdamW lr 1e-3, wd 0.1, cosine with 10 % warmup) and
FastCLIP's `--gamma 0.2 --gamma_decay_epochs` half the epochs. Every other epoch it scores the
held-out split: image<->text R@1 and R@10 (the mean of both directions) and the global contrastive
loss at the reference tau 0.07 (`global_val_loss_ref`, the low-noise signal). The report gives the
final values (mean +- s.e. over seeds), the differences to the matching OpenCLIP run, and the time to
accuracy: the steps a FastCLIP version needs to reach its OpenCLIP reference's final R@10.

The model is `ViT-Tiny-32px` with its token and positional embeddings frozen at their random
initialisation (`--lock-text --lock-text-unlocked-layers 3`; the text transformer, its final norm and
projection train): the 3.2M-parameter token embedding's backward pass, all-reduce and AdamW step were
about 40 % of a CPU step, and a fixed random code per token is still a distinct input per word.

    python bench/long.py            # 24 runs, ~50 min on 2 cores (make bench-long)
    python bench/long.py --quick    # smoke test (~3 min): 1 seed, 2x16, 300 pairs, 4 epochs

Finished runs are kept and reused (bench/common.py's reuse_or_train), so an interrupted benchmark
continues where it stopped; bench/long_study.py shares the folder and reuses the seed-0 2x16 runs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

from common import (OUT_DIR, ROOT, markdown_table, mean_std, read_jsonl, reuse_or_train, runs_line, save_figure,
                    write_report)
from convergence import VERSIONS
from fonts import OPTIM, RANKS, Run, load_data, run_argv, torchrun

from fastclip.datasets.fonts import FontsData

# token and positional embeddings frozen: groups [embeddings, block 1, block 2, final norm + projection]
MODEL_FLAGS = ("--lock-text", "--lock-text-unlocked-layers", "3", "--lock-text-freeze-layer-norm")
FIXED_TAU = ("--temperature_scheme", "global_constant")  # at --temperature, 0.07 by default
LOSSES: dict[str, list[str]] = {
    "OpenCLIP": VERSIONS["OpenCLIP"],
    "OpenCLIP-fixed-tau": [*VERSIONS["OpenCLIP"], *FIXED_TAU],
    "FastCLIP-v1": VERSIONS["FastCLIP-v1"],
    "FastCLIP-v3": VERSIONS["FastCLIP-v3"],
}
# which OpenCLIP run each FastCLIP version is measured against
REFERENCE = {"FastCLIP-v1": "OpenCLIP-fixed-tau", "FastCLIP-v3": "OpenCLIP"}
# what a run reports after each evaluation: the mean of both retrieval directions, and the global loss
METRICS = {"R@1": "held-out R@1 (%)", "R@10": "held-out R@10 (%)", "GCL": "held-out global loss @0.07",
           "train GCL": "training-subset global loss @0.07"}


@dataclass(frozen=True)
class Scale:
    train_pairs: int
    test_pairs: int
    epochs: int
    eval_every: int  # epochs between held-out evaluations
    seeds: tuple[int, ...]
    batches: tuple[int, ...]  # per rank
    versions: tuple[str, ...]


FULL = Scale(train_pairs=2_000, test_pairs=500, epochs=30, eval_every=2, seeds=(0, 1, 2), batches=(16, 32),
             versions=tuple(LOSSES))
QUICK = Scale(train_pairs=300, test_pairs=100, epochs=4, eval_every=2, seeds=(0,), batches=(16,),
              versions=("OpenCLIP", "FastCLIP-v3"))


@dataclass
class Curve:
    """One run's held-out evaluations: metric -> values at `steps`, and its final temperature."""

    run: Run
    steps: list[int]
    values: dict[str, list[float]]
    final_tau: float
    seconds: float


def long_argv(run: Run, data: FontsData, scale: Scale, logs: Path, extra: Sequence[str] = ()) -> list[str]:
    """bench/fonts.py's flags for the run, with the frozen embeddings, the evaluation cadence and `extra`
    appended (argparse keeps the last value of a flag)."""
    return [*run_argv(run, data, scale.epochs, OPTIM, logs, LOSSES[run.version]), *MODEL_FLAGS,
            "--val-frequency", str(scale.eval_every), "--train-eval-num-samples", str(scale.test_pairs), *extra]


def read_curve(run: Run, run_dir: Path, seconds: float) -> Curve:
    rows = read_jsonl(run_dir / "results.jsonl")
    values = {
        "R@1": [(r["image_to_text_R@1"] + r["text_to_image_R@1"]) / 2 for r in rows],
        "R@10": [(r["image_to_text_R@10"] + r["text_to_image_R@10"]) / 2 for r in rows],
        "GCL": [r["global_val_loss_ref"] for r in rows],
        "train GCL": [r["train_subset_global_val_loss_ref"] for r in rows],
    }
    return Curve(run, [r["step"] for r in rows], values, final_tau(run_dir), seconds)


def final_tau(run_dir: Path) -> float:
    """The last logged temperature: the model's (logged as logit_scale = 1 / tau) where it learns it, else the
    objective's (`tau`), else the fixed --temperature of params.json."""
    last = read_jsonl(run_dir / "metrics.jsonl")[-1]
    if "logit_scale" in last:
        return 1 / last["logit_scale"]
    return last.get("tau", json.loads((run_dir / "params.json").read_text())["temperature"])


def run_dir_of(argv: Sequence[str], logs: Path) -> Path:
    """Where the run of `argv` writes: `logs/<its --name>`."""
    return logs / argv[argv.index("--name") + 1]


def train(run: Run, argv: list[str], logs: Path) -> Curve:
    """The run of `argv` (trained, or reused when finished with the same flags), in `logs/<its --name>`."""
    run_dir = run_dir_of(argv, logs)
    seconds = reuse_or_train(run_dir, ["torchrun", f"--nproc_per_node={RANKS}", *argv], lambda: torchrun(argv))
    return read_curve(run, run_dir, seconds)


def run_all(scale: Scale, data: FontsData, logs: Path) -> list[Curve]:
    """Seeds outermost, versions innermost: a partial result compares every version, and a machine whose
    speed drifts slows them alike."""
    runs = [Run(batch, version, seed) for seed in scale.seeds for batch in scale.batches for version in scale.versions]
    curves = []
    for run in runs:
        curves.append(curve := train(run, long_argv(run, data, scale, logs), logs))
        print(f"[{len(curves)}/{len(runs)}] {run.name}: {final_line(curve)}, {curve.seconds:.0f} s", flush=True)
    return curves


def final_line(curve: Curve) -> str:
    return (f"R@1 {100 * curve.values['R@1'][-1]:.2f} %, R@10 {100 * curve.values['R@10'][-1]:.2f} %, "
            f"GCL {curve.values['GCL'][-1]:.4f}, tau {curve.final_tau:.4f}")


# --------------------------------------------------------------------------------------- summary


def mean_curve(curves: Sequence[Curve], metric: str) -> list[float]:
    return [sum(values) / len(values) for values in zip(*(c.values[metric] for c in curves))]


def steps_to_reach(steps: Sequence[int], values: Sequence[float], target: float) -> float | None:
    """The first step at which the curve reaches `target`, interpolated linearly between evaluations
    (from 0 at step 0); None when it never does."""
    previous_step, previous_value = 0, 0.0
    for step, value in zip(steps, values):
        if value >= target:
            if value == previous_value:
                return float(step)
            return previous_step + (step - previous_step) * (target - previous_value) / (value - previous_value)
        previous_step, previous_value = step, value
    return None


@dataclass
class Group:
    batch: int
    version: str
    curves: list[Curve]

    def final(self, metric: str) -> tuple[float, float]:
        """Mean and standard error over seeds of the metric's last value."""
        mean, std = mean_std([c.values[metric][-1] for c in self.curves])
        return mean, std / math.sqrt(len(self.curves))

    @property
    def steps(self) -> list[int]:
        return self.curves[0].steps


def group(curves: Sequence[Curve]) -> dict[tuple[int, str], Group]:
    groups: dict[tuple[int, str], Group] = {}
    for curve in curves:
        key = (curve.run.batch, curve.run.version)
        groups.setdefault(key, Group(*key, [])).curves.append(curve)
    return groups


def cell(mean: float, error: float, percent: bool) -> str:
    return f"{100 * mean:.2f} ± {100 * error:.2f}" if percent else f"{mean:.4f} ± {error:.4f}"


def final_table(groups: dict[tuple[int, str], Group]) -> str:
    rows = []
    for (batch, version), g in groups.items():
        tau_mean, tau_std = mean_std([c.final_tau for c in g.curves])
        rows.append([f"{RANKS}x{batch}", version, str(len(g.curves)),
                     *(cell(*g.final(m), percent="GCL" not in m) for m in METRICS), f"{tau_mean:.4f}"])
    return markdown_table(["global batch", "version", "seeds", *METRICS.values(), "final tau"], rows)


def difference_cells(a: Group, b: Group) -> list[str]:
    """a - b per metric, with the standard error of a difference of two means over seeds."""
    cells = []
    for metric in METRICS:
        (mean_a, error_a), (mean_b, error_b) = a.final(metric), b.final(metric)
        scale, digits = (100, 2) if "GCL" not in metric else (1, 4)
        cells.append(f"{scale * (mean_a - mean_b):+.{digits}f} ± {scale * math.hypot(error_a, error_b):.{digits}f}")
    return cells


def time_to_accuracy(groups: dict[tuple[int, str], Group]) -> list[dict]:
    """Per FastCLIP version and batch: the steps its mean R@10 curve needs to reach its reference's
    final mean R@10, and the other way round (the reference's steps to FastCLIP's final mean R@10), so
    that the faster side shows as a fraction of the run whichever it is."""
    rows = []
    for (batch, version), g in groups.items():
        reference = groups.get((batch, REFERENCE.get(version, "")))
        if reference is None:
            continue
        own_curve, reference_curve = mean_curve(g.curves, "R@10"), mean_curve(reference.curves, "R@10")
        rows.append({"batch": batch, "version": version, "reference": reference.version,
                     "target_R@10": reference_curve[-1],
                     "steps": steps_to_reach(g.steps, own_curve, reference_curve[-1]),
                     "reference_steps": steps_to_reach(reference.steps, reference_curve, own_curve[-1]),
                     "own_R@10": own_curve[-1], "run_steps": reference.steps[-1],
                     "differences": difference_cells(g, reference)})
    return rows


def time_table(rows: list[dict]) -> str:
    def reached(steps: float | None, run_steps: int) -> str:
        return "not reached" if steps is None else f"{steps:.0f} of {run_steps} ({steps / run_steps:.2f})"

    table = [[f"{RANKS}x{r['batch']}", f"{r['version']} − {r['reference']}", *r["differences"],
              f"{100 * r['target_R@10']:.2f}", reached(r["steps"], r["run_steps"]),
              f"{100 * r['own_R@10']:.2f}", reached(r["reference_steps"], r["run_steps"])] for r in rows]
    return markdown_table(["global batch", "difference", *(f"Δ {name}" for name in METRICS.values()),
                           "reference's final R@10 (%)", "FastCLIP's steps to it (fraction of the run)",
                           "FastCLIP's final R@10 (%)", "the reference's steps to it"], table)


def plot(groups: dict[tuple[int, str], Group], scale: Scale, path: Path) -> None:
    """Held-out R@10, held-out and training-subset global loss by step (rows), mean over seeds with a +-std
    band, a column per batch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = ("R@10", "GCL", "train GCL")
    fig, axes = plt.subplots(len(rows), len(scale.batches), figsize=(5.2 * len(scale.batches), 3.6 * len(rows)),
                             squeeze=False)
    for column, batch in enumerate(scale.batches):
        for row, metric in enumerate(rows):
            ax = axes[row][column]
            for version in scale.versions:
                g = groups.get((batch, version))
                if g is None:
                    continue
                stats = [mean_std(values) for values in zip(*(c.values[metric] for c in g.curves))]
                means = [m for m, _ in stats]
                scale_by = 100 if "GCL" not in metric else 1
                style = "--" if "fixed" in version or version == "FastCLIP-v1" else "-"
                (line,) = ax.plot(g.steps, [scale_by * m for m in means], style, label=version, lw=1.4)
                ax.fill_between(g.steps, [scale_by * (m - s) for m, s in stats], [scale_by * (m + s) for m, s in stats],
                                color=line.get_color(), alpha=0.15)
            ax.set(title=f"global batch {RANKS}x{batch} ({len(scale.seeds)} seeds)", xlabel="step",
                   ylabel=METRICS[metric])
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    save_figure(fig, path)


def setup_lines(scale: Scale, data: FontsData) -> str:
    steps = {batch: math.ceil(data.num_samples / (RANKS * batch)) * scale.epochs for batch in scale.batches}
    return "\n".join([
        f"- Data: {data.num_samples:,} training pairs of `fastclip.datasets.fonts` (each a character with its own "
        f"caption), held-out split: {data.test_samples:,} of them drawn in `{Path(data.test_font).name}`, a font "
        f"never trained on (chance: R@1 {100 / data.test_samples:.2f} %, R@10 {1000 / data.test_samples:.2f} %).",
        f"- {scale.epochs} epochs: every pair visited {scale.epochs} times; "
        + ", ".join(f"{steps[b]:,} steps at {RANKS}x{b}" for b in scale.batches)
        + f"; evaluated every {scale.eval_every} epochs. Seeds {', '.join(map(str, scale.seeds))}.",
        f"- `ViT-Tiny-32px` with its token and positional embeddings frozen (`{' '.join(MODEL_FLAGS)}`), fp32, "
        f"K = {RANKS} gloo processes (torchrun, 1 thread per rank). AdamW lr {OPTIM.lr:g}, wd {OPTIM.wd:g}, cosine "
        f"with {OPTIM.warmup_fraction:.0%} warmup; FastCLIP `--gamma {OPTIM.gamma:g} --gamma_schedule cosine "
        f"--gamma_decay_epochs {max(1, scale.epochs // 2)}`; v3 with the README's `--lr_tau 2e-4 --lr_tau_scheduler "
        "step_thresh --rho 6.5`; OpenCLIP-fixed-tau and FastCLIP-v1 at tau 0.07.",
    ])


README_BLOCK = ("<!-- bench/long.py: begin -->", "<!-- bench/long.py: end -->")


def publish_in_readme(groups: dict[tuple[int, str], Group], times: list[dict], figure: Path, readme: Path) -> None:
    """Replace the README's block between README_BLOCK's markers with the final table, the differences and
    the figure."""
    text = readme.read_text()
    begin, end = (text.index(marker) for marker in README_BLOCK)
    block = (f"{README_BLOCK[0]}\n{final_table(groups)}\n\n{time_table(times)}\n\n"
             f"![long-horizon curves]({figure.relative_to(ROOT).as_posix()})\n")
    readme.write_text(text[:begin] + block + text[end:])


def report(curves: list[Curve], groups: dict[tuple[int, str], Group], times: list[dict], scale: Scale,
           data: FontsData, figure: Path, minutes: float, name: str) -> Path:
    body = (
        f"{setup_lines(scale, data)}\n{runs_line(curves, minutes)}\n\n"
        f"Final values, mean ± s.e. over seeds (global loss: the global contrastive loss of the held-out pairs, "
        f"and of the first {data.test_samples} training pairs, at tau 0.07; lower is better):\n\n{final_table(groups)}\n\n"
        f"FastCLIP minus its OpenCLIP reference (± s.e.), and the time to accuracy: the step at which FastCLIP's "
        f"mean R@10 first reaches the reference's final mean R@10, and the step at which the reference's reaches "
        f"FastCLIP's (linear between evaluations):\n\n{time_table(times)}\n\n"
        f"![long-horizon curves]({os.path.relpath(figure, ROOT / 'docs')})\n"
    )
    raw = {"scale": asdict(scale), "data": asdict(data), "losses": LOSSES, "model_flags": MODEL_FLAGS,
           "minutes": minutes, "time_to_accuracy": times,
           "runs": [{**asdict(c.run), "steps": c.steps, "values": c.values, "final_tau": c.final_tau,
                     "seconds": c.seconds} for c in curves]}
    title = f"Many visits per pair: {scale.epochs} epochs at small batches, the global loss and time to accuracy"
    return write_report(name, title, body, raw)


def main(argv: Sequence[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke test: 1 seed, 2x16, 300 pairs, 4 epochs")
    quick = parser.parse_args(argv).quick
    scale, name = (QUICK, "long-quick") if quick else (FULL, "long")
    started = time.perf_counter()
    data = load_data(scale)
    curves = run_all(scale, data, OUT_DIR / name / "logs")
    figure = (OUT_DIR / name if quick else ROOT / "docs" / "img") / "long_curves.png"  # quick leaves docs alone
    groups = group(curves)
    times = time_to_accuracy(groups)
    plot(groups, scale, figure)
    path = report(curves, groups, times, scale, data, figure, (time.perf_counter() - started) / 60, name)
    if not quick:
        publish_in_readme(groups, times, figure, ROOT / "README.md")
    print(path.read_text())
    return path


if __name__ == "__main__":
    main()
