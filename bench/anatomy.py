"""Step anatomy: where a training step's time goes, per objective, at K = 1 and K = 2 ranks.

Every variant (OpenCLIP `--local-loss --gather-with-grad`, FastCLIP-v0..v3 with the seed's flags,
and FLOOR: the same model with a trivial loss) runs real `Trainer` steps with `profile=True` on
gloo processes (1 thread each) over fixed in-memory batches, so the data phase is ~0 and the rest
is the training step itself. The variants alternate (common.alternate), so the machine's drift hits
them alike. Each phase is timed on two clocks: wall, and the process's CPU time, which other jobs
on a shared machine disturb far less (a rank waiting in a gloo collective spends none).
"Above floor" = step - FLOOR's step: the objective, its state and its communication. The objective
is also timed alone (forward + backward on fixed features): the same cost without the step's noise.

    python bench/anatomy.py            # full run: K = 1, 2; b = 64, 128; 10 repetitions x 3 steps (~5 min)
    python bench/anatomy.py --quick    # smoke run, < 1 min
    python bench/anatomy.py --profile  # also profile OpenCLIP and FastCLIP-v3 at K = 2 (done anyway
                                       # when a full run misses a target)
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import io
import itertools
import math
import pstats
import re
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from common import MIN_REPEATS, Runs, Summary, alternate, machine, markdown_table, summarize, write_report
from fastclip.datasets.synthetic import build_synthetic_loader
from fastclip.distributed import comm
from fastclip.train.engine import PHASES
from fastclip.losses.base import Objective
from fastclip.models import build_model
from ranks import (CC3M_DATA_SIZE, EMBED_DIM, FASTCLIP_VERSIONS, FLOOR, MODEL, OPENCLIP, VARIANTS,
                   build_trainer, build_variant_objective, run_on_ranks, run_window, synthetic_batches,
                   variant_config)
from tables import ms

TARGET_OVERHEAD = 0.03  # objective + state + communication, share of the step at b = 128
TARGET_WORLD = 2
CLOCKS = ("wall", "cpu")
PROFILED = (OPENCLIP, "fastclip-v3")
PROFILE_STEPS = 5
OBJECTIVE_CALLS = 10  # per repetition of the objective-alone timing
_PROFILED_FILES = r"fastclip/|open_clip/loss|parallel/distributed|distributed/nn"
_PACKAGE_PREFIX = re.compile(r"\S*/(?:site-packages|src)/")
CPU = torch.device("cpu")


@dataclass(frozen=True)
class Plan:
    worlds: tuple[int, ...]
    batch_sizes: tuple[int, ...]
    reps: int
    warmup: int
    steps: int
    loader_steps: int
    loader_workers: int
    data_size: int


# ---- on every rank ------------------------------------------------------------------------------

def rank_anatomy(plan: Plan) -> dict:
    """{"steps": {b: Runs of full steps}, "objective": {b: Runs of the objective alone}}, and in a
    single process also "loader": {b: steps fed by the real loader} (one spawn less)."""
    result = {"steps": {str(b): _alternate_steps(plan, b) for b in plan.batch_sizes},
              "objective": {str(b): _alternate_objectives(plan, b) for b in plan.batch_sizes}}
    if comm.world_size() == 1:
        result["loader"] = {str(b): _loader_wait(plan, b) for b in plan.batch_sizes}
    return result


def _quiet(line: str) -> None:
    """common.alternate's per-trial lines would be hundreds here: `_done` reports per configuration."""


def _done(what: str, b: int, started: float) -> None:
    if comm.rank() == 0:
        print(f"K={comm.world_size()} b={b}: {what} done in {time.perf_counter() - started:.0f} s", flush=True)


def _alternate_steps(plan: Plan, b: int) -> Runs:
    started = time.perf_counter()
    trainers = {v: build_trainer(v, b, plan.data_size, CPU) for v in VARIANTS}
    batches = itertools.cycle(synthetic_batches(b, 4, plan.data_size, CPU))
    for trainer in trainers.values():
        run_window(trainer, batches, plan.warmup)
    trials = {v: functools.partial(run_window, trainers[v], batches, plan.steps) for v in VARIANTS}
    runs = alternate(trials, plan.reps, progress=_quiet)
    _done("full steps", b, started)
    return runs


