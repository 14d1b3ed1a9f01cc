"""Training curves of one or more runs in one PNG: `python -m fastclip.tools.plot RUN_DIR [RUN_DIR ...]`.

Reading (run folders -> per-run series) is kept apart from drawing (series -> figure) so that the
numbers a plot shows can be checked without looking at it. A run folder is what the training script
writes: metrics.jsonl (training steps), results.jsonl (evaluations), params.json (the flags).
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from ..train.progress import StepPlan

METRICS_FILE = "metrics.jsonl"
RESULTS_FILE = "results.jsonl"
PARAMS_FILE = "params.json"
AXES = ("step", "epoch")
PANEL_INCHES = (4.8, 3.4)
DPI = 100


class RunFolderError(ValueError):
    """A folder that cannot be read as a run; the message names it and the fix."""


@dataclass(frozen=True)
class Series:
    """One logged quantity of one run, in step order; `epoch` places the same points in (fractional) epochs."""

    step: tuple[float, ...]
    epoch: tuple[float, ...]
    value: tuple[float, ...]

    def x(self, axis: str) -> tuple[float, ...]:
        return self.step if axis == "step" else self.epoch


@dataclass(frozen=True)
class RunCurves:
    """Every numeric quantity a run logged, by its key in metrics.jsonl / results.jsonl."""

    label: str
    folder: Path
    series: dict[str, Series]


# --- reading ---------------------------------------------------------------------------------------

def read_jsonl(path: Path) -> list[dict]:
    """The JSON objects of a .jsonl file. A final line without a newline that does not parse is being
    written by a live run and is left out; any other bad line is an error naming file and line."""
    if not path.is_file():
        return []
    rows = []
    with path.open() as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                if not line.endswith("\n"):
                    break
                raise RunFolderError(f"{path} line {number} is not JSON ({err.msg}): fix or delete that line") from None
            if not isinstance(row, dict):
                raise RunFolderError(f"{path} line {number} is not a JSON object: fix or delete that line")
            rows.append(row)
    return rows


def training_rows(rows: list[dict], path: Path) -> list[dict]:
    """metrics.jsonl rows as the run finally took them: a resumed run writes its steps again from its
    checkpoint on, and those rows replace the ones of the interrupted attempt."""
    kept: list[dict] = []
    for row in rows:
        if not isinstance(row.get("step"), (int, float)):
            raise RunFolderError(f"{path}: a row without a numeric 'step' ({str(row)[:80]}): not a metrics file")
        while kept and kept[-1]["step"] >= row["step"]:
            kept.pop()
        kept.append(row)
    return kept


def evaluation_rows(rows: list[dict], path: Path) -> list[dict]:
    """results.jsonl rows in epoch order; a later evaluation of the same epoch replaces an earlier one."""
    by_epoch: dict[float, dict] = {}
    for row in rows:
        if not isinstance(row.get("epoch"), (int, float)):
            raise RunFolderError(f"{path}: a row without a numeric 'epoch' ({str(row)[:80]}): not a results file")
        by_epoch[row["epoch"]] = row
    return [by_epoch[epoch] for epoch in sorted(by_epoch)]


class Timeline:
    """Converts between global steps and epochs of one run.

    Anchors are the points where both are known: the start, the last logged step of every finished
    epoch (the training loop always logs an epoch's last step) and evaluations that record their step.
    Between anchors it interpolates; past the last one it continues with the last epoch's length, or
    with the steps per epoch that params.json's flags give when no epoch has finished.
    """

    def __init__(self, steps: list[float], epochs: list[float], steps_per_epoch: float | None) -> None:
        self.steps, self.epochs = np.asarray(steps, float), np.asarray(epochs, float)
        if len(self.steps) > 1:
            steps_per_epoch = (self.steps[-1] - self.steps[-2]) / (self.epochs[-1] - self.epochs[-2])
        self.steps_per_epoch = steps_per_epoch

    @classmethod
    def of_run(cls, train: list[dict], evals: list[dict], params: dict) -> Timeline:
        anchors = {0.0: 0.0}  # epoch -> step
        # epoch e has finished when a later epoch logged steps, or an evaluation after epoch e+1 or later ran
        finished = max([row.get("epoch", -1) for row in train] + [row["epoch"] for row in evals], default=0)
        for row in train:
            if isinstance(row.get("epoch"), (int, float)) and row["epoch"] < finished:
                anchors[row["epoch"] + 1.0] = float(row["step"])  # rows are in step order: the last one wins
        for row in evals:  # training's own epoch ends win: a mid-epoch checkpoint's evaluation is not one
            if isinstance(row.get("step"), (int, float)):
                anchors.setdefault(float(row["epoch"]), float(row["step"]))
        epochs = sorted(anchors)
        return cls([anchors[e] for e in epochs], epochs, _steps_per_epoch_from_flags(train, params))

    def to_epoch(self, steps: Sequence[float]) -> np.ndarray:
        return self._convert(np.asarray(steps, float), self.steps, self.epochs, self._per_step())

    def to_step(self, epochs: Sequence[float]) -> np.ndarray:
        return self._convert(np.asarray(epochs, float), self.epochs, self.steps, self.steps_per_epoch)

    def _per_step(self) -> float | None:
        return None if not self.steps_per_epoch else 1.0 / self.steps_per_epoch

    @staticmethod
    def _convert(points: np.ndarray, known: np.ndarray, target: np.ndarray, slope: float | None) -> np.ndarray:
        """Interpolate within the anchors, extrapolate past the last with `slope` (NaN when unknown)."""
        out = np.interp(points, known, target)
        beyond = points > known[-1]
        out[beyond] = target[-1] + (points[beyond] - known[-1]) * (math.nan if slope is None else slope)
        return out


def _steps_per_epoch_from_flags(train: list[dict], params: dict) -> float | None:
    """The run's optimizer steps per epoch from its flags (`StepPlan`, --accum-freq included); the number of
    ranks is the ratio of the logged samples/s to the samples/s per rank."""
    samples, batch = params.get("train_num_samples"), params.get("batch_size")
    if not samples or not batch:
        return None
    ranks = 1
    for row in train:
        if row.get("samples_per_second_per_rank"):
            ranks = round(row["samples_per_second"] / row["samples_per_second_per_rank"])
            break
    return float(StepPlan.of_samples(samples, batch, ranks, params.get("accum_freq") or 1).steps_per_epoch)


def numeric_columns(rows: list[dict], skip: set[str]) -> dict[str, list[tuple[int, float]]]:
    """(row position, value) of every number in the rows, by key; booleans and strings are not curves."""
    columns: dict[str, list[tuple[int, float]]] = {}
    for position, row in enumerate(rows):
        for key, value in row.items():
            if key not in skip and isinstance(value, (int, float)) and not isinstance(value, bool):
                columns.setdefault(key, []).append((position, float(value)))
    return columns


def model_temperature(row: dict) -> float | None:
    """The temperature of a training row: FastCLIP logs `tau`; otherwise it is 1 / logit_scale."""
    if "tau" in row:
        return float(row["tau"])
    scale = row.get("logit_scale")
    return 1.0 / scale if isinstance(scale, (int, float)) and scale > 0 else None


def read_run(folder: str | Path, label: str | None = None) -> RunCurves:
    """The series of one run folder (metrics.jsonl and/or results.jsonl)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise RunFolderError(f"{folder}: no such folder; pass a run folder such as logs/NAME")
    metrics_path, results_path = folder / METRICS_FILE, folder / RESULTS_FILE
    if not metrics_path.is_file() and not results_path.is_file():
        raise RunFolderError(f"{folder} is not a run folder (no {METRICS_FILE} and no {RESULTS_FILE}); "
                             "pass a folder the training script wrote, such as logs/NAME")
    params = _read_params(folder / PARAMS_FILE)
    train = training_rows(read_jsonl(metrics_path), metrics_path)
    evals = evaluation_rows(read_jsonl(results_path), results_path)
    timeline = Timeline.of_run(train, evals, params)
    for row in train:
        tau = model_temperature(row)
        if tau is not None:
            row.setdefault("tau", tau)

    train_steps = [float(row["step"]) for row in train]
    train_epochs = timeline.to_epoch(train_steps)
    eval_epochs = [float(row["epoch"]) for row in evals]
    eval_steps = [float(row["step"]) if isinstance(row.get("step"), (int, float)) else float(s)
                  for row, s in zip(evals, timeline.to_step(eval_epochs))]
    series = {}
    for rows, steps, epochs in ((train, train_steps, train_epochs), (evals, eval_steps, eval_epochs)):
        for key, points in numeric_columns(rows, skip={"step", "epoch"}).items():
            series[key] = Series(tuple(steps[i] for i, _ in points), tuple(float(epochs[i]) for i, _ in points),
                                 tuple(value for _, value in points))
    return RunCurves(label or folder.name, folder, series)


def _read_params(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        params = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise RunFolderError(f"{path} is not JSON ({err.msg}): restore it or delete it") from None
    return params if isinstance(params, dict) else {}


def read_runs(folders: Sequence[str | Path]) -> list[RunCurves]:
    """The runs to compare, labelled by folder name (by path where two folders share a name)."""
    folders = [Path(folder) for folder in folders]
    names = [folder.resolve().name for folder in folders]
    return [read_run(folder, name if names.count(name) == 1 else str(folder)) for folder, name in zip(folders, names)]


# --- drawing ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Curve:
    key: str
    label: str = ""
    linestyle: str = "-"
    marker: str | None = None


@dataclass(frozen=True)
class Panel:
    title: str
    ylabel: str
    curves: tuple[Curve, ...]
    percent: bool = False  # fractions in the files, drawn as %
    smoothed: bool = False  # --smooth applies (noisy per-batch values; schedules are left as they are)
    band: tuple[str, str] | None = None  # keys of a lower and an upper bound drawn as a shaded band
    held: bool = False  # a value set per epoch: a logged point holds since the previous one (steps)


PANELS = (
    Panel("training loss", "loss (objective value)", (Curve("loss"),), smoothed=True),
    Panel("temperature τ", "τ (logits = cosine / τ)", (Curve("tau"),), band=("tau_min", "tau_max")),
    Panel("learning rate (model)", "learning rate per step", (Curve("lr"),)),
    Panel("γ (FastCLIP: moving-average rate of u)", "γ", (Curve("gamma"),), held=True),
    Panel("lag of u (FastCLIP)", "g / u of revisited pairs (1: u keeps pace)", (
        Curve("g_over_u", "mean"),
        Curve("g_over_u_typical", "geometric mean", "--"),
    ), smoothed=True),
    Panel("zero-shot accuracy", "accuracy (%)", (
        Curve("imagenet-zeroshot-val-top1", "top-1", "-", "o"),
        Curve("imagenet-zeroshot-val-top5", "top-5", "--", "s"),
    ), percent=True),
    Panel("retrieval recall", "recall (%)", (
        Curve("image_to_text_R@1", "image→text R@1", "-", "o"),
        Curve("text_to_image_R@1", "text→image R@1", "--", "o"),
        Curve("image_to_text_R@10", "image→text R@10", "-", "^"),
        Curve("text_to_image_R@10", "text→image R@10", "--", "^"),
    ), percent=True),
    Panel("global contrastive loss", "mean log g over all pairs", (
        Curve("global_val_loss", "held-out, at the model's τ", "-", "o"),
        Curve("global_val_loss_ref", "held-out, at the reference τ", "--", "s"),
        Curve("train_subset_global_val_loss", "training subset, at the model's τ", "-", "^"),
        Curve("train_subset_global_val_loss_ref", "training subset, at the reference τ", "--", "v"),
    )),
)
X_LABELS = {"step": "step (optimizer steps)", "epoch": "epoch (passes over --train-num-samples)"}


def panels_with_data(runs: Sequence[RunCurves]) -> list[Panel]:
    """The panels at least one run has a number for, in PANELS order."""
    return [panel for panel in PANELS
            if any(run.series.get(curve.key) for run in runs for curve in panel.curves)]


def grid_shape(panels: int) -> tuple[int, int]:
    """(rows, columns) of the panel grid: up to three columns."""
    columns = min(3, max(panels, 1))
    return math.ceil(panels / columns), columns


def figure_pixels(panels: int) -> tuple[int, int]:
    """(width, height) of the PNG for this many panels."""
    rows, columns = grid_shape(panels)
    return round(columns * PANEL_INCHES[0] * DPI), round(rows * PANEL_INCHES[1] * DPI)


def trailing_mean(values: Sequence[float], window: int) -> np.ndarray:
    """Mean of each value and the window - 1 before it, ignoring NaN (a skipped step's loss)."""
    values = np.asarray(values, float)
    valid = ~np.isnan(values)
    kernel = np.ones(window)
    sums = np.convolve(np.where(valid, values, 0.0), kernel)[: len(values)]
    counts = np.convolve(valid.astype(float), kernel)[: len(values)]
    return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def draw(runs: Sequence[RunCurves], x: str = "step", smooth: int = 1) -> Figure:
    """One figure, one panel per quantity that has data, one colour per run (legend on top)."""
    panels = panels_with_data(runs)
    if not panels:
        folders = ", ".join(str(run.folder) for run in runs)
        raise RunFolderError(f"{folders}: nothing to plot yet ({METRICS_FILE} and {RESULTS_FILE} hold no numbers)")
    rows, columns = grid_shape(len(panels))
    width, height = figure_pixels(len(panels))
    figure = Figure(figsize=(width / DPI, height / DPI), dpi=DPI, layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    for ax in axes[1 : len(panels)]:
        ax.sharex(axes[0])  # one x range in every panel, so that a step lines up across them
    for ax, panel in zip(axes, panels):
        _draw_panel(ax, panel, runs, x, smooth)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    handles = [Line2D([], [], color=_colour(i), lw=2) for i in range(len(runs))]
    figure.legend(handles, [run.label for run in runs], loc="outside upper center", ncols=min(len(runs), 4))
    return figure


def _colour(index: int) -> str:
    return f"C{index % 10}"


def _draw_panel(ax, panel: Panel, runs: Sequence[RunCurves], x: str, smooth: int) -> None:
    scale = 100.0 if panel.percent else 1.0
    for index, run in enumerate(runs):
        colour = _colour(index)
        if panel.band is not None and all(key in run.series for key in panel.band):
            low, high = (run.series[key] for key in panel.band)
            ax.fill_between(low.x(x), low.value, high.value, color=colour, alpha=0.2, lw=0)
        for curve in panel.curves:
            series = run.series.get(curve.key)
            if not series:
                continue
            xs, values = series.x(x), np.asarray(series.value) * scale
            marker = curve.marker or ("." if len(xs) == 1 else None)
            if panel.smoothed and smooth > 1:
                ax.plot(xs, values, color=colour, alpha=0.25, lw=1)
                values = trailing_mean(values, smooth)
            ax.plot(xs, values, color=colour, linestyle=curve.linestyle, marker=marker, fillstyle="none",
                    ms=4 + 2 * (len(runs) - 1 - index),  # larger for earlier runs: equal points stay visible
                    drawstyle="steps-pre" if panel.held else "default")
    title = panel.title + (f" (mean of {smooth} logged steps)" if panel.smoothed and smooth > 1 else "")
    ax.set(title=title, xlabel=X_LABELS[x], ylabel=panel.ylabel)
    ax.grid(alpha=0.3)
    styles: list = [Line2D([], [], color="0.3", linestyle=c.linestyle, marker=c.marker, fillstyle="none",
                           label=c.label) for c in panel.curves if c.label]
    if panel.band is not None and any(all(key in run.series for key in panel.band) for run in runs):
        styles.append(Patch(color="0.3", alpha=0.2, label="per-sample τ min–max"))
    if styles:
        ax.legend(handles=styles, fontsize="small")


# --- command line ----------------------------------------------------------------------------------

def default_output(folders: Sequence[Path]) -> Path:
    """RUN_DIR/curves.png for one run, ./curves.png for a comparison."""
    return folders[0] / "curves.png" if len(folders) == 1 else Path("curves.png")


def unplaced_points(runs: Sequence[RunCurves], axis: str) -> Iterator[tuple[RunCurves, str]]:
    """(run, key) of series with points whose position on `axis` is unknown."""
    for run in runs:
        for key, series in run.series.items():
            if any(math.isnan(v) for v in series.x(axis)):
                yield run, key


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="fastclip-plot", description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR", help="run folders (logs/NAME)")
    parser.add_argument("--out", type=Path, help="PNG to write (default: RUN_DIR/curves.png for one run, "
                                                 "./curves.png for several)")
    parser.add_argument("--x", choices=AXES, default="step", help="x axis (default: step)")
    parser.add_argument("--smooth", type=int, default=1, metavar="N",
                        help="draw the training loss as a trailing mean over N logged steps (default: 1, raw)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    """Plot the runs and say where the PNG went (returns None: it is the `fastclip-plot` console script)."""
    args = parse_args(argv)
    if args.smooth < 1:
        raise SystemExit(f"error: --smooth {args.smooth}: N is a number of logged steps, 1 or more")
    out = args.out or default_output(args.runs)
    if out.suffix.lower() != ".png":
        raise SystemExit(f"error: --out {out}: the plot is a PNG, give a file name ending in .png")
    try:
        runs = read_runs(args.runs)
        figure = draw(runs, args.x, args.smooth)
    except RunFolderError as err:
        raise SystemExit(f"error: {err}") from None
    unplaced = next(unplaced_points(runs, args.x), None)
    if unplaced is not None:
        run, key = unplaced
        other = "epoch" if args.x == "step" else "step"
        raise SystemExit(f"error: {run.folder}: {key} has points with no known {args.x} (neither logged nor "
                         f"derivable from {METRICS_FILE} / {PARAMS_FILE}); plot with --x {other}")
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out)
    print(f"wrote {out} ({', '.join(p.title for p in panels_with_data(runs))}; runs: "
          f"{', '.join(run.label for run in runs)})")


if __name__ == "__main__":
    main()
