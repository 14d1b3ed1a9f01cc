"""What it takes: bench/long.py's 30-visit setting, one setting changed at a time, one seed.

Every variant trains bench/long.py's data, model and schedule at global batch 2x16, seed 0, and
changes one flag (appended, so argparse keeps it):
- the same learning-rate search for both losses (lr 5e-4 and 2e-3 besides 1e-3), and the initial
  temperature 0.03 for both;
- FastCLIP-v3's own settings: the gamma floor (`--gamma` 0.1, 0.5), how fast gamma reaches it
  (`--gamma_decay_epochs` 5 instead of 15), the DRO radius `--rho` (5 and 8 around log(2,000) = 7.6),
  and `--lr_tau` 2e-3 (10x: the paper's 2e-4 was set for ~100k-step runs);
- the estimator itself: FastCLIP-v1 and v3 with a constant gamma of 1, so that u_i is the current
  mini-batch's g_i and the gradient is that of the mini-batch loss log g_i(B) (v1: the same fixed
  tau as OpenCLIP-fixed-tau; the two then differ only in the positive pair's term in the softmax's
  denominator), the eps of g / (eps + u) at 1e-3 instead of 1e-14, and v3 with the opt-in normaliser
  clamp `--clamp_u_to_g` 1.5, 2 and 4 (u's memory kept, each step's weights within a factor C of the
  mini-batch softmax's);
- the batch: OpenCLIP and FastCLIP-v3 at 2x64 and 2x128 (2x16 and 2x32 come from bench/long.py).
The baselines (OpenCLIP and FastCLIP-v3 at 2x16 and 2x32, OpenCLIP-fixed-tau and FastCLIP-v1 at
2x16, seed 0) are bench/long.py's runs, reused from its folder
when it ran first. The report gives each variant's final held-out values, its difference to its
version's baseline, and the steps to reach OpenCLIP's final R@10 at the same batch (baseline flags).
Then the memory of u (gamma 0.5 and 1 beside the default 0.2, v1 and v3) over bench/long.py's three
seeds, against the baselines' three seeds from bench/long.py; and v3's three memories once more, seed 0,
logging every 10 steps how the pairs' mini-batch g compares with their u (`g_over_u`).

    python bench/long_study.py            # 37 runs besides bench/long.py's, ~85 min on 2 cores
    python bench/long_study.py --quick    # smoke test on bench/long.py's quick data
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

from common import OUT_DIR, markdown_table, read_jsonl, write_report
from fonts import RANKS, Run, load_data
from long import (FULL, QUICK, REFERENCE, Curve, Group, Scale, cell, difference_cells, long_argv, run_dir_of,
                  steps_to_reach, train)

SEED = 0
MINI_BATCH_U = ("--gamma", "1.0", "--gamma_schedule", "constant")  # u_i <- g_i(B) at every visit
# the opt-in normaliser clamp: u within a factor C of the step's g (C = 1: the mini-batch's normalisation)
CLAMPS = tuple(("--clamp_u_to_g", factor) for factor in ("1.5", "2", "4"))


@dataclass(frozen=True)
class Variant:
    label: str
    version: str
    extra: tuple[str, ...] = ()
    batch: int = 16
    seed: int = SEED

    def run(self) -> Run:
        return Run(self.batch, self.version, self.seed)

    @property
    def slug(self) -> str:
        return "-".join(part.lstrip("-") for part in self.extra)


VARIANTS = (
    Variant("OpenCLIP", "OpenCLIP"),
    Variant("OpenCLIP, lr 5e-4", "OpenCLIP", ("--lr", "5e-4")),
    Variant("OpenCLIP, lr 2e-3", "OpenCLIP", ("--lr", "2e-3")),
    Variant("OpenCLIP, temperature 0.03", "OpenCLIP", ("--temperature", "0.03")),
    Variant("FastCLIP-v3", "FastCLIP-v3"),
    Variant("FastCLIP-v3, lr 5e-4", "FastCLIP-v3", ("--lr", "5e-4")),
    Variant("FastCLIP-v3, lr 2e-3", "FastCLIP-v3", ("--lr", "2e-3")),
    Variant("FastCLIP-v3, temperature 0.03", "FastCLIP-v3", ("--temperature", "0.03")),
    Variant("FastCLIP-v3, gamma 0.1", "FastCLIP-v3", ("--gamma", "0.1")),
    Variant("FastCLIP-v3, gamma 0.5", "FastCLIP-v3", ("--gamma", "0.5")),
    Variant("FastCLIP-v3, gamma_decay_epochs 5", "FastCLIP-v3", ("--gamma_decay_epochs", "5")),
    Variant("FastCLIP-v3, rho 5", "FastCLIP-v3", ("--rho", "5.0")),
    Variant("FastCLIP-v3, rho 8", "FastCLIP-v3", ("--rho", "8.0")),
    Variant("FastCLIP-v3, lr_tau 2e-3", "FastCLIP-v3", ("--lr_tau", "2e-3")),
    Variant("FastCLIP-v3, fastclip_eps 1e-3", "FastCLIP-v3", ("--fastclip_eps", "1e-3")),
    Variant("FastCLIP-v3, gamma 1 (u = the mini-batch's g)", "FastCLIP-v3", MINI_BATCH_U),
    *(Variant(f"FastCLIP-v3, clamp_u_to_g {clamp[1]}", "FastCLIP-v3", clamp) for clamp in CLAMPS),
    Variant("OpenCLIP-fixed-tau", "OpenCLIP-fixed-tau"),
    Variant("FastCLIP-v1", "FastCLIP-v1"),
    Variant("FastCLIP-v1, gamma 1 (u = the mini-batch's g)", "FastCLIP-v1", MINI_BATCH_U),
    *(Variant(f"{version}, {RANKS}x{batch}", version, batch=batch)
      for batch in (32, 64, 128) for version in ("OpenCLIP", "FastCLIP-v3")),
)


# u's memory, the setting whose one-seed effect exceeded a seed's spread, rerun over bench/long.py's seeds
MEMORY = tuple(v for v in VARIANTS
               if v.batch == 16 and (not v.extra or v.extra in (MINI_BATCH_U, ("--gamma", "0.5"), *CLAMPS)))


# u's lag, logged every 10 steps (the logging alone changes nothing in training)
LAG_VARIANTS = tuple(replace(v, extra=v.extra + ("--log-every-n-steps", "10"))
                     for v in MEMORY if v.version == "FastCLIP-v3")


def variant_argv(variant: Variant, data, scale: Scale, logs: Path) -> list[str]:
    """A baseline (no extra flag) is bench/long.py's own run; a variant gets its own folder."""
    argv = long_argv(variant.run(), data, scale, logs, variant.extra)
    if variant.extra:
        argv[argv.index("--name") + 1] = f"study-{variant.slug}-{variant.run().name}"
    return argv


