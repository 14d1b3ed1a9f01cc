"""What makes a step of the regime map cheap: samples/s of each choice against its alternative, side by side.

The regime map (bench/scale.py) trains tens of runs of 20 epochs, up to 41,660 pairs each, on 2 CPU cores.
Every contender stays an open_clip model trained the same way; the cost comes from a few choices, each
measured here on the map's own launch (`torchrun`, 2 gloo ranks of one thread, the 20,000-pair fonts data,
FastCLIP-v3 with the README's flags, `ViT-Tiny-32px` at 32 px, fp32):
- the text tower's token and positional embeddings frozen (`--lock-text --lock-text-unlocked-layers 3`)
  against trained: the 3.2M-parameter token embedding's backward, all-reduce and AdamW update;
- the global batch: 2x16, 2x32 (the map) and 2x64;
- one loader worker per rank (the map) against two: if the second one adds nothing, the step does not wait
  for decoding and a cache of decoded images would not pay;
- the evaluations: one held-out evaluation (500 pairs: R@1/R@10 and the global loss) with the training
  subset's global loss (500 pairs), measured as the wall time a 4-epoch run gains with one after every
  epoch, and given as training steps and as a share of a map run at 2,000 and at 20,000 pairs.
The contenders alternate (common.alternate); samples/s is the steady rate of rank 0's log lines over all
ranks, the first window (start-up) dropped.

    python bench/step_cost.py           # ~9 min on 2 cores; bench/out/step_cost.md
    python bench/step_cost.py --quick   # smoke run: numbers are no evidence
"""

from __future__ import annotations

import argparse
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import common
from fonts import OPTIM, RANKS, TORCHRUN_CWD, TORCHRUN_ENV, Run, fonts_data, run_argv, torchrun_command
from long import LOSSES, MODEL_FLAGS

from fastclip.datasets.fonts import FontsData

VERSION = "FastCLIP-v3"
MAP_BATCH = 32  # per rank
MAP_EVAL_EVERY = 2  # epochs between the map's evaluations


@dataclass(frozen=True)
class Setup:
    throughput_pairs: int  # the data of the throughput runs: one epoch of `steps` steps at the largest batch
    train_pairs: int  # the data of the runs that time the evaluations
    eval_pairs: int  # held-out pairs, and training pairs whose global loss is scored
    steps: int  # per throughput run
    log_every: int  # steps per log window; the first is dropped
    eval_epochs: int  # epochs of the runs that time the evaluations
    repeats: int


FULL = Setup(throughput_pairs=20_000, train_pairs=2_000, eval_pairs=500, steps=150, log_every=20, eval_epochs=4, repeats=3)
QUICK = Setup(throughput_pairs=2_000, train_pairs=300, eval_pairs=100, steps=8, log_every=4, eval_epochs=2, repeats=1)


@dataclass(frozen=True)
class Choice:
    name: str
    batch: int  # per rank
    frozen_embeddings: bool = True
    workers: int = 1


CHOICES = (
    Choice("the map's step: embeddings frozen, 2x32, 1 worker", MAP_BATCH),
    Choice("embeddings trained", MAP_BATCH, frozen_embeddings=False),
    Choice("global batch 2x16", 16),
    Choice("global batch 2x64", 64),
    Choice("2 loader workers per rank", MAP_BATCH, workers=2),
)
BASELINE = CHOICES[0].name


def without(argv: Sequence[str], flag: str) -> list[str]:
    """`argv` without `flag` and its value."""
    out = list(argv)
    at = out.index(flag)
    del out[at:at + 2]
    return out


def base_argv(data: FontsData, batch: int, logs: Path, name: str) -> list[str]:
    """The map's flags for FastCLIP-v3 (bench/fonts.py's run, bench/long.py's loss flags), no evaluation."""
    argv = run_argv(Run(batch, VERSION, 0), data, 1, OPTIM, logs, LOSSES[VERSION])
    argv[argv.index("--name") + 1] = name
    return without(argv, "--val-data")


def throughput_argv(choice: Choice, setup: Setup, data: FontsData, logs: Path, name: str) -> list[str]:
    argv = base_argv(data, choice.batch, logs, name)
    return [*argv, *(MODEL_FLAGS if choice.frozen_embeddings else ()),
            "--train-num-samples", str(setup.steps * choice.batch * RANKS), "--workers", str(choice.workers),
            "--log-every-n-steps", str(setup.log_every)]


