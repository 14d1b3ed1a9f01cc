"""GPU throughput, peak memory and host-device synchronisations: open_clip_train against our script.

Precisions first: every open_clip `--precision` name (fp32, amp, amp_bf16, bf16, fp16, pure_bf16,
pure_fp16) through the training script with FastCLIP-v3 on a tiny model for 4 steps: its exit code,
the precision it says it ran, its last loss (about a minute and a half).

Programs: RN50 at 224 px, synthetic data, `--precision amp_bf16`, one process, batch 128 and 256:
samples/s (steady state from each program's log lines, as in throughput.py) and peak CUDA memory
(`torch.cuda.max_memory_allocated` at exit, printed by the launchers in common.py) of open_clip_train,
our OpenCLIP mode and our FastCLIP-v3, alternating, within a time budget.

Step alone, in this process: our engine's step on a batch already on the GPU (no data loader, so the
ceiling the programs would reach if data came for free), for OpenCLIP, FastCLIP-v3 and FastCLIP-v3 with
`cudnn.benchmark` (open_clip_train turns it on; our script does not). Host-device synchronisations per
step, counted two ways over objective + backward and over the whole engine step: warnings of
`torch.cuda.set_sync_debug_mode("warn")`, and CUDA runtime synchronise calls seen by torch.profiler.
Then a step on NaN images: it must be skipped on the device (weights unchanged, counted by the guard)
without a synchronisation of its own (the fused AdamW takes the GradScaler's found-inf flag).
This part runs next (about a minute and a half), so a program run that fails still leaves results.

    bash bench/gpu.sh                        # one NVIDIA GPU, about 8 minutes on an H100
    python bench/gpu_bench.py --cpu-smoke    # no GPU: the same code paths, tiny model, one repetition
"""

from __future__ import annotations

import argparse
import gc
import itertools
import re
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

from fastclip.distributed import init_distributed
from fastclip.models import ModelBundle
from fastclip.train.engine import Trainer
from ranks import build_engine
from training.config import Config
from training.params import parse_args

BASELINE = "open_clip_train"
RUN_TIMEOUT_S = 240
SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy")


@dataclass(frozen=True)
class GpuSetup:
    model: str
    batch_sizes: tuple[int, ...]
    precision: str
    device: str
    steps: int  # training steps per program run
    log_every: int
    workers: int  # loader workers per program run
    repeats: int
    budget_s: float  # program runs of all batch sizes together; whole rounds only
    step_iters: int  # timed steps of the in-process step benchmark
    sync_steps: int  # steps over which synchronisations are counted


GPU = GpuSetup("RN50", (128, 256), "amp_bf16", "cuda", steps=20, log_every=4, workers=12, repeats=5,
               budget_s=240, step_iters=20, sync_steps=3)
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


def run_programs(setup: GpuSetup) -> tuple[dict[int, common.Runs], str | None]:
    """Runs per batch size, and the error that stopped them, if any (the GPU time is not lost for the
    measurements already made: the report is written either way)."""
    logs = Path(tempfile.mkdtemp(prefix="gpu-bench-"))
    budget_each = setup.budget_s / len(setup.batch_sizes)
    programs: dict[int, common.Runs] = {}
    try:
        for b in setup.batch_sizes:
            programs[b] = common.alternate(program_trials(setup, b, logs), setup.repeats, deadline_s=budget_each)
    except (common.CommandFailed, subprocess.TimeoutExpired, ValueError) as error:
        return programs, f"{type(error).__name__}: {error}"
    finally:
        shutil.rmtree(logs, ignore_errors=True)
    return programs, None


# ---------------------------------------------------------------------------- every precision name

SWEPT_PRECISIONS = ("fp32", "amp", "amp_bf16", "bf16", "fp16", "pure_bf16", "pure_fp16")
PRECISION_LINE = re.compile(r"\| INFO \| precision (.+)$", re.M)
LOSS_LINE = re.compile(r" loss: ([-+.\deE]+|nan|inf)")