def _alternate_objectives(plan: Plan, b: int) -> Runs:
    """Forward + backward of each variant's loss alone on fixed unit-norm features: the objective +
    state + communication cost without the model around it, which the full step's difference to
    FLOOR only estimates through the step's noise. One untimed call per variant warms up."""
    started = time.perf_counter()
    objectives = {v: build_variant_objective(v, variant_config(v, b, plan.data_size), CPU) for v in VARIANTS}
    inputs = _objective_inputs(b, plan.data_size)
    for objective in objectives.values():
        _time_objective(objective, inputs, 1)
    trials = {v: functools.partial(_time_objective, objectives[v], inputs, OBJECTIVE_CALLS) for v in VARIANTS}
    runs = alternate(trials, plan.reps, progress=_quiet)
    _done("objective alone", b, started)
    return runs


def _objective_inputs(b: int, data_size: int) -> tuple[torch.Tensor, ...]:
    """Image and text features (leaves with gradient), the model's logit_scale parameter, indices."""
    generator = torch.Generator().manual_seed(comm.rank())
    image, text = (F.normalize(torch.randn(b, EMBED_DIM, generator=generator), dim=-1).requires_grad_()
                   for _ in range(2))
    log_scale = torch.tensor(math.log(1 / 0.07), requires_grad=True)
    return image, text, log_scale, synthetic_batches(b, 1, data_size, CPU)[0]["index"]


def _time_objective(objective: Objective, inputs: tuple[torch.Tensor, ...], calls: int) -> dict[str, float]:
    """Seconds per call (forward + backward), wall and CPU."""
    image, text, log_scale, index = inputs
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(calls):
        sum(objective(image, text, log_scale.exp(), index).values()).backward()
    return {"wall_step": (time.perf_counter() - wall) / calls, "cpu_step": (time.process_time() - cpu) / calls}


def _loader_wait(plan: Plan, b: int) -> dict[str, float]:
    """OpenCLIP steps fed by the real synthetic loader (PIL images, transforms, tokenizer, workers)."""
    bundle = build_model(MODEL)
    num_samples = b * (plan.loader_steps + 2)
    loader = build_synthetic_loader(num_samples, bundle.preprocess_train, bundle.tokenizer, b,
                                    workers=plan.loader_workers)
    batches = iter(loader)
    trainer = build_trainer(OPENCLIP, b, num_samples, CPU)
    run_window(trainer, batches, 1)  # worker start-up and first batch
    return run_window(trainer, batches, plan.loader_steps)


def rank_profile(batch_size: int, steps: int, data_size: int) -> dict:
    """Per PROFILED variant, rank 0's view: cProfile of `steps` full steps by wall time (collective
    waits included) and by CPU time (the rank's own work), and of the objective alone by CPU time,
    restricted to the objective's, DDP's and the engine's files; torch.profiler's ops (forward and
    backward) of the objective alone."""
    trainers = {v: build_trainer(v, batch_size, data_size, CPU) for v in PROFILED}
    batches = itertools.cycle(synthetic_batches(batch_size, 4, data_size, CPU))
    inputs = _objective_inputs(batch_size, data_size)
    profiles = {}
    for variant, trainer in trainers.items():
        run_window(trainer, batches, 3)
        step = functools.partial(run_window, trainer, batches, steps)
        alone = functools.partial(_time_objective, trainer.objective, inputs, OBJECTIVE_CALLS)
        profiles[variant] = {"step wall": _cprofile(step, time.perf_counter),
                             "step CPU": _cprofile(step, time.process_time),
                             "objective alone CPU": _cprofile(alone, time.process_time)}
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            alone()
        profiles[variant]["ops"] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12).strip()
    return profiles


def _cprofile(work: Callable[[], object], timer: Callable[[], float]) -> str:
    """pstats' table of `work` under `timer`, cumulative, our files only, paths from the package on."""
    profiler = cProfile.Profile(timer)
    profiler.enable()
    work()
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(_PROFILED_FILES, 18)
    lines = text.getvalue().splitlines()
    start = next((i for i, line in enumerate(lines) if line.lstrip().startswith("ncalls")), 0)
    return "\n".join(_PACKAGE_PREFIX.sub("", line) for line in lines[start:] if line.strip())


# ---- tables -------------------------------------------------------------------------------------

def _summary(runs: Runs, variant: str, key: str) -> Summary:
    return summarize([m[key] for m in runs[variant]])


def anatomy_table(steps: Runs) -> str:
    rows = []
    for variant in steps:
        wall, cpu = (_summary(steps, variant, f"{c}_step") for c in CLOCKS)
        phases = [" / ".join(f"{1e3 * _summary(steps, variant, f'{c}_{p}').median:.1f}" for c in CLOCKS)
                  for p in PHASES]
        versus = " / ".join(f"{_ratio(steps, variant, OPENCLIP, f'{c}_step'):.3f}" for c in CLOCKS)
        above = "-" if variant == FLOOR else " / ".join(_above_floor(steps, variant, c) for c in CLOCKS)
        objective_share = _summary(steps, variant, "wall_objective").median / wall.median
        rows.append([variant, *phases, ms(wall), ms(cpu), versus, above, f"{100 * objective_share:.1f}%"])
    headers = ["variant", *(f"{p} ms wall / CPU" for p in PHASES), "step wall ms [min-max]",
               "step CPU ms [min-max]", "vs OpenCLIP wall / CPU", "above floor wall / CPU (% of step)",
               "objective phase % (wall)"]
    return markdown_table(headers, rows)


