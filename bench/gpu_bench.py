"""The GPU check: our step and programs on one NVIDIA GPU, in sections, each written as it ends.

Each section is one invocation (`python bench/gpu_bench.py SECTION --out DIR`, run by bench/gpu.sh) that
writes DIR/gpu_SECTION.md and .json when it ends, so that a run cut short keeps what finished.

smoke (at most 4 minutes, about 2 expected on an H100): CUDA and NCCL on one rank (a process group, its
collectives, one FastCLIP-v3 step through DDP, whose gradient all-reduce runs on it); every open_clip
`--precision` name for three FastCLIP-v3 steps (the seed's flags, step_thresh included) on a tiny model:
did it run, what it says it ran, its loss, whether the weights moved, the steps skipped, the loss scale, the
host synchronisations of a step; then the step alone for OpenCLIP and FastCLIP-v3 (RN50, 224 px,
`--precision amp_bf16`, batch 128, a batch already on the GPU, so the ceiling the programs would reach if
data came for free): samples/s, peak memory, synchronisations per step counted two ways (warnings of
`torch.cuda.set_sync_debug_mode("warn")`, CUDA runtime synchronise calls seen by torch.profiler) over
objective + backward and over the whole engine step, and a step on NaN images, which must be skipped on
the device (weights unchanged, counted by the guard) without a synchronisation of its own.

programs (about 4 minutes): open_clip_train against our OpenCLIP and FastCLIP-v3 through the training
script, RN50 at 224 px, synthetic data, `--precision amp_bf16`, one process, batch 128 and 256: samples/s
(steady state from each program's log lines, as in throughput.py) and peak CUDA memory, alternating within
a time budget.

steps (about a minute): the step alone at batch 256, and FastCLIP-v3 with `cudnn.benchmark` (open_clip_train
turns it on; our script does not).

    bash bench/gpu.sh                              # one NVIDIA GPU (see its header for the device tool)
    python bench/gpu_bench.py smoke --cpu-smoke    # no GPU: the same code paths, tiny model, on the CPU
"""

from __future__ import annotations

import argparse
import gc
import itertools
import shutil
import subprocess
import tempfile
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import common
import torch
import torch.distributed as dist

from fastclip.distributed import DistEnv, init_distributed
from fastclip.models import ModelBundle
from fastclip.train.engine import Trainer
from fastclip.train.precision import PRECISIONS
from ranks import build_engine
from training.builders import wrap_ddp
from training.config import Config
from training.params import parse_args

BASELINE = "open_clip_train"
RUN_TIMEOUT_S = 240
SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy")
SECTIONS = ("smoke", "programs", "steps")


@dataclass(frozen=True)
class GpuSetup:
    model: str
    batch_sizes: tuple[int, ...]  # the smoke section's step at the first, the steps section's at the last
    precision: str
    device: str
    steps: int  # training steps per program run
    log_every: int
    workers: int  # loader workers per program run
    repeats: int
    budget_s: float  # program runs of all batch sizes together; whole rounds only
    step_iters: int  # timed steps of the in-process step benchmark
    sync_steps: int  # steps over which synchronisations are counted
    tiny_model: str = "ViT-Tiny-32px"  # the precision names' steps and the DDP step
    tiny_batch: int = 16


GPU = GpuSetup("RN50", (128, 256), "amp_bf16", "cuda", steps=20, log_every=4, workers=12, repeats=5,
               budget_s=180, step_iters=20, sync_steps=3)
SMOKE = GpuSetup("ViT-Tiny-32px", (32,), "fp32", "cpu", steps=6, log_every=2, workers=1, repeats=1,
                 budget_s=600, step_iters=3, sync_steps=1)


# ------------------------------------------------------------------------------------- the programs


def program_flags(setup: GpuSetup, batch_size: int, logs: Path, name: str) -> list[str]:
    """Flags both programs spell the same way; synthetic data sizes the epoch to `steps` batches."""
    return [
        "--dataset-type", "synthetic", "--train-num-samples", str(setup.steps * batch_size),
        "--model", setup.model, "--batch-size", str(batch_size), "--workers", str(setup.workers),
        "--precision", setup.precision, "--device", setup.device, "--epochs", "1", "--lr", "1e-3",
        "--wd", "0.1", "--warmup", "10", "--seed", "0", "--log-every-n-steps", str(setup.log_every),
        "--save-frequency", "0", "--logs", str(logs), "--name", name,
    ]