def precision_sweep(setup: GpuSetup) -> list[dict]:
    """Each open_clip precision name through the training script, FastCLIP-v3 on a tiny model for a few
    steps: did it run, what it says it ran, and its last loss (the path that casts inputs, scales fp16
    losses and keeps the objective in float32)."""
    logs = Path(tempfile.mkdtemp(prefix="gpu-precision-"))
    rows = []
    try:
        for name in SWEPT_PRECISIONS:
            argv = ["--dataset-type", "synthetic", "--train-num-samples", "64", "--model", "ViT-Tiny-32px",
                    "--batch-size", "16", "--workers", "0", "--precision", name, "--device", setup.device,
                    "--epochs", "1", "--warmup", "1", "--log-every-n-steps", "1", "--save-frequency", "0",
                    "--logs", str(logs), "--name", name, "--data_size", "64", *common.FASTCLIP_V3_FLAGS]
            done = subprocess.run(common.fastclip_train_command(argv), capture_output=True, text=True,
                                  timeout=RUN_TIMEOUT_S)
            output = done.stdout + done.stderr
            effective = PRECISION_LINE.search(output)
            losses = LOSS_LINE.findall(output)
            rows.append({"precision": name, "rc": done.returncode, "effective": effective[1] if effective else "",
                         "last_loss": losses[-1] if losses else "", "error": "" if done.returncode == 0 else
                         output.strip().splitlines()[-1][:300]})
    finally:
        shutil.rmtree(logs, ignore_errors=True)
    return rows


def precision_table(rows: list[dict]) -> str:
    lines = ["| --precision | exit | effective precision | last loss | error |", "|---|---|---|---|---|"]
    lines += [f"| {r['precision']} | {r['rc']} | {r['effective']} | {r['last_loss']} | {r['error']} |" for r in rows]
    return "\n".join(lines)


# ------------------------------------------------------------------------------ the step, in process


@dataclass
class StepVariant:
    name: str
    flags: list[str]
    cudnn_benchmark: bool = False


VARIANTS = (
    StepVariant("ours OpenCLIP", common.OPENCLIP_FLAGS),
    StepVariant("ours FastCLIP-v3", common.FASTCLIP_V3_FLAGS),
    StepVariant("ours FastCLIP-v3 + cudnn.benchmark", common.FASTCLIP_V3_FLAGS, cudnn_benchmark=True),
)


