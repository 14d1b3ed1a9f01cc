"""The regime map: OpenCLIP against FastCLIP as the number of distinct pairs grows, visits per pair fixed.

bench/long.py measured one point: 2,000 pairs visited 30 times each, where FastCLIP with the paper's
long memory of u (gamma 0.2) trails OpenCLIP. The paper's regime is the other end (millions of pairs
a model cannot memorise). This benchmark holds the model, the schedule, the global batch (2x32) and
the visits per pair (20 epochs) fixed and grows the training set of `fastclip.datasets.fonts`: 2,000,
10,000 and 20,000 pairs, then every character the installed fonts draw. The held-out split is the same
500 characters at every size (the first of the seeded order, drawn in a font never trained on), so the
sizes differ only in how many other pairs share the batches. At every size it trains:
- OpenCLIP and FastCLIP-v3, the README's flags (gamma 0.2 decayed over half the epochs), 3 seeds up
  to 20,000 pairs and 2 beyond;
- FastCLIP-v3 with `--clamp_u_to_g 2` (u's memory kept, no step weighing an anchor beyond a factor 2 of
  the mini-batch softmax), seeds 0 and 1, up to 20,000 pairs;
and at 20,000 pairs, 2 seeds each:
- FastCLIP-v3 with the README's small-data flags (`--gamma 0.5`), and with u the mini-batch's g (`--gamma 1
  --gamma_schedule constant`), which led at 2,000 pairs x 30 epochs;
- OpenCLIP with its temperature fixed at 0.07 and FastCLIP-v1 at the same tau: the two differ in u alone;
- FastCLIP-v3 with `--clamp_u_to_g 1.5`, the factor that tied OpenCLIP at 2,000 pairs x 30 epochs.
Every other epoch each run scores the held-out split (R@1, R@10 and the global contrastive loss at tau
0.07, the low-noise signal) and the first 500 training pairs (their global loss); FastCLIP's log lines
carry `g_over_u` / `g_over_u_typical` (how a pair's mini-batch g compares with its u), reported per
third of the run.

Runs are ordered seeds outermost and small sizes first, so that a partial map already compares every
size. Each finished run is recorded in bench/results/scale/ (committed: its settings, curves, g/u and
time): a run whose record has the same settings is not trained again, on this machine or a fresh clone,
and `--report` writes the map from the records alone.

    python bench/scale.py            # make bench-scale: 38 runs, ~8 h on 2 cores
    python bench/scale.py --report   # the map from the finished runs, training nothing
    python bench/scale.py --quick    # smoke test (~4 min): 300 and 600 pairs, 4 epochs, 1 seed
    python bench/scale.py --sizes 2000 20000 --contenders OpenCLIP FastCLIP-v3   # a part of the map first
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

from common import OUT_DIR, ROOT, markdown_table, save_figure, write_report
from convergence import VERSIONS
from fonts import OPTIM, RANKS, Run, fonts_data
from long import LOSSES, Curve, Group, Scale, difference_cells, long_argv, mean_curve, steps_to_reach, train
from long_study import lag_windows

from fastclip.datasets.fonts import FontsData

BATCH = 32  # per rank
ALL = 0  # a size of 0 pairs: every character the installed fonts draw
# contender -> (version whose flags it trains, flags appended after them: argparse keeps the last)
CONTENDERS: dict[str, tuple[str, tuple[str, ...]]] = {
    "OpenCLIP": ("OpenCLIP", ()),
    "FastCLIP-v3": ("FastCLIP-v3", ()),
    "FastCLIP-v3 gamma 0.5": ("FastCLIP-v3", ("--gamma", "0.5")),
    "FastCLIP-v3 gamma 1": ("FastCLIP-v3", ("--gamma", "1.0", "--gamma_schedule", "constant")),
    "OpenCLIP-fixed-tau": ("OpenCLIP-fixed-tau", ()),
    "FastCLIP-v1": ("FastCLIP-v1", ()),
    "FastCLIP-v3 clamp_u_to_g 2": ("FastCLIP-v3", ("--clamp_u_to_g", "2")),
    "FastCLIP-v3 clamp_u_to_g 1.5": ("FastCLIP-v3", ("--clamp_u_to_g", "1.5")),
}
REFERENCE = {**{name: "OpenCLIP" for name in CONTENDERS if name.startswith("FastCLIP-v3")},
             "FastCLIP-v1": "OpenCLIP-fixed-tau"}


@dataclass(frozen=True)
class Map:
    sizes: tuple[int, ...]  # training pairs (ALL: every character)
    test_pairs: int
    epochs: int
    eval_every: int
    main_seeds: tuple[int, ...]  # OpenCLIP and FastCLIP-v3 up to `large`
    large: int  # sizes above it (and ALL) get `large_seeds`
    large_seeds: tuple[int, ...]
    robust: tuple[str, ...]  # trained at the sizes up to `large`, seeds `robust_seeds` (within the size's own seeds)
    robust_seeds: tuple[int, ...]
    extra_size: int  # where the extra contenders train
    extra_seeds: tuple[int, ...]
    extras: tuple[str, ...]
    records: Path


FULL = Map(sizes=(2_000, 10_000, 20_000, ALL), test_pairs=500, epochs=20, eval_every=2, main_seeds=(0, 1, 2),
           large=20_000, large_seeds=(0, 1), robust=("FastCLIP-v3 clamp_u_to_g 2",), robust_seeds=(0, 1),
           extra_size=20_000, extra_seeds=(0, 1),
           extras=("FastCLIP-v3 gamma 0.5", "FastCLIP-v3 gamma 1", "OpenCLIP-fixed-tau", "FastCLIP-v1", "FastCLIP-v3 clamp_u_to_g 1.5"),
           records=ROOT / "bench" / "results" / "scale")
QUICK = Map(sizes=(300, 600), test_pairs=100, epochs=4, eval_every=2, main_seeds=(0,), large=600,
            large_seeds=(0,), robust=(), robust_seeds=(), extra_size=600, extra_seeds=(), extras=(), records=OUT_DIR / "scale-quick" / "records")


@dataclass(frozen=True)
class Cell:
    """One run of the map."""

    pairs: int
    contender: str
    seed: int

    @property
    def run(self) -> Run:
        return Run(BATCH, CONTENDERS[self.contender][0], self.seed)

    @property
    def name(self) -> str:
        size = "all" if self.pairs == ALL else str(self.pairs)
        return f"{size}-{self.contender.replace(' ', '-')}-s{self.seed}"


def plan(m: Map) -> list[Cell]:
    """Every run, in the order they train: seeds outermost, then sizes, then contenders."""
    seeds = sorted({*m.main_seeds, *m.large_seeds, *m.extra_seeds})
    cells = []
    for seed in seeds:
        for pairs in sorted(m.sizes, key=lambda p: math.inf if p == ALL else p):
            big = pairs == ALL or pairs > m.large
            if seed in (m.large_seeds if big else m.main_seeds):
                cells += [Cell(pairs, c, seed) for c in ("OpenCLIP", "FastCLIP-v3")]
                if seed in m.robust_seeds and not big:
                    cells += [Cell(pairs, c, seed) for c in m.robust]
            if pairs == m.extra_size and seed in m.extra_seeds:
                cells += [Cell(pairs, c, seed) for c in m.extras]
    return cells


def long_scale(m: Map, pairs: int) -> Scale:
    """bench/long.py's Scale for one size of the map (what long_argv reads: epochs, cadence, test pairs)."""
    return Scale(train_pairs=pairs, test_pairs=m.test_pairs, epochs=m.epochs, eval_every=m.eval_every,
                 seeds=(), batches=(BATCH,), versions=())