def evaluation_argv(evaluate: bool, setup: Setup, data: FontsData, logs: Path, name: str) -> list[str]:
    argv = base_argv(data, MAP_BATCH, logs, name)
    evaluation = ("--val-data", data.test_shards, "--val-frequency", "1",
                  "--train-eval-num-samples", str(setup.eval_pairs)) if evaluate else ()
    return [*argv, *MODEL_FLAGS, "--epochs", str(setup.eval_epochs), *evaluation]


def trial(make_argv, parse) -> common.Trial:
    """A fresh run folder per repetition, launched as bench/fonts.py launches its runs."""
    runs = iter(range(10_000))
    return common.command_trial(lambda: torchrun_command(make_argv(f"r{next(runs)}")), parse, env=TORCHRUN_ENV,
                                cwd=TORCHRUN_CWD)


def throughput_trial(choice: Choice, setup: Setup, data: FontsData, logs: Path, key: str) -> common.Trial:
    global_batch = choice.batch * RANKS
    return trial(lambda tag: throughput_argv(choice, setup, data, logs, f"{key}-{tag}"),
                 lambda output: common.parse_fastclip_log(output, global_batch, setup.log_every))


def evaluation_trial(evaluate: bool, setup: Setup, data: FontsData, logs: Path, key: str) -> common.Trial:
    return trial(lambda tag: evaluation_argv(evaluate, setup, data, logs, f"{key}-{tag}"), lambda output: {})


def median(runs: common.Runs, name: str, metric: str) -> float:
    return common.summarize(common.metric_values(runs, name, metric)).median


def throughput_table(runs: common.Runs) -> str:
    base = median(runs, BASELINE, "samples_per_s")
    rows = []
    for choice in CHOICES:
        rate = median(runs, choice.name, "samples_per_s")
        step_ms = 1000 * choice.batch * RANKS / rate
        rows.append([choice.name, str(len(runs[choice.name])), f"{rate:.0f}", f"{step_ms:.0f}", f"{rate / base:.2f}x"])
    return common.markdown_table(["choice", "n", "samples/s", "ms per step", "samples/s vs the map's"], rows)


def evaluation_lines(runs: common.Runs, setup: Setup, map_rate: float) -> str:
    """One evaluation's cost in seconds and steps, and its share of a map run at 2,000 and 20,000 pairs."""
    seconds = (median(runs, "with evaluations", "wall_s") - median(runs, "without", "wall_s")) / setup.eval_epochs
    step_s = MAP_BATCH * RANKS / map_rate
    shares = []
    for pairs in (2_000, 20_000):
        steps_between = MAP_EVAL_EVERY * math.ceil(pairs / (MAP_BATCH * RANKS))
        shares.append(f"{seconds / (seconds + steps_between * step_s):.0%} of a map run at {pairs:,} pairs "
                      f"(one every {steps_between} steps)")
    return (f"One evaluation ({setup.eval_pairs} held-out pairs and {setup.eval_pairs} training pairs): {seconds:.1f} s, the time "
            f"of {seconds / step_s:.0f} of the map's steps; {'; '.join(shares)}. Medians of {len(runs['without'])} "
            f"runs of {setup.eval_epochs} epochs with an evaluation after each and without.")


def main(argv: Sequence[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one short repetition: a smoke test, not evidence")
    setup = QUICK if parser.parse_args(argv).quick else FULL
    info = common.machine()
    big, small = (fonts_data(pairs, setup.eval_pairs) for pairs in (setup.throughput_pairs, setup.train_pairs))
    with tempfile.TemporaryDirectory(prefix="bench-step-cost-") as folder:
        logs = Path(folder)
        trials = {c.name: throughput_trial(c, setup, big, logs, f"c{i}") for i, c in enumerate(CHOICES)}
        trials["with evaluations"] = evaluation_trial(True, setup, small, logs, "eval")
        trials["without"] = evaluation_trial(False, setup, small, logs, "noeval")
        runs = common.alternate(trials, setup.repeats)
    body = (
        f"`ViT-Tiny-32px`, {VERSION} with the README's flags, fp32, {RANKS} gloo ranks of one thread (torchrun), "
        f"the {big.num_samples:,}-pair fonts data; {setup.steps} steps per throughput run (one epoch, the first "
        f"{setup.log_every} dropped), {setup.repeats} alternating repetitions, medians.\n\n"
        + throughput_table(runs) + "\n\n" + evaluation_lines(runs, setup, median(runs, BASELINE, "samples_per_s"))
    )
    path = common.write_report("step_cost", "What makes a step of the regime map cheap", body,
                               {"setup": setup, "runs": runs}, info)
    print(path.read_text())
    return path


if __name__ == "__main__":
    main()