def build_trainer(setup: GpuSetup, variant: StepVariant, batch_size: int,
                  data_size: int) -> tuple[Trainer, ModelBundle]:
    """Our engine wired as training/main.py wires it for one process (`ranks.build_engine`), from the same flags."""
    config = Config.from_args(parse_args([
        "--dataset-type", "synthetic", "--train-num-samples", str(data_size), "--model", setup.model,
        "--batch-size", str(batch_size), "--precision", setup.precision, "--device", setup.device,
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


def measure_step(setup: GpuSetup, variant: StepVariant, batch_size: int) -> dict:
    """Samples/s and peak memory of the engine step alone, then its synchronisations."""
    torch.backends.cudnn.benchmark = variant.cudnn_benchmark
    data_size = 100 * batch_size
    trainer, bundle = build_trainer(setup, variant, batch_size, data_size)
    device = trainer.device
    batches = resident_batches(bundle, device, batch_size, data_size)
    global_step = itertools.count()

    def engine_step(_: object = None) -> None:
        step = next(global_step)
        trainer.set_learning_rates(step)
        trainer.train_step([next(batches)])

    def forward() -> tuple[dict, dict]:
        batch = next(batches)
        with trainer.precision.autocast(device):
            return batch, trainer.model(batch["image"], batch["text"])

    def objective_and_backward(state: tuple[dict, dict]) -> None:
        batch, out = state
        with trainer.precision.autocast(device):
            losses = trainer.objective(out["image_features"], out["text_features"], out["logit_scale"],
                                       batch["index"])
        sum(losses.values()).backward()
        trainer.optimizer.zero_grad(set_to_none=True)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = time_steps(device, engine_step, setup.step_iters)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    result = {
        "samples_per_s": batch_size / seconds,
        "peak_allocated_gib": peak,
        "engine_step": count_syncs(device, engine_step, setup.sync_steps),
        "objective_backward": count_syncs(device, objective_and_backward, setup.sync_steps, prepare=forward),
        "non_finite_step": non_finite_step(trainer, batches),
    }
    return result


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


def run_steps(setup: GpuSetup) -> dict[int, dict[str, dict]]:
    """Every variant at every batch size (one measurement each: in process there is little noise).

    Each variant's model and optimizer are freed before the next is built, so peaks do not add up.
    """
    results: dict[int, dict[str, dict]] = {}
    for batch_size in setup.batch_sizes:
        for variant in VARIANTS:
            results.setdefault(batch_size, {})[variant.name] = measure_step(setup, variant, batch_size)
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    return results


def calibrate(device: torch.device) -> dict:
    """Both counters on one known synchronisation (`.item()`): each should report 1."""
    value = torch.ones(1, device=device)
    return count_syncs(device, lambda _: value.item(), steps=1)


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


def report(setup: GpuSetup, programs: dict[int, common.Runs], error: str | None,
           steps: dict[int, dict[str, dict]], calibration: dict, smoke: bool, info: dict,
           precisions: list[dict]) -> Path:
    parts = []
    if smoke:
        parts.append("**--cpu-smoke: no GPU; tiny model on the CPU, one repetition. The numbers only show "
                     "that the code paths run.**")
    if error:
        parts.append(f"**The program runs stopped on an error:**\n\n```\n{error[-3000:]}\n```")
    parts.append(
        f"Programs: {setup.model}, synthetic data, `--precision {setup.precision}`, 1 process, "
        f"{setup.workers} loader workers, {setup.steps} steps per run, alternating repetitions (a time budget "
        f"of {setup.budget_s:.0f} s may leave fewer than {setup.repeats}: see n). Samples/s: steady state "
        f"from the programs' log lines (windows that begin before step {setup.log_every} dropped); peak "
        "memory: `torch.cuda.max_memory_allocated()` at exit. open_clip_train's share of step time "
        "waiting for data is in the JSON (`data_wait_frac`).")
    for batch_size, runs in programs.items():
        if not runs[BASELINE]:
            continue
        parts.append(f"Batch {batch_size}, samples/s:")
        parts.append(common.comparison_table(runs, "samples_per_s", BASELINE, "samples/s"))
        if any("peak_allocated_gib" in m for m in runs[BASELINE]):
            parts.append(f"Batch {batch_size}, peak CUDA memory allocated:")
            parts.append(common.comparison_table(runs, "peak_allocated_gib", BASELINE, "GiB", digits=2))
    parts.append(
        f"Step alone, in process: our engine's step on a batch resident on the device, {setup.step_iters} timed "
        "steps after 3 untimed ones. Synchronisations per step over "
        f"{setup.sync_steps} steps: `torch.cuda.set_sync_debug_mode('warn')` warnings, and profiled "
        f"{', '.join(SYNC_CALLS)} calls (less an empty step's). 'objective+backward' excludes the forward; "
        "'engine step' is `set_learning_rates` + `train_step` (optimizer included).")
    parts.append(steps_table(steps))
    parts.append(f"Calibration, one `tensor.item()`: {_fmt(calibration['sync_warnings'])} (warn), "
                 f"{_fmt(calibration['sync_calls'])} (profiler); 1 and 1 mean both counters see every such call.")
    parts.append("Synchronising calls flagged:\n\n" + sync_examples(steps))
    parts.append("Every precision name, FastCLIP-v3 on ViT-Tiny-32px, 4 steps of batch 16 through the training "
                 "script:\n\n" + precision_table(precisions))
    raw = {"setup": asdict(setup), "smoke": smoke, "programs": programs, "error": error, "steps": steps,
           "calibration": calibration, "precisions": precisions}
    return common.write_report("gpu", "GPU throughput, memory and synchronisations vs open_clip_train",
                               "\n\n".join(parts), raw, info)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="no GPU: run the code paths on a tiny CPU setup")
    parser.add_argument("--skip-programs", action="store_true", help="only the in-process step measurements")
    args = parser.parse_args(argv)
    if not args.cpu_smoke and not torch.cuda.is_available():
        raise SystemExit("error: no CUDA device; use --cpu-smoke to check the code paths on the CPU")
    setup = SMOKE if args.cpu_smoke else GPU
    info, started = common.machine(), time.perf_counter()
    precisions = precision_sweep(setup)  # first: the mixed-precision paths have never run on a GPU
    steps = run_steps(setup)  # a minute that yields results even if a program run fails
    calibration = calibrate(torch.device(setup.device))
    programs, error = ({}, None) if args.skip_programs else run_programs(setup)
    path = report(setup, programs, error, steps, calibration, args.cpu_smoke, info, precisions)
    print(path.read_text())
    print(f"gpu_bench: {time.perf_counter() - started:.0f} s", flush=True)


if __name__ == "__main__":
    main()