def run_variant(variant: Variant, data, scale: Scale, logs: Path) -> Curve:
    return train(variant.run(), variant_argv(variant, data, scale, logs), logs)


def lag_windows(run_dir: Path, epochs: int, key: str, geometric: bool, windows: int = 3) -> list[float]:
    """The logged `key` averaged over each third of the run's steps, arithmetically or geometrically (as
    g_over_u and g_over_u_typical are formed)."""
    parts: list[list[float]] = [[] for _ in range(windows)]
    for row in read_jsonl(run_dir / "metrics.jsonl"):
        if key in row:
            parts[min(windows - 1, row["epoch"] * windows // epochs)].append(math.log(row[key]) if geometric else row[key])
    means = [sum(p) / len(p) if p else math.nan for p in parts]
    return [math.exp(m) for m in means] if geometric else means


def study_table(variants: Sequence[Variant], curves: dict[Variant, Curve]) -> str:
    base = {(v.version, v.batch): curves[v] for v in variants if not v.extra}
    rows = []
    for variant in variants:
        curve = curves[variant]
        own, openclip = base[variant.version, variant.batch], base["OpenCLIP", variant.batch]
        final = {m: curve.values[m][-1] for m in ("R@1", "R@10", "GCL", "train GCL")}
        target = openclip.values["R@10"][-1]
        reached = steps_to_reach(curve.steps, curve.values["R@10"], target)
        delta = ("" if not variant.extra else
                 f"{100 * (final['R@1'] - own.values['R@1'][-1]):+.2f} / "
                 f"{100 * (final['R@10'] - own.values['R@10'][-1]):+.2f} / {final['GCL'] - own.values['GCL'][-1]:+.4f}")
        rows.append([variant.label, f"{RANKS}x{variant.batch}", f"{100 * final['R@1']:.2f}", f"{100 * final['R@10']:.2f}",
                     f"{final['GCL']:.4f}", f"{final['train GCL']:.4f}", f"{curve.final_tau:.4f}", delta,
                     "not reached" if reached is None else f"{reached / curve.steps[-1]:.2f}"])
    return markdown_table(["setting", "batch", "R@1 (%)", "R@10 (%)", "GCL @0.07", "train GCL @0.07", "final tau",
                           "Δ vs its baseline (R@1 / R@10 / GCL)", "steps to OpenCLIP's final R@10"], rows)


def memory_table(groups: dict[Variant, Group]) -> str:
    """Each memory variant over seeds, and its difference to its version's default and to the version's
    OpenCLIP reference (± the standard error of a difference of two means)."""
    default = {v.version: groups[v] for v in groups if not v.extra}
    rows = []
    for variant, g in groups.items():
        reference = default.get(REFERENCE.get(variant.version, ""))
        to_default = difference_cells(g, default[variant.version]) if variant.extra else ["", "", "", ""]
        to_reference = difference_cells(g, reference) if reference is not None else ["", "", "", ""]
        rows.append([variant.label, str(len(g.curves)),
                     *(cell(*g.final(metric), percent="GCL" not in metric) for metric in ("R@1", "R@10", "train GCL")),
                     to_default[1], to_reference[1], to_reference[3]])
    return markdown_table(["setting (2x16)", "seeds", "R@1 (%)", "R@10 (%)", "train GCL @0.07",
                           "Δ R@10 vs the version's default", "Δ R@10 vs its OpenCLIP reference",
                           "Δ train GCL vs its OpenCLIP reference"], rows)


def lag_table(run_dirs: dict[Variant, Path], epochs: int) -> str:
    third = epochs // 3
    spans = [f"epochs {a}-{b - 1}" for a, b in ((0, third), (third, 2 * third), (2 * third, epochs))]
    rows = [[variant.label, *(f"{mean:.3g} / {typical:.2f}" for mean, typical in
                              zip(lag_windows(run_dir, epochs, "g_over_u", geometric=False),
                                  lag_windows(run_dir, epochs, "g_over_u_typical", geometric=True)))]
            for variant, run_dir in run_dirs.items()]
    return markdown_table([f"setting (2x16, seed {SEED})", *(f"g / u, {span}: mean / geometric" for span in spans)], rows)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke test: bench/long.py's quick data, 4 variants")
    quick = parser.parse_args(argv).quick
    scale, name, variants = ((QUICK, "long_study-quick", VARIANTS[:2] + VARIANTS[4:6]) if quick
                             else (FULL, "long_study", VARIANTS))
    started = time.perf_counter()
    data = load_data(scale)
    logs = OUT_DIR / ("long-quick" if quick else "long") / "logs"  # bench/long.py's, so its runs are reused
    curves: dict[Variant, Curve] = {}
    for index, variant in enumerate(variants):
        curves[variant] = curve = run_variant(variant, data, scale, logs)
        print(f"[{index + 1}/{len(variants)}] {variant.label} ({RANKS}x{variant.batch}): R@10 "
              f"{100 * curve.values['R@10'][-1]:.2f} %, GCL {curve.values['GCL'][-1]:.4f}, {curve.seconds:.0f} s",
              flush=True)
    memory: dict[Variant, Group] = {}
    for variant in (v for v in MEMORY if v in curves):
        seeds = [curves[variant]] + [run_variant(replace(variant, seed=seed), data, scale, logs)
                                     for seed in scale.seeds if seed != SEED]
        memory[variant] = Group(variant.batch, variant.version, seeds)
        print(f"[memory] {variant.label}: R@10 {cell(*memory[variant].final('R@10'), percent=True)} %", flush=True)
    lag_dirs: dict[Variant, Path] = {}
    for variant in LAG_VARIANTS if memory else ():
        argv = variant_argv(variant, data, scale, logs)
        train(variant.run(), argv, logs)
        lag_dirs[variant] = run_dir_of(argv, logs)
    body = (
        f"bench/long.py's data, model and schedule ({scale.epochs} epochs), seed {SEED}, one setting changed at a "
        f"time; final held-out values (R@1 and R@10: the mean of both directions; GCL: the global loss of the "
        f"held-out pairs, train GCL: of the first {scale.test_pairs} training pairs, at tau 0.07, lower is "
        f"better). The last column is the fraction of the run a variant needs to reach OpenCLIP's final R@10 at "
        f"its batch (OpenCLIP's flags, seed {SEED}).\n\n{study_table(variants, curves)}\n\n"
    )
    if memory:
        body += (f"The memory of u over seeds {', '.join(map(str, scale.seeds))} (gamma 0.2 is the default, 1 makes "
                 f"u the mini-batch's g; v3's reference is OpenCLIP, v1's OpenCLIP-fixed-tau; mean ± s.e.):\n\n"
                 f"{memory_table(memory)}\n\n"
                 f"How u compares with the model, seed {SEED}, logged every 10 steps: for each step's pairs seen "
                 f"before, their mini-batch g over their u before the step, averaged over each third of the run: "
                 f"the mean (`g_over_u`, 1 while u keeps pace, a mini-batch's g being unbiased; below 1 when the "
                 f"model has lowered g since u averaged it) / the geometric mean (`g_over_u_typical`: a typical "
                 f"batch's weight scale). With gamma 1, u is the previous visit's g, so both compare two "
                 f"mini-batch estimates a visit apart:\n\n{lag_table(lag_dirs, scale.epochs)}\n\n")
    body += f"({(time.perf_counter() - started) / 60:.1f} min in this invocation; finished runs are reused.)"
    raw = {"runs": [{"label": v.label, "batch": v.batch, "extra": v.extra, "steps": c.steps, "values": c.values,
                     "final_tau": c.final_tau, "seconds": c.seconds} for v, c in curves.items()]}
    path = write_report(name, f"What it takes: one setting at a time over {scale.epochs} epochs", body, raw)
    print(path.read_text())


if __name__ == "__main__":
    main()