def settings(cell: Cell, m: Map) -> dict:
    """What makes a run the same run: a record with other settings is trained again."""
    version, extra = CONTENDERS[cell.contender]
    return {"pairs": cell.pairs, "test_pairs": m.test_pairs, "seed": cell.seed, "batch": BATCH, "ranks": RANKS,
            "epochs": m.epochs, "eval_every": m.eval_every, "optim": asdict(OPTIM),
            "flags": [*LOSSES[version], *extra]}


def data_for(m: Map, pairs: int) -> FontsData:
    """The size's shards (fonts.fonts_data; the same held-out split at every size)."""
    return fonts_data(pairs or None, m.test_pairs)


@dataclass
class Record:
    cell: Cell
    curve: Curve
    pairs_trained: int  # the training pairs, ALL resolved
    lag: dict[str, list[float]]  # g_over_u (mean) and g_over_u_typical (geometric) per third of the run


def record_path(cell: Cell, m: Map) -> Path:
    return m.records / f"{cell.name}.json"


def load_record(cell: Cell, m: Map) -> Record | None:
    path = record_path(cell, m)
    if not path.is_file():
        return None
    raw = json.loads(path.read_text())
    if raw["settings"] != settings(cell, m):
        return None
    curve = Curve(cell.run, raw["steps"], raw["values"], raw["final_tau"], raw["seconds"])
    return Record(cell, curve, raw["pairs_trained"], raw["lag"])