def _ratio(runs: Runs, variant: str, baseline: str, key: str) -> float:
    """Ratio of medians."""
    return _summary(runs, variant, key).median / _summary(runs, baseline, key).median


def _above_floor(steps: Runs, variant: str, clock: str) -> str:
    step = _summary(steps, variant, f"{clock}_step").median
    above = step - _summary(steps, FLOOR, f"{clock}_step").median
    return f"{1e3 * above:+.1f} ms ({100 * above / step:+.1f}%)"


def objective_table(objective: Runs, floor_step: Summary) -> str:
    """Objective-alone times, and their share of a step: objective / (FLOOR's step + objective), CPU."""
    rows = []
    for variant in objective:
        wall, cpu = (_summary(objective, variant, f"{c}_step") for c in CLOCKS)
        rows.append([variant, ms(wall), ms(cpu), f"{100 * _share(cpu.median, floor_step.median):.1f}%"])
    return markdown_table(["objective", "wall ms per call [min-max]", "CPU ms per call [min-max]",
                           "share of the step (CPU)"], rows)


def _share(objective: float, floor_step: float) -> float:
    return objective / (floor_step + objective)


def loader_table(waits: dict[str, dict]) -> str:
    rows = [[b, f"{1e3 * w['wall_data']:.1f}", f"{1e3 * w['wall_step']:.1f}",
             f"{100 * w['wall_data'] / w['wall_step']:.0f}%"] for b, w in waits.items()]
    return markdown_table(["b", "data wait ms/step (wall)", "step ms (wall)", "data share"], rows)


# ---- targets ------------------------------------------------------------------------------------

def check_targets(steps_by_config: dict[tuple[int, int], Runs],
                  objective_by_config: dict[tuple[int, int], Runs]) -> list[dict]:
    """The lead's two targets on both clocks, and the overhead also on the objective-alone timing;
    judged on medians over repetitions, while the paired per-repetition values (variants ran back to
    back) show whether a verdict stands out of the noise."""
    checks = []
    for (world, b), clock in itertools.product(sorted(steps_by_config), CLOCKS):
        steps = steps_by_config[(world, b)]
        if world == TARGET_WORLD:
            checks.append(_check(f"v3 step / OpenCLIP step <= 1 (K={world}, b={b})", clock,
                                 _values(steps, "fastclip-v3", clock), _values(steps, OPENCLIP, clock),
                                 lambda v, base: v / base, 1.0, "{:.3f}"))
    for (world, b), version in itertools.product(sorted(steps_by_config), FASTCLIP_VERSIONS):
        steps, alone = steps_by_config[(world, b)], objective_by_config[(world, b)]
        if b != 128:
            continue
        limit = f"<= {TARGET_OVERHEAD:.0%} (K={world}, b={b})"
        checks += [_check(f"{version} (step - floor) / step {limit}", clock, _values(steps, version, clock),
                          _values(steps, FLOOR, clock), lambda s, floor: (s - floor) / s, TARGET_OVERHEAD, "{:+.1%}")
                   for clock in CLOCKS]
        checks.append(_check(f"{version} objective / (floor + objective) {limit}", "CPU, objective alone",
                             _values(alone, version, "cpu"), _values(steps, FLOOR, "cpu"), _share,
                             TARGET_OVERHEAD, "{:+.1%}"))
    return checks


def _values(runs: Runs, variant: str, clock: str) -> list[float]:
    return [m[f"{clock}_step"] for m in runs[variant]]


def _check(target: str, clock: str, values: list[float], baselines: list[float],
           metric: Callable[[float, float], float], limit: float, fmt: str) -> dict:
    headline = metric(statistics.median(values), statistics.median(baselines))
    paired = summarize([metric(v, base) for v, base in zip(values, baselines)])
    return {"target": target, "clock": clock, "value": fmt.format(headline), "holds": headline <= limit,
            "paired": f"{fmt.format(paired.median)} [{fmt.format(paired.min)}, {fmt.format(paired.max)}]"}


# ---- report -------------------------------------------------------------------------------------

