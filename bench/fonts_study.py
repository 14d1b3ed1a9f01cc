"""Unique captions, longer: which setting lets FastCLIP-v3 lead OpenCLIP at the small batch?

bench/fonts.py fits 21 runs into its budget with 2 epochs, the least in which FastCLIP's moving
averages carry any history (epoch 0 sets u to the batch estimate). This study trains the small batch
(2x16) twice as long, one seed, on the same data and schedule, and varies one setting at a time:
- epochs: 4 instead of 2, for both losses;
- OpenCLIP tuned as carefully: lr 2e-3 besides the benchmark's 1e-3;
- FastCLIP-v3's gamma schedule length: `--gamma_decay_epochs` 2 (gamma 1, 0.6, then 0.2) or 1
  (gamma 0.2 from epoch 1: the longest memory);
- FastCLIP-v3's initial temperature: `--temperature` 0.03 instead of 0.07 (its tau falls slowly, at
  lr_tau 2e-4, so the start matters in a short run).

    python bench/fonts_study.py            # 5 runs of 4 epochs at 2x16, ~35 min on 2 cores
    python bench/fonts_study.py --quick    # smoke test: bench/fonts.py's quick data, 2 epochs

Finished runs are reused, as in bench/fonts.py.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

from common import OUT_DIR, markdown_table, reuse_or_train, write_report
from fonts import FULL, METRICS, OPTIM, QUICK, RANKS, Run, load_data, read_result, run_argv, torchrun

BATCH, SEED = 16, 0


@dataclass(frozen=True)
class Variant:
    label: str
    version: str
    lr: float = OPTIM.lr
    extra: tuple[str, ...] = ()  # flags appended after the run's own: argparse keeps the last


VARIANTS = (
    Variant("OpenCLIP, lr 1e-3", "OpenCLIP"),
    Variant("OpenCLIP, lr 2e-3", "OpenCLIP", lr=2e-3),
    Variant("FastCLIP-v3, gamma_decay_epochs 2", "FastCLIP-v3"),
    Variant("FastCLIP-v3, gamma_decay_epochs 1", "FastCLIP-v3", extra=("--gamma_decay_epochs", "1")),
    Variant("FastCLIP-v3, temperature 0.03", "FastCLIP-v3", extra=("--temperature", "0.03")),
)


def main(argv: Sequence[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke test: 600 training pairs, 2 epochs")
    quick = parser.parse_args(argv).quick
    scale, epochs, name = (QUICK, 2, "fonts_study-quick") if quick else (FULL, 4, "fonts_study")
    started = time.perf_counter()
    data = load_data(scale)
    logs = OUT_DIR / name / "logs"
    rows, raw = [], []
    for index, variant in enumerate(VARIANTS):
        run = Run(BATCH, variant.version, SEED)
        argv = [*run_argv(run, data, epochs, replace(OPTIM, lr=variant.lr), logs), *variant.extra]
        argv[argv.index("--name") + 1] = run_name = f"v{index}-{run.name}"
        seconds = reuse_or_train(logs / run_name, ["torchrun", f"--nproc_per_node={RANKS}", *argv],
                                 lambda: torchrun(argv))
        result = read_result(run, logs / run_name, epochs, seconds)
        rows.append([variant.label, *[" → ".join(f"{100 * v:.2f}" for v in result.curves[m]) for m in METRICS]])
        raw.append({"label": variant.label, "argv": argv, "curves": result.curves, "seconds": seconds})
        print(f"[{index + 1}/{len(VARIANTS)}] {variant.label}: {rows[-1][1:]}, {seconds:.0f} s", flush=True)
    body = (
        f"Global batch {RANKS}x{BATCH}, seed {SEED}, {epochs} epochs, otherwise bench/fonts.py's data and "
        f"schedule ({data.num_samples:,} training pairs, {data.test_samples:,} test pairs in an unseen font; "
        f"lr {OPTIM.lr:g} unless stated, `--gamma_decay_epochs {epochs // 2}` unless stated). Recall (%) on "
        f"the test split after each epoch:\n\n"
        f"{markdown_table(['setting', *METRICS.values()], rows)}\n\n"
        f"({(time.perf_counter() - started) / 60:.1f} min in this invocation; finished runs are reused.)"
    )
    path = write_report(name, "Unique captions, 4 epochs at 2x16: what makes FastCLIP lead", body, {"runs": raw})
    print(path.read_text())
    return path


if __name__ == "__main__":
    main()
