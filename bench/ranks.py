"""Real training steps of the benchmarked variants on K processes of this machine (gloo on CPU).

Each variant is a seed command line (tests/fixtures/seed_commands.sh) parsed by `training.params`
and built by `training.builders`, so a benchmark runs the objective, the optimizer groups and the
schedules that training runs, through `fastclip.train.engine.Trainer` with its per-phase timer. The model
is the tiny open_clip `ViT-Tiny-32px`. FLOOR is the same model and step with a trivial loss: the
part of a step that no objective can avoid.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import tempfile
import time
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from common import free_port
from fastclip.distributed import DistEnv, comm
from fastclip.train.engine import PHASES, StepTimer, Trainer
from fastclip.losses.base import Objective
from fastclip.models import ModelBundle
from fastclip.train.precision import resolve_precision
from fastclip.train.progress import Progress, StepPlan
from fastclip.run.log import MetricsSink
from training.builders import build_model_of, build_objective
from training.builders import build_trainer as build_training
from training.config import Config
from training.params import parse_args

MODEL = "ViT-Tiny-32px"
EMBED_DIM = 64  # MODEL's feature dimension
CC3M_DATA_SIZE = 3_318_333  # the seed's --data_size: the state table has its real size
FLOOR = "floor"
OPENCLIP = "openclip"
FASTCLIP_VERSIONS = ("fastclip-v0", "fastclip-v1", "fastclip-v2", "fastclip-v3")
VARIANTS = (OPENCLIP, *FASTCLIP_VERSIONS, FLOOR)

_COMMON = ["--model", MODEL, "--wd", "0.1", "--warmup", "10000", "--epochs", "37", "--seed", "2024",
           "--local-loss", "--lr", "1e-3", "--dataset-type", "synthetic"]
_GAMMA = ["--gamma", "0.2", "--gamma_schedule", "cosine", "--gamma_decay_epochs", "18"]
SEED_FLAGS: dict[str, list[str]] = {
    OPENCLIP: ["--gather-with-grad"],
    "fastclip-v0": ["--fastclip", "--temperature_scheme", "global_learnable", *_GAMMA],
    "fastclip-v1": ["--fastclip", "--temperature_scheme", "global_constant", *_GAMMA],
    "fastclip-v2": ["--fastclip", "--temperature_scheme", "individual_learnable", "--lr_tau", "0.0133",
                    "--lr_tau_scheduler", "const", "--temperature", "0.03", "--rho", "7.0", *_GAMMA],
    "fastclip-v3": ["--fastclip", "--multiply_tau", "--temperature_scheme", "global_learnable", "--rho", "6.5",
                    "--lr_tau", "2e-4", "--lr_tau_scheduler", "step_thresh", *_GAMMA],
    FLOOR: [],  # OpenCLIP's optimizer groups; the objective is replaced by TrivialObjective
}


class TrivialObjective:
    """The floor: a loss that costs nothing, yet reaches every parameter (logit_scale included, so
    DDP finds no unused parameter) and runs no collective of its own."""

    learns_model_temperature = True

    def __call__(self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                 index: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"trivial_loss": logit_scale * (image_features * text_features).sum() / image_features.shape[0]}

    def on_epoch_start(self, epoch: int) -> None:
        pass

    def log_values(self) -> dict[str, float]:
        return {}


@dataclass
class WallAndCpuTimer(StepTimer):
    """The Trainer's phase timer (wall time, which the Trainer logs) that also keeps each phase's
    process CPU time. Other jobs on a shared machine stretch wall time, much less the CPU time the
    process spends; a rank waiting in a gloo collective spends none, so CPU time is the rank's own work.
    """

    cpu_totals: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    last_cpu: dict[str, float] = field(default_factory=dict)  # CPU totals of the last window
    _last_cpu: float = 0.0

    def start(self) -> None:
        super().start()
        self._last_cpu = time.process_time()

    def lap(self, phase: str) -> None:
        super().lap(phase)
        now = time.process_time()
        self.cpu_totals[phase] += now - self._last_cpu
        self._last_cpu = now

    def reset(self) -> dict[str, float]:
        self.last_cpu, self.cpu_totals = dict(self.cpu_totals), defaultdict(float)
        return super().reset()


class WindowRecorder:
    """Takes the place of MetricsSink: keeps the values the Trainer logs at the end of a window."""

    def __init__(self) -> None:
        self.last: dict[str, float] = {}

    def write(self, step: int, values: dict[str, float]) -> None:
        self.last = dict(values)


def _entry(rank: int, world: int, port: int, backend: str, fn: Callable[..., Any], args: tuple, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # ranks share the machine's cores; more threads per rank only contend
    logging.getLogger().setLevel(logging.ERROR)  # open_clip warns that the model has no pretrained weights
    warnings.filterwarnings("ignore", category=FutureWarning)  # open_clip's ClipLoss calls a deprecated all_gather
    if world > 1:
        dist.init_process_group(backend, rank=rank, world_size=world)
    try:
        result = fn(*args)
    finally:
        if world > 1:
            dist.destroy_process_group()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))


def run_on_ranks(world: int, fn: Callable[..., Any], *args: Any, backend: str = "gloo") -> list:
    """fn(*args) on `world` fresh processes of 1 thread (a process group when world > 1); their JSON
    results by rank.

    Fresh processes even for world == 1, so that every measurement (peak RSS included) starts clean.
    """
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_entry, args=(world, free_port(), backend, fn, args, out_dir), nprocs=world, join=True)
        return [json.loads(Path(out_dir, f"rank{r}.json").read_text()) for r in range(world)]


def rank_device(kind: str) -> torch.device:
    """This rank's device: the CPU, or the GPU of its rank."""
    return torch.device("cuda", comm.rank() % torch.cuda.device_count()) if kind == "cuda" else torch.device("cpu")