def report(plan: Plan, steps_by_config: dict, objective_by_config: dict, checks: list[dict], waits: dict,
           profiles: dict | None) -> str:
    parts = [f"{MODEL}, CPU, gloo, 1 thread per rank, fp32, data_size {plan.data_size}. {plan.reps} repetitions x "
             f"{plan.steps} timed steps after {plan.warmup} warm-up steps per variant, variants alternating; rank "
             "0's Trainer timer. Phases: median ms per step, wall / CPU (process CPU time: the rank's own work; "
             "a rank waiting in a gloo collective spends none, and other jobs on a shared machine stretch wall "
             "time far more than CPU time). Steps: median [min-max] over repetitions. Above floor: step minus "
             "FLOOR's step (same model, trivial loss) = objective + state + communication."]
    for (world, b), steps in sorted(steps_by_config.items()):
        floor_step = _summary(steps, FLOOR, "cpu_step")
        parts += [f"### K={world}, local batch b={b}", anatomy_table(steps),
                  f"Objective alone (forward + backward of the loss on fixed features, its collectives and state "
                  f"included, no model; {OBJECTIVE_CALLS} calls per repetition):",
                  objective_table(objective_by_config[(world, b)], floor_step)]
    parts += ["### Targets", "measured: from the medians over repetitions; paired: per repetition, median [min, max].",
              markdown_table(["target", "clock", "measured", "paired", "holds"],
                             [[c["target"], c["clock"], c["value"], c["paired"], "yes" if c["holds"] else "NO"]
                              for c in checks])]
    parts += [f"### Data wait with the real synthetic loader (K=1, OpenCLIP, {plan.loader_workers} worker(s), "
              f"{plan.loader_steps} steps)", loader_table(waits)]
    for variant, profile in (profiles or {}).items():
        parts += [f"### Profile: {variant}, K={TARGET_WORLD}, b={max(plan.batch_sizes)}, rank 0"]
        for name in ("step wall", "step CPU", "objective alone CPU"):
            runs = f"{PROFILE_STEPS} steps" if name.startswith("step") else f"{OBJECTIVE_CALLS} calls"
            parts += [f"cProfile, {name} seconds, cumulative, {runs} (file:function):", f"```\n{profile[name]}\n```"]
        parts += [f"torch.profiler, objective alone ({OBJECTIVE_CALLS} calls, forward + backward), ops by self time "
                  "(a collective's time includes its wait):", f"```\n{profile['ops']}\n```"]
    return "\n\n".join(parts)


def parse(argv: list[str] | None) -> tuple[Plan, argparse.Namespace]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smoke run (< 1 min): b=64, 2 repetitions of 1 step")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--steps", type=int, default=3, help="timed steps per repetition")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per variant before the repetitions")
    p.add_argument("--data-size", type=int, default=CC3M_DATA_SIZE)
    p.add_argument("--loader-workers", type=int, default=1)
    p.add_argument("--profile", action="store_true",
                   help="profile OpenCLIP and FastCLIP-v3 at K=2 (done anyway when a full run misses a target)")
    args = p.parse_args(argv)
    if args.quick:
        return Plan((1, 2), (64,), 2, 1, 1, 1, args.loader_workers, args.data_size), args
    if args.reps < MIN_REPEATS:
        p.error(f"--reps must be at least {MIN_REPEATS}")
    return Plan((1, 2), (64, 128), args.reps, args.warmup, args.steps, 5, args.loader_workers, args.data_size), args


def main(argv: list[str] | None = None) -> None:
    plan, args = parse(argv)
    info = machine()
    steps_by_config, objective_by_config, waits = {}, {}, {}
    for world in plan.worlds:
        result = run_on_ranks(world, rank_anatomy, plan)[0]
        steps_by_config.update({(world, int(b)): runs for b, runs in result["steps"].items()})
        objective_by_config.update({(world, int(b)): runs for b, runs in result["objective"].items()})
        waits.update(result.get("loader", {}))
    checks = check_targets(steps_by_config, objective_by_config)
    profiles = None
    if args.profile or not (args.quick or all(c["holds"] for c in checks)):  # a smoke run judges nothing
        profiles = run_on_ranks(TARGET_WORLD, rank_profile, max(plan.batch_sizes), PROFILE_STEPS, plan.data_size)[0]
    raw = {"plan": asdict(plan), "targets": checks, "loader_wait": waits, "profiles": profiles,
           "steps": {f"K{w}_b{b}": runs for (w, b), runs in steps_by_config.items()},
           "objective_alone": {f"K{w}_b{b}": runs for (w, b), runs in objective_by_config.items()}}
    body = report(plan, steps_by_config, objective_by_config, checks, waits, profiles)
    path = write_report("anatomy", "Step anatomy: where a step's time goes (K = 1, 2)", body, raw, info)
    print(path.read_text())


if __name__ == "__main__":
    main()