def program_trials(setup: GpuSetup, batch_size: int, logs: Path) -> dict[str, common.Trial]:
    """The three contenders at one batch size; a run that hangs fails after `RUN_TIMEOUT_S`."""
    counter = itertools.count()

    def flags(prefix: str, extra: Sequence[str]) -> list[str]:
        return program_flags(setup, batch_size, logs, f"{prefix}-b{batch_size}-{next(counter)}") + list(extra)

    def parser(log: Callable[[str, int, int], common.Metrics]) -> Callable[[str], common.Metrics]:
        return lambda out: {**log(out, batch_size, setup.log_every), **common.parse_peak_cuda(out)}

    return {
        BASELINE: common.command_trial(
            lambda: common.open_clip_train_command(flags("oc", common.OPENCLIP_FLAGS)),
            parser(common.parse_open_clip_train_log), timeout=RUN_TIMEOUT_S),
        "ours OpenCLIP": common.command_trial(
            lambda: common.fastclip_train_command(flags("openclip", common.OPENCLIP_FLAGS)),
            parser(common.parse_fastclip_log), timeout=RUN_TIMEOUT_S),
        "ours FastCLIP-v3": common.command_trial(
            lambda: common.fastclip_train_command(flags("v3", common.FASTCLIP_V3_FLAGS)),
            parser(common.parse_fastclip_log), timeout=RUN_TIMEOUT_S),
    }


def run_programs(setup: GpuSetup, batch_size: int, budget_s: float) -> tuple[common.Runs, str | None]:
    """The runs at one batch size, and the error that stopped them, if any (the runs made are kept)."""
    logs = Path(tempfile.mkdtemp(prefix="gpu-bench-"))
    try:
        return common.alternate(program_trials(setup, batch_size, logs), setup.repeats, deadline_s=budget_s), None
    except (common.CommandFailed, subprocess.TimeoutExpired, ValueError) as error:
        return {}, f"{type(error).__name__}: {error}"
    finally:
        shutil.rmtree(logs, ignore_errors=True)


# ------------------------------------------------------------------------------ the step, in process


@dataclass
class StepVariant:
    name: str
    flags: list[str]
    cudnn_benchmark: bool = False


OPENCLIP = StepVariant("ours OpenCLIP", common.OPENCLIP_FLAGS)
FASTCLIP_V3 = StepVariant("ours FastCLIP-v3", common.FASTCLIP_V3_FLAGS)
FASTCLIP_V3_CUDNN = StepVariant("ours FastCLIP-v3 + cudnn.benchmark", common.FASTCLIP_V3_FLAGS, cudnn_benchmark=True)


def build_trainer(model: str, precision: str, device: str, variant: StepVariant, batch_size: int,
                  data_size: int) -> tuple[Trainer, ModelBundle]:
    """Our engine wired as training/main.py wires it for one process (`ranks.build_engine`), from the same flags."""
    config = Config.from_args(parse_args([
        "--dataset-type", "synthetic", "--train-num-samples", str(data_size), "--model", model,
        "--batch-size", str(batch_size), "--precision", precision, "--device", device,
        "--lr", "1e-3", "--wd", "0.1", "--warmup", "10", *variant.flags]))
    return build_engine(config, init_distributed(config.run.device))