def variant_config(variant: str, batch_size: int, data_size: int) -> Config:
    """The configuration of a variant's seed command with this benchmark's model, batch and data size."""
    sizes = ["--batch-size", str(batch_size), "--train-num-samples", str(data_size), "--data_size", str(data_size)]
    return Config.from_args(parse_args([*_COMMON, *sizes, *SEED_FLAGS[variant]]))


def _env(device: torch.device) -> DistEnv:
    """This process's place in the job, as training/main.py's init_distributed would report it."""
    return DistEnv(comm.rank(), comm.world_size(), comm.rank(), device)


def build_variant_objective(variant: str, config: Config, device: torch.device) -> Objective:
    """The variant's objective as training builds it from its flags (FLOOR: the trivial one)."""
    return TrivialObjective() if variant == FLOOR else build_objective(config, _env(device))


def build_engine(config: Config, env: DistEnv, objective: Objective | None = None,
                 metrics: MetricsSink | None = None) -> tuple[Trainer, ModelBundle]:
    """What training/main.py builds for a configuration (`training.builders`: the model, the objective,
    `build_trainer`), the one path from flags to a trainer in bench/; also the model bundle, whose tokenizer
    makes real text batches. `objective` replaces the one the flags name (FLOOR's)."""
    precision = resolve_precision(config.optim.precision, env.device)
    bundle = build_model_of(config, env.device, precision)
    objective = build_objective(config, env) if objective is None else objective
    optim = config.optim
    steps = StepPlan.of_epoch(10**6 // optim.epochs, optim.accum_freq, optim.epochs)
    trainer = build_training(config, env, bundle.model, objective, precision, steps, metrics=metrics)
    return trainer, bundle


def build_trainer(variant: str, batch_size: int, data_size: int, device: torch.device) -> Trainer:
    """`build_engine` for the variant's seed flags, with the per-phase timer on (wall and CPU)."""
    config = variant_config(variant, batch_size, data_size)
    torch.manual_seed(config.run.seed)  # identical initial weights on every rank
    trivial = TrivialObjective() if variant == FLOOR else None
    trainer, _ = build_engine(config, _env(device), trivial, WindowRecorder())
    trainer.profile = True
    trainer.timer = WallAndCpuTimer(device, enabled=True)
    return trainer


def synthetic_batches(batch_size: int, count: int, data_size: int, device: torch.device,
                      seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """`count` fixed in-memory batches of this rank (random pixels, tokens, sample indices).

    Ready on the device, so that the step's data phase measures the loop, not a data pipeline. All
    ranks draw the same global indices and take their slice, as a sharded loader would.
    """
    generator = torch.Generator().manual_seed(seed)
    world, rank = comm.world_size(), comm.rank()
    batches = []
    for _ in range(count):
        index = torch.randint(0, data_size, (world * batch_size,), generator=generator)[rank::world]
        batches.append({
            "image": torch.randn(batch_size, 3, 32, 32, generator=generator).to(device),
            "text": torch.randint(1, 49408, (batch_size, 32), generator=generator).to(device),
            "index": index.to(device),
        })
    return batches


def run_window(trainer: Trainer, batches: Iterable[dict], steps: int, global_step: int = 0,
               epoch: int = 1) -> dict[str, float]:
    """Seconds per step of each phase and their sum ('step') over `steps` real training steps, by
    clock: {"wall_forward": ..., "cpu_forward": ..., ..., "wall_step": ..., "cpu_step": ...}.

    Runs `Trainer.train_epoch` as one logging window, so the wall numbers are those of `--profile`.
    Epoch 1: gamma < 1 and v2's Adam moments on, as in most of a run.
    """
    trainer.log_every_n_steps = steps
    trainer.train_epoch(itertools.islice(batches, steps), Progress(epoch, 0, global_step), steps, total_steps=10**6)
    wall = {phase: trainer.metrics.last[f"time_{phase}"] for phase in PHASES}
    cpu = {phase: trainer.timer.last_cpu[phase] / steps for phase in PHASES}
    metrics = {f"{clock}_{phase}": value for clock, values in (("wall", wall), ("cpu", cpu))
               for phase, value in values.items()}
    return {**metrics, "wall_step": sum(wall.values()), "cpu_step": sum(cpu.values())}