def train_cell(cell: Cell, m: Map) -> Record:
    """Train the cell's run (bench/long.py's flags at this size) and record it."""
    data = data_for(m, cell.pairs)
    logs = OUT_DIR / "scale" / f"fonts-{cell.pairs or 'all'}" / "logs"
    version, extra = CONTENDERS[cell.contender]
    argv = long_argv(cell.run, data, long_scale(m, cell.pairs), logs, extra)
    argv[argv.index("--name") + 1] = cell.name
    curve = train(cell.run, argv, logs)
    run_dir = logs / cell.name
    lag = {key: lag_windows(run_dir, m.epochs, key, geometric=key.endswith("typical"))
           for key in ("g_over_u", "g_over_u_typical")}
    record = Record(cell, curve, data.num_samples, lag)
    path = record_path(cell, m)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"settings": settings(cell, m), "pairs_trained": data.num_samples,
                                "steps": curve.steps, "values": curve.values, "final_tau": curve.final_tau,
                                "seconds": curve.seconds, "lag": lag}, indent=1) + "\n")
    return record


# --------------------------------------------------------------------------------------- the map


def groups_of(records: Sequence[Record]) -> dict[tuple[int, str], Group]:
    """(pairs, contender) -> its runs (long.py's Group: mean and s.e. over seeds, `batch` holds the pairs)."""
    groups: dict[tuple[int, str], Group] = {}
    for r in records:
        groups.setdefault((r.cell.pairs, r.cell.contender), Group(r.cell.pairs, r.cell.contender, [])).curves.append(r.curve)
    return groups


def size_label(pairs: int, records: Sequence[Record]) -> str:
    if pairs != ALL:
        return f"{pairs:,}"
    trained = {r.pairs_trained for r in records if r.cell.pairs == pairs}
    return f"{next(iter(trained)):,} (all)" if trained else "every character"


def verdict(mean: float, error: float) -> str:
    """leads / trails when the difference is beyond two standard errors, else ties."""
    if error == 0:
        return "one seed"
    return "leads" if mean > 2 * error else "trails" if mean < -2 * error else "ties"


def mean_lag(records: Sequence[Record], pairs: int, contender: str) -> tuple[list[float], list[float]]:
    """g_over_u and g_over_u_typical per third of the run, averaged over the seeds of (pairs, contender)."""
    lags = [r.lag for r in records if r.cell.pairs == pairs and r.cell.contender == contender]
    return tuple([sum(values) / len(lags) for values in zip(*(lag[key] for lag in lags))]
                 for key in ("g_over_u", "g_over_u_typical"))


def lag_pair(mean: float, typical: float) -> str:
    """`mean / typical` g/u, the mean in powers of ten once it is large (with gamma 1, u is the previous
    visit's g and their ratio spans orders of magnitude)."""
    return f"{mean:.2f} / {typical:.2f}" if mean < 1000 else f"{mean:.1e} / {typical:.2f}"