def resident_batches(bundle: ModelBundle, device: torch.device, batch_size: int, data_size: int) -> Iterator[dict]:
    """Batches already on the device; the indices move on every step, as new samples would."""
    size = bundle.model.visual.image_size
    size = size if isinstance(size, int) else size[0]
    images = torch.randn(batch_size, 3, size, size, device=device)
    texts = bundle.tokenizer(["a photo of a small dog on a red car"] * batch_size).to(device)
    for step in itertools.count():
        index = (torch.arange(batch_size, device=device) + step * batch_size) % data_size
        yield {"image": images, "text": texts, "index": index}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def sync_debug_warnings() -> Iterator[list]:
    """The warnings `set_sync_debug_mode("warn")` raises, one per synchronising call, inside the block."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield caught
        finally:
            torch.cuda.set_sync_debug_mode("default")


def profiled_sync_calls(step: Callable[[object], None], state: object) -> int:
    """CUDA runtime synchronise / blocking-copy calls torch.profiler sees while `step(state)` runs."""
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        step(state)
    return sum(1 for event in prof.events() if event.name in SYNC_CALLS)


def count_syncs(device: torch.device, step: Callable[[object], None], steps: int,
                prepare: Callable[[], object] = lambda: None) -> dict:
    """Synchronisations per `step(prepare())`, `prepare` not counted: debug-mode warnings, and profiled
    synchronise calls less those of profiling an empty step (the profiler's own)."""
    if device.type != "cuda":
        return {"sync_warnings": None, "sync_calls": None, "examples": []}
    flagged, calls = [], 0
    for _ in range(steps):
        state = prepare()
        synchronize(device)
        with sync_debug_warnings() as caught:
            step(state)
        flagged += [str(w.message) for w in caught if "synchroniz" in str(w.message).lower()]
        state = prepare()
        synchronize(device)
        calls += profiled_sync_calls(step, state)
    calls -= steps * profiled_sync_calls(lambda _: None, None)
    return {"sync_warnings": len(flagged) / steps, "sync_calls": calls / steps,
            "examples": sorted({m.splitlines()[0][:160] for m in flagged})}


def time_steps(device: torch.device, step: Callable[[], None], iters: int) -> float:
    """Seconds per step after 3 untimed ones (autotuning, allocator growth, lazy initialisation)."""
    for _ in range(3):
        step()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(iters):
        step()
    synchronize(device)
    return (time.perf_counter() - start) / iters


def engine_steps(trainer: Trainer, batches: Iterator[dict]) -> Callable[[object], None]:
    """One engine step per call, as the epoch loop runs it: the learning rates, then `train_step`."""
    global_step = itertools.count()

    def step(_: object = None) -> None:
        trainer.set_learning_rates(next(global_step))
        trainer.train_step([next(batches)])

    return step


def measure_step(setup: GpuSetup, variant: StepVariant, batch_size: int) -> dict:
    """Samples/s and peak memory of the engine step alone, then its synchronisations."""
    torch.backends.cudnn.benchmark = variant.cudnn_benchmark
    data_size = 100 * batch_size
    trainer, bundle = build_trainer(setup.model, setup.precision, setup.device, variant, batch_size, data_size)
    device = trainer.device
    batches = resident_batches(bundle, device, batch_size, data_size)
    engine_step = engine_steps(trainer, batches)

    def forward() -> tuple[dict, dict]:
        batch = next(batches)
        with trainer.precision.autocast(device):
            return batch, trainer.model(batch["image"], batch["text"])

    def objective_and_backward(state: tuple[dict, dict]) -> None:
        batch, out = state
        with trainer.precision.autocast(device):
            losses = trainer.objective(out["image_features"], out["text_features"], out["logit_scale"],
                                       batch["index"])
        trainer.stepper.backward(sum(losses.values()))
        trainer.optimizer.zero_grad(set_to_none=True)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = time_steps(device, engine_step, setup.step_iters)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {
        "samples_per_s": batch_size / seconds,
        "peak_allocated_gib": peak,
        "engine_step": count_syncs(device, engine_step, setup.sync_steps),
        "objective_backward": count_syncs(device, objective_and_backward, setup.sync_steps, prepare=forward),
        "non_finite_step": non_finite_step(trainer, batches),
    }


def measure_steps(setup: GpuSetup, variants: Sequence[StepVariant], batch_size: int) -> dict[int, dict[str, dict]]:
    """`measure_step` of each variant, each one's model and optimizer freed before the next is built, so
    that peaks do not add up."""
    results = {}
    for variant in variants:
        results[variant.name] = measure_step(setup, variant, batch_size)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return {batch_size: results}


def non_finite_step(trainer: Trainer, batches: Iterator[dict]) -> dict:
    """A step on NaN images: skipped on the device (weights unchanged, counted) with no added sync."""
    batch = next(batches)
    poisoned = dict(batch, image=torch.full_like(batch["image"], float("nan")))
    weights = [p.detach().clone() for p in trainer.model.parameters()]
    total = int(trainer.guard.total)
    trainer.train_step([poisoned])
    unchanged = all(torch.equal(p, w) for p, w in zip(trainer.model.parameters(), weights))
    counted = int(trainer.guard.total) == total + 1
    return {**count_syncs(trainer.device, lambda _: trainer.train_step([poisoned]), steps=1),
            "weights_unchanged": unchanged, "counted": counted}


def calibrate(device: torch.device) -> dict:
    """Both counters on one known synchronisation (`.item()`): each should report 1."""
    value = torch.ones(1, device=device)
    return count_syncs(device, lambda _: value.item(), steps=1)


# ----------------------------------------------------------------------- CUDA, NCCL, every precision


def one_rank_group(setup: GpuSetup) -> dict:
    """A process group of one rank (NCCL on a GPU, gloo on the CPU): its collectives, then one FastCLIP-v3
    step through DDP, whose gradient all-reduce runs on that group."""
    device = torch.device(setup.device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{common.free_port()}", rank=0, world_size=1)
    try:
        values = torch.arange(4.0, device=device)
        dist.all_reduce(values)
        gathered = [torch.empty_like(values)]
        dist.all_gather(gathered, values)
        dist.broadcast(values, src=0)
        trainer, bundle = build_trainer(setup.tiny_model, "auto", setup.device, FASTCLIP_V3, setup.tiny_batch, 64)
        trainer.model = wrap_ddp(trainer.model, DistEnv(device=device))
        trainer.set_learning_rates(0)
        losses = trainer.train_step([next(resident_batches(bundle, device, setup.tiny_batch, 64))])
        return {"backend": backend, "collectives": bool(torch.equal(gathered[0], values)),
                "ddp_step_loss": float(losses["loss"]), "error": ""}
    except Exception as error:  # noqa: BLE001 - the report says what failed; the next checks still run
        return {"backend": backend, "error": f"{type(error).__name__}: {error}"[:400]}
    finally:
        dist.destroy_process_group()


def precision_steps(setup: GpuSetup, name: str) -> dict:
    """A few FastCLIP-v3 steps (the seed's flags, step_thresh included) at `--precision name` on a tiny model,
    the synchronisations of one counted: did it run, what it ran, its last loss, whether the weights moved,
    how many steps were skipped, the loss scale."""
    device = torch.device(setup.device)
    try:
        trainer, bundle = build_trainer(setup.tiny_model, name, setup.device, FASTCLIP_V3, setup.tiny_batch, 64)
        batches = resident_batches(bundle, device, setup.tiny_batch, 64)
        step = engine_steps(trainer, batches)
        weights = [p.detach().clone() for p in trainer.model.parameters()]
        for _ in range(2):
            step()
        syncs = count_syncs(device, step, steps=1)
        losses = trainer.train_step([next(batches)])
        return {"precision": name, "ran": True, "effective": trainer.precision.describe(),
                "last_loss": float(losses["loss"]),
                "weights_moved": any(not torch.equal(p, w) for p, w in zip(trainer.model.parameters(), weights)),
                "skipped_steps": int(trainer.guard.total), "loss_scale": trainer.stepper.state_dict().get("scale"),
                "sync_warnings": syncs["sync_warnings"], "sync_calls": syncs["sync_calls"], "error": ""}
    except Exception as error:  # noqa: BLE001 - one name failing must not hide the others
        return {"precision": name, "ran": False, "error": f"{type(error).__name__}: {error}"[:400]}


# ---------------------------------------------------------------------------------------- reporting


def _fmt(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def steps_table(steps: dict[int, dict[str, dict]]) -> str:
    rows = []
    for batch_size, variants in steps.items():
        for name, r in variants.items():
            e, o = r["engine_step"], r["objective_backward"]
            bad = r["non_finite_step"]
            skipped = "yes" if bad["weights_unchanged"] and bad["counted"] else "NO"
            rows.append([name, str(batch_size), _fmt(r["samples_per_s"]), _fmt(r["peak_allocated_gib"], 2),
                         _fmt(o["sync_warnings"]), _fmt(o["sync_calls"]), _fmt(e["sync_warnings"]),
                         _fmt(e["sync_calls"]), f"{skipped}, {_fmt(bad['sync_warnings'])}"])
    headers = ["step alone", "batch", "samples/s", "peak GiB", "objective+backward syncs/step (warn)",
               "(profiler)", "engine step syncs/step (warn)", "(profiler)",
               "NaN step skipped, syncs (warn)"]
    return common.markdown_table(headers, rows)


def sync_examples(steps: dict[int, dict[str, dict]]) -> str:
    lines = {f"- {name}, {part}: `{example}`"
             for variants in steps.values() for name, r in variants.items()
             for part in ("engine_step", "objective_backward", "non_finite_step") for example in r[part]["examples"]}
    return "\n".join(sorted(lines)) or "- none flagged"


def steps_text(setup: GpuSetup, steps: dict[int, dict[str, dict]]) -> str:
    return "\n\n".join([
        f"Step alone, in process: {setup.model}, `--precision {setup.precision}`, our engine's step on a batch "
        f"resident on the device, {setup.step_iters} timed steps after 3 untimed ones. Synchronisations per step "
        f"over {setup.sync_steps} steps: `torch.cuda.set_sync_debug_mode('warn')` warnings, and profiled "
        f"{', '.join(SYNC_CALLS)} calls (less an empty step's). 'objective+backward' excludes the forward; "
        "'engine step' is `set_learning_rates` + `train_step` (optimizer included).",
        steps_table(steps), "Synchronising calls flagged:\n\n" + sync_examples(steps)])


def precision_table(rows: list[dict]) -> str:
    headers = ["--precision", "ran", "effective precision", "last loss", "weights moved", "skipped steps",
               "loss scale", "syncs (warn)", "(profiler)", "error"]
    return common.markdown_table(headers, [[
        r["precision"], "yes" if r["ran"] else "NO", r.get("effective", ""), _fmt(r.get("last_loss"), 4),
        str(r.get("weights_moved", "")), str(r.get("skipped_steps", "")), str(r.get("loss_scale") or "-"),
        _fmt(r.get("sync_warnings")), _fmt(r.get("sync_calls")), r["error"]] for r in rows])


def smoke_text(setup: GpuSetup, group: dict, precisions: list[dict], steps: dict[int, dict[str, dict]],
               calibration: dict) -> str:
    group_line = (f"Process group of one rank ({group['backend']}): " + (
        f"collectives {'ok' if group['collectives'] else 'WRONG'}, a FastCLIP-v3 step through DDP: loss "
        f"{group['ddp_step_loss']:.4f}." if not group["error"] else f"FAILED: `{group['error']}`"))
    return "\n\n".join([
        group_line,
        f"Every precision name: FastCLIP-v3 (the seed's flags) on {setup.tiny_model}, batch {setup.tiny_batch}, "
        "a few steps, the synchronisations of one counted. A skipped step with loss scaling is the scale "
        "finding its level (it halves).",
        precision_table(precisions),
        steps_text(setup, steps),
        f"Calibration, one `tensor.item()`: {_fmt(calibration['sync_warnings'])} (warn), "
        f"{_fmt(calibration['sync_calls'])} (profiler); 1 and 1 mean both counters see every such call."])


def programs_text(setup: GpuSetup, programs: dict[int, common.Runs], errors: dict[int, str]) -> str:
    parts = [
        f"Programs: {setup.model}, synthetic data, `--precision {setup.precision}`, 1 process, "
        f"{setup.workers} loader workers, {setup.steps} steps per run, alternating repetitions (a time budget "
        f"of {setup.budget_s:.0f} s may leave fewer than {setup.repeats}: see n). Samples/s: steady state "
        f"from the programs' log lines (windows that begin before step {setup.log_every} dropped); peak "
        "memory: `torch.cuda.max_memory_allocated()` at exit. open_clip_train's share of step time "
        "waiting for data is in the JSON (`data_wait_frac`)."]
    for batch_size, error in errors.items():
        parts.append(f"**Batch {batch_size}: the program runs stopped on an error:**\n\n```\n{error[-3000:]}\n```")
    for batch_size, runs in programs.items():
        if not runs.get(BASELINE):
            continue
        parts.append(f"Batch {batch_size}, samples/s:")
        parts.append(common.comparison_table(runs, "samples_per_s", BASELINE, "samples/s"))
        if any("peak_allocated_gib" in m for m in runs[BASELINE]):
            parts.append(f"Batch {batch_size}, peak CUDA memory allocated:")
            parts.append(common.comparison_table(runs, "peak_allocated_gib", BASELINE, "GiB", digits=2))
    return "\n\n".join(parts)


def write(section: str, out: Path, text: str, raw: dict, info: dict, smoke: bool) -> Path:
    """The section's report, DIR/gpu_SECTION.md and .json."""
    if smoke:
        text = ("**--cpu-smoke: no GPU; tiny model on the CPU, one repetition. The numbers only show that the "
                "code paths run.**\n\n" + text)
    return common.write_report(f"gpu_{section}", f"GPU check: {section}", text, {"smoke": smoke, **raw}, info,
                               out_dir=out)


# ----------------------------------------------------------------------------------------- sections


def smoke_section(setup: GpuSetup, out: Path, info: dict, smoke: bool) -> Path:
    group = one_rank_group(setup)
    precisions = [precision_steps(setup, name) for name in PRECISIONS if name != "auto"]
    for row in precisions:
        print(f"precision {row['precision']}: {'ran' if row['ran'] else 'FAILED ' + row['error']}", flush=True)
    steps = measure_steps(setup, (OPENCLIP, FASTCLIP_V3), setup.batch_sizes[0])
    calibration = calibrate(torch.device(setup.device))
    raw = {"setup": asdict(setup), "process_group": group, "precisions": precisions, "steps": steps,
           "calibration": calibration}
    return write("smoke", out, smoke_text(setup, group, precisions, steps, calibration), raw, info, smoke)


def programs_section(setup: GpuSetup, out: Path, info: dict, smoke: bool) -> Path:
    """Batch by batch, the report rewritten after each, so that a time-out keeps the batch sizes done."""
    programs: dict[int, common.Runs] = {}
    errors: dict[int, str] = {}
    for batch_size in setup.batch_sizes:
        programs[batch_size], error = run_programs(setup, batch_size, setup.budget_s / len(setup.batch_sizes))
        if error:
            errors[batch_size] = error
        path = write("programs", out, programs_text(setup, programs, errors),
                     {"setup": asdict(setup), "programs": programs, "errors": errors}, info, smoke)
    return path


def steps_section(setup: GpuSetup, out: Path, info: dict, smoke: bool) -> Path:
    steps = measure_steps(setup, (OPENCLIP, FASTCLIP_V3, FASTCLIP_V3_CUDNN), setup.batch_sizes[-1])
    return write("steps", out, steps_text(setup, steps), {"setup": asdict(setup), "steps": steps}, info, smoke)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("section", choices=SECTIONS)
    parser.add_argument("--cpu-smoke", action="store_true", help="no GPU: run the code paths on a tiny CPU setup")
    parser.add_argument("--out", type=Path, default=common.OUT_DIR / "gpu", help="where the reports go")
    args = parser.parse_args(argv)
    if not args.cpu_smoke and not torch.cuda.is_available():
        raise SystemExit("error: no CUDA device; use --cpu-smoke to check the code paths on the CPU")
    setup = SMOKE if args.cpu_smoke else GPU
    info, started = common.machine(), time.perf_counter()
    run = {"smoke": smoke_section, "programs": programs_section, "steps": steps_section}[args.section]
    path = run(setup, args.out, info, args.cpu_smoke)
    print(path.read_text())
    print(f"gpu_bench {args.section}: {time.perf_counter() - started:.0f} s", flush=True)


if __name__ == "__main__":
    main()