def final_table(records: Sequence[Record]) -> str:
    rows = []
    for (pairs, contender), g in groups_of(records).items():
        mean, typical = mean_lag(records, pairs, contender)
        lag_cell = "" if "FastCLIP" not in contender else lag_pair(mean[-1], typical[-1])
        rows.append([size_label(pairs, records), contender, str(len(g.curves)),
                     *(f"{100 * g.final(k)[0]:.2f} ± {100 * g.final(k)[1]:.2f}" for k in ("R@1", "R@10")),
                     *(f"{g.final(k)[0]:.4f} ± {g.final(k)[1]:.4f}" for k in ("GCL", "train GCL")),
                     f"{sum(c.final_tau for c in g.curves) / len(g.curves):.4f}", lag_cell])
    return markdown_table(["pairs", "contender", "seeds", "held-out R@1 (%)", "held-out R@10 (%)",
                           "held-out GCL @0.07", "train-subset GCL @0.07", "final tau",
                           "g_over_u / typical (last third)"], rows)


def differences(records: Sequence[Record]) -> list[dict]:
    """Per size and FastCLIP contender: the difference to its reference (mean +- s.e.) and the time to
    accuracy both ways (long.py's definitions)."""
    groups = groups_of(records)
    rows = []
    for (pairs, contender), g in groups.items():
        reference = groups.get((pairs, REFERENCE.get(contender, "")))
        if reference is None:
            continue
        seeds = min(len(g.curves), len(reference.curves))
        (mine, mine_error), (theirs, theirs_error) = g.final("R@10"), reference.final("R@10")
        delta, error = mine - theirs, math.hypot(mine_error, theirs_error) if seeds > 1 else 0.0
        own_curve, reference_curve = mean_curve(g.curves, "R@10"), mean_curve(reference.curves, "R@10")
        rows.append({"pairs": pairs, "label": size_label(pairs, records), "contender": contender,
                     "reference": reference.version, "cells": difference_cells(g, reference),
                     "delta_R@10": delta, "error_R@10": error,
                     "delta_GCL": g.final("GCL")[0] - reference.final("GCL")[0],
                     "error_GCL": math.hypot(g.final("GCL")[1], reference.final("GCL")[1]),
                     "verdict": verdict(delta, error), "run_steps": reference.steps[-1],
                     "steps": steps_to_reach(g.steps, own_curve, reference_curve[-1]),
                     "reference_steps": steps_to_reach(reference.steps, reference_curve, own_curve[-1])})
    return rows


def difference_table(rows: Sequence[dict]) -> str:
    def fraction(steps: float | None, total: int) -> str:
        return "not reached" if steps is None else f"{steps / total:.2f}"

    return markdown_table(
        ["pairs", "difference", "Δ R@1 (pp)", "Δ R@10 (pp)", "Δ GCL", "Δ train GCL", "R@10 verdict",
         "FastCLIP's steps to the reference's final R@10", "the reference's steps to FastCLIP's"],
        [[r["label"], f"{r['contender']} − {r['reference']}", *r["cells"], r["verdict"],
          fraction(r["steps"], r["run_steps"]), fraction(r["reference_steps"], r["run_steps"])] for r in rows])


def lag_table(records: Sequence[Record]) -> str:
    rows = []
    for pairs, contender in groups_of(records):
        if "FastCLIP" not in contender:
            continue
        mean, typical = mean_lag(records, pairs, contender)
        rows.append([size_label(pairs, records), contender, *(lag_pair(a, b) for a, b in zip(mean, typical))])
    return markdown_table(["pairs", "contender", "first third", "second third", "last third"], rows)


def plot(rows: Sequence[dict], records: Sequence[Record], path: Path) -> None:
    """Difference to the reference vs training pairs (log scale), per contender, with +-s.e. bars: held-out
    R@10 and held-out global loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trained = {r.cell.pairs: r.pairs_trained for r in records}
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for contender in dict.fromkeys(r["contender"] for r in rows):
        mine = sorted((r for r in rows if r["contender"] == contender), key=lambda r: trained[r["pairs"]])
        xs = [trained[r["pairs"]] for r in mine]
        axes[0].errorbar(xs, [100 * r["delta_R@10"] for r in mine], yerr=[100 * r["error_R@10"] for r in mine],
                         fmt="o-", capsize=3, label=f"{contender} − {mine[0]['reference']}")
        axes[1].errorbar(xs, [r["delta_GCL"] for r in mine], yerr=[r["error_GCL"] for r in mine], fmt="o-",
                         capsize=3, label=f"{contender} − {mine[0]['reference']}")
    for ax, ylabel in zip(axes, ("Δ held-out R@10 (pp, higher is better)", "Δ held-out GCL @0.07 (lower is better)")):
        ax.axhline(0, color="grey", lw=0.8)
        ax.set(xscale="log", xlabel="distinct training pairs", ylabel=ylabel)
        sizes = sorted(set(trained.values()))
        ax.set_xticks(sizes, [f"{size:,}" for size in sizes])
        ax.minorticks_off()
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    save_figure(fig, path)


def report(records: list[Record], m: Map, figure: Path, missing: int, name: str) -> Path:
    rows = differences(records)
    plot(rows, records, figure)
    hours = sum(r.curve.seconds for r in records) / 3600
    body = (
        f"- `fastclip.datasets.fonts`: {', '.join(size_label(p, records) for p in m.sizes)} training pairs, "
        f"the same {m.test_pairs} held-out characters at every size (drawn in a font never trained on; chance "
        f"R@10 {1000 / m.test_pairs:.1f} %). {m.epochs} epochs (every pair visited {m.epochs} times) at global batch "
        f"{RANKS}x{BATCH}, evaluated every {m.eval_every} epochs; bench/long.py's model (`ViT-Tiny-32px`, token "
        f"and positional embeddings frozen), optimiser and schedule; FastCLIP's gamma decayed over "
        f"{max(1, m.epochs // 2)} epochs.\n"
        f"- {len(records)} runs finished ({hours:.1f} h of training and evaluation), {missing} of the plan not yet "
        f"run (`python bench/scale.py` trains them; finished runs are recorded in bench/results/scale/).\n\n"
        f"Final values, mean ± s.e. over seeds; g_over_u / g_over_u_typical in the last third of the run "
        f"(mean over seeds):\n\n{final_table(records)}\n\n"
        f"FastCLIP minus its reference (± s.e.; R@10 verdict: beyond two standard errors), and the time to "
        f"accuracy as a fraction of the run:\n\n{difference_table(rows)}\n\n"
        f"How far u lags the model over the run (g_over_u / g_over_u_typical per third, mean over seeds):\n\n"
        f"{lag_table(records)}\n\n"
        f"![difference to the reference vs pairs]({figure.relative_to(ROOT / 'docs').as_posix() if figure.is_relative_to(ROOT / 'docs') else figure})\n"
    )
    raw = {"map": {**asdict(m), "records": str(m.records)}, "contenders": CONTENDERS, "differences": rows}
    title = f"The regime map: FastCLIP against OpenCLIP as the pairs grow, {m.epochs} visits each"
    return write_report(name, title, body, raw)


def main(argv: Sequence[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke test: 300 and 600 pairs, 4 epochs, 1 seed")
    parser.add_argument("--report", action="store_true", help="write the map from the recorded runs, train nothing")
    parser.add_argument("--sizes", type=int, nargs="+", metavar="PAIRS",
                        help=f"train only the runs of these sizes ({ALL}: every character); the report has every record")
    parser.add_argument("--contenders", nargs="+", choices=sorted(CONTENDERS), metavar="NAME",
                        help="train only these contenders (quote names with spaces)")
    args = parser.parse_args(argv)
    m, name = (QUICK, "scale-quick") if args.quick else (FULL, "scale")
    cells = plan(m)
    records = []
    for i, cell in enumerate(cells, 1):
        record = load_record(cell, m)
        wanted = (args.sizes is None or cell.pairs in args.sizes) and (
            args.contenders is None or cell.contender in args.contenders)
        if record is None and wanted and not args.report:
            started = time.perf_counter()
            record = train_cell(cell, m)
            print(f"[{i}/{len(cells)}] {cell.name}: R@10 {100 * record.curve.values['R@10'][-1]:.2f} %, "
                  f"GCL {record.curve.values['GCL'][-1]:.4f} ({time.perf_counter() - started:.0f} s)", flush=True)
        if record is not None:
            records.append(record)
    figure = (OUT_DIR / name if args.quick else ROOT / "docs" / "img") / "scale_map.png"
    path = report(records, m, figure, len(cells) - len(records), name)
    print(path.read_text())
    return path


if __name__ == "__main__":
    main()
