"""From the run's configuration to library objects: the only place where the script's config meets the library.

`build_trainer` wires a model and an objective into a `Trainer` (optimizer, schedules, DDP); the
benchmarks use it as the training script does. `build_run` sets up a whole run: its folder and lock,
logging, the settled configuration, model, objective, data (`data_setup`), trainer, checkpointer, the
between-steps control and the evaluations (`evaluation`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fastclip.checkpoint import files
from fastclip.checkpoint.checkpointer import Checkpointer, StatefulParts
from fastclip.distributed import DistEnv, control
from fastclip.distributed.threads import configure_cpu_threads, local_ranks
from fastclip.train.engine import Trainer
from fastclip.run.log import MetricsSink, setup_logging
from fastclip.losses.base import Objective
from fastclip.api import OpenCLIPLoss, SigLIPLoss, create_loss
from fastclip.losses.fastclip import FastCLIPConfig, FastCLIPObjective, regime_warnings
from fastclip.models import ModelBundle, ModelOptions, build_model
from fastclip.train.optim import build_optimizer
from fastclip.train.precision import Precision, PrecisionError, resolve_precision, slow_on_device
from fastclip.train.progress import Progress, StepPlan
from fastclip.run.remote_sync import RemoteSync, RemoteSyncError, check_remote, fetch_checkpoints, remote_run_dir
from fastclip.run.control import RunControl, SavePolicy
from fastclip.run.lock import RunFolderBusy, RunLock
from fastclip.train.schedules import LrSchedule, TauLrSchedule
from fastclip.run.signals import StopSignals
from fastclip.run.summary import RunFacts, format_summary, silence_known_warnings, version_name
from training import preflight
from training.config import Config
from training.data_setup import DataBundle, build_data, settle_sizes
from training.evaluation import run_evaluations
from training.params import save_params

logger = logging.getLogger("fastclip")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def wrap_ddp(model: torch.nn.Module, env: DistEnv, sync_batch_norm: bool = False,
             static_graph: bool = False) -> torch.nn.Module:
    """DDP without device_ids on CPU (a CPU device id fails); buffers are broadcast every step only
    when some change in training (batch norm statistics), not for constant ones like attention masks.
    `sync_batch_norm` (--use-bn-sync) and `static_graph` (--ddp-static-graph) as in open_clip_train."""
    if sync_batch_norm and env.device.type == "cpu":
        raise SystemExit("error: --use-bn-sync needs GPUs: torch's SyncBatchNorm has no CPU kernel; drop it on the CPU")
    if sync_batch_norm:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    device_ids = [env.device] if env.device.type == "cuda" else None
    has_running_stats = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids, broadcast_buffers=has_running_stats,
                                                     static_graph=static_graph)


def build_trainer(config: Config, env: DistEnv, model: torch.nn.Module, objective: Objective,
                  precision: Precision, steps: StepPlan, metrics: MetricsSink | None = None) -> Trainer:
    """Optimizer, schedules over the `steps` of the run, DDP and compile around `model`."""
    optim, run = config.optim, config.run
    if not objective.learns_model_temperature:
        model.logit_scale.requires_grad_(False)
    tau_lr = optim.lr_tau if config.objective.fastclip and objective.learns_model_temperature else None
    optimizer = build_optimizer(model, optim.lr, optim.wd, (optim.beta1, optim.beta2), optim.eps, tau_lr,
                                fused=env.device.type == "cuda", opt=optim.opt, momentum=optim.momentum)
    cooldown_steps = (optim.epochs_cooldown or 0) * steps.steps_per_epoch
    lr_schedule = LrSchedule("none" if optim.skip_scheduler else optim.lr_scheduler, optim.lr, optim.warmup,
                             steps.total_steps, cooldown_steps, optim.lr_cooldown_end, optim.lr_cooldown_power)
    tau_schedule = TauLrSchedule(optim.lr_tau_scheduler, optim.lr_tau, optim.warmup, steps.total_steps)
    if env.distributed:
        model = wrap_ddp(model, env, run.use_bn_sync, run.ddp_static_graph)
    if config.model.torchcompile:
        model = torch.compile(model)
    return Trainer(
        model=model, objective=objective, optimizer=optimizer, lr_schedule=lr_schedule, tau_schedule=tau_schedule,
        precision=precision, device=env.device, world_size=env.world_size, grad_clip_norm=optim.grad_clip_norm,
        log_every_n_steps=run.log_every_n_steps, profile=run.profile, metrics=metrics,
        max_bad_steps=optim.max_bad_steps, accum_freq=optim.accum_freq,
    )


def build_objective(config: Config, env: DistEnv) -> Objective:
    """The objective the flags select, built by the public losses (fastclip.api) as a user's own loop builds
    it; the engine takes its `objective`."""
    objective = config.objective
    if objective.siglip:
        return SigLIPLoss(dist_impl=objective.loss_dist_impl).objective
    if not objective.fastclip:
        return OpenCLIPLoss(local_loss=objective.local_loss, gather_with_grad=objective.gather_with_grad,
                            learn_temperature=objective.temperature_scheme == "global_learnable").objective
    settings = dataclasses.asdict(config.select(FastCLIPConfig))  # its fields are named like the flags
    name = version_name(True, settings.pop("temperature_scheme"), settings.pop("multiply_tau"))  # "FastCLIP-v3"
    return create_loss(name, device=env.device, **settings).objective


@dataclass
class Run:
    """A set-up run; `steps`, `trainer`, `checkpointer` and `control` are None when it only evaluates."""

    config: Config  # settled: the checkpoint's model, the data's sizes, the effective precision
    env: DistEnv
    run_dir: Path
    bundle: ModelBundle
    precision: Precision
    data: DataBundle
    steps: StepPlan | None
    trainer: Trainer | None
    checkpointer: Checkpointer | None
    control: RunControl | None
    stack: contextlib.ExitStack  # what `close` undoes: the lock, the signal handlers, the metrics files

    @property
    def model(self) -> torch.nn.Module:
        return self.bundle.model if self.trainer is None else self.trainer.model

    def evaluate(self, progress: Progress, checkpoint: Path | None, final: bool = True) -> dict:
        """The evaluations due after `progress`, whose weights `checkpoint` holds; on every rank."""
        return run_evaluations(self.config, self.env, self.model, self.bundle, self.data, progress, checkpoint,
                               self.run_dir, self.precision, final)

    def close(self) -> None:
        self.stack.close()


def prepare_run_dir(config: Config, env: DistEnv, stack: contextlib.ExitStack) -> tuple[Path, str | None]:
    """The run's folder, locked by rank 0 for the whole run, and the dead process whose lock was taken
    over, if any. An existing run's folder is an error unless the run resumes (or only evaluates).
    Every rank raises the same one-line error."""
    checkpoint_dir = preflight.checkpoint_dir(config)
    run_dir = checkpoint_dir.parent
    error, previous = None, None
    if config.trains and config.checkpoint.resume is None and files.checkpoint_files(checkpoint_dir):
        error = (f"error: {run_dir} already holds checkpoints. Continue it with --resume latest, "
                 "or pick another --name.")
    elif env.is_master:
        lock = RunLock(run_dir)
        try:
            previous = lock.acquire()
            stack.callback(lock.release)
        except RunFolderBusy as busy:
            error = f"error: {busy}"
    error = control.broadcast_from_master(error)
    if error is not None:
        raise SystemExit(error)
    return run_dir, previous


def build_run(config: Config, env: DistEnv) -> Run:
    """Everything a run needs, built in order; rank 0 owns the folder (lock, params, logs). What was
    set up is undone if a later part fails."""
    stack = contextlib.ExitStack()
    try:
        return _build_run(config, env, stack)
    except BaseException:
        stack.close()
        raise


def start_remote_sync(config: Config, env: DistEnv, run_dir: Path, stack: contextlib.ExitStack) -> None:
    """--remote-sync: rank 0 checks the remote, copies its checkpoints onto a disk that has none (a job
    restarted elsewhere, --resume latest), then mirrors the run folder until `stack` closes, with a
    last sync then. Every rank waits for the fetch, and stops with rank 0's error."""
    run = config.run
    if not run.remote_sync:
        return
    error = None
    if env.is_master:
        remote = remote_run_dir(run.remote_sync, run.name)
        error = check_remote(remote, run.remote_sync_protocol)
        if error is None and config.checkpoint.resume == "latest":
            try:
                fetched = fetch_checkpoints(remote, run_dir, run.remote_sync_protocol)
            except RemoteSyncError as failure:
                error = str(failure)
            else:
                if fetched:
                    logger.info("--remote-sync: fetched %d checkpoints from %s (%s)", len(fetched), remote,
                                ", ".join(fetched))
        if error is None:
            syncer = RemoteSync(run_dir, remote, run.remote_sync_protocol, run.remote_sync_frequency)
            syncer.start()
            stack.callback(syncer.close)
            logger.info("--remote-sync: mirroring %s to %s every %d s", run_dir, remote, run.remote_sync_frequency)
    error = control.broadcast_from_master(None if error is None else f"error: --remote-sync: {error}")
    if error is not None:
        raise SystemExit(error)


def _build_run(config: Config, env: DistEnv, stack: contextlib.ExitStack) -> Run:
    run = config.run
    run_dir, previous_holder = prepare_run_dir(config, env, stack)
    setup_logging(run_dir / "out.log", env.rank, logging.DEBUG if run.debug else logging.INFO, env.local_rank,
                  run.log_local)
    if env.rendezvous:
        logger.info("%s", env.rendezvous)
    if previous_holder is not None:
        logger.info("took over the lock of %s, which no longer runs", previous_holder)
    start_remote_sync(config, env, run_dir, stack)
    config, csv_table = settle_sizes(config, env)
    if env.is_master:
        removed = files.remove_leftovers(run_dir / "checkpoints")
        if removed:
            logger.info("removed %d leftovers of interrupted saves (e.g. %s)", len(removed), removed[0].name)
    logger.info("run %s: rank %d of %d on %s", run.name, env.rank, env.world_size, env.device)
    silence_known_warnings()
    cpu_threads = configure_cpu_threads(env.device, config.data.workers)
    seed_everything(run.seed)  # identical initial weights on every rank
    precision = effective_precision(config.optim.precision, env.device)
    config = config.replace(precision_effective=precision.describe())
    if env.device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input sizes: let cuDNN pick the fastest kernels
    bundle = build_model_of(config, env.device, precision)
    data = build_data(config, env, bundle, csv_table)
    if env.is_master:
        save_params(config, run_dir)
    if not config.trains or data.train is None:
        log_startup_summary(config, env, run_dir, bundle, precision, 0, None, cpu_threads)
        return Run(config, env, run_dir, bundle, precision, data, None, None, None, None, stack)
    objective = build_objective(config, env)
    metrics = stack.enter_context(contextlib.closing(
        MetricsSink(run_dir, run.report_to, config.flat(), enabled=env.is_master,
                    wandb_project=run.wandb_project_name, wandb_notes=run.wandb_notes,
                    resume=config.checkpoint.resume is not None)))
    steps = StepPlan.of_epoch(len(data.train), config.optim.accum_freq, config.optim.epochs)
    if env.is_master and isinstance(objective, FastCLIPObjective):
        for warning in regime_warnings(objective.config, steps.epochs, steps.total_steps):
            logger.warning("%s", warning)
    trainer = build_trainer(config, env, bundle.model, objective, precision, steps, metrics)
    states = {"optimizer": trainer.optimizer, "scaler": trainer.stepper, "objective": objective, "guard": trainer.guard}
    parts = StatefulParts(trainer.model, objective, states, data.train,
                          extra={"name": run.name, "config": plain_config(config)}, required=("optimizer", "objective"))
    checkpointer = Checkpointer(run_dir / "checkpoints", parts, steps.steps_per_epoch)
    saves = config.checkpoint
    policy = SavePolicy(every_n_epochs=saves.save_frequency, final_epoch=config.optim.epochs,
                        most_recent=saves.save_most_recent, delete_previous=saves.delete_previous_checkpoint,
                        every_n_steps=saves.save_every_n_steps, every_minutes=saves.save_every_minutes)
    signals = stack.enter_context(StopSignals())
    run_control = RunControl(checkpointer, policy, signals, trainer.guard)
    stack.callback(run_control.close)
    log_startup_summary(config, env, run_dir, bundle, precision, steps.steps_per_epoch, objective, cpu_threads)
    return Run(config, env, run_dir, bundle, precision, data, steps, trainer, checkpointer, run_control, stack)


def build_model_of(config: Config, device: torch.device, precision: Precision) -> ModelBundle:
    """The model, transforms and tokenizer the model part of `config` names, in the precision's weight type."""
    model = config.model
    try:
        return build_model(model.model, device, model.temperature, precision.model_dtype, model.pretrained,
                           model.grad_checkpointing, ModelOptions.from_record(dataclasses.asdict(model)))
    except (ValueError, OSError) as error:  # OSError: weights or Hugging Face files that cannot be had
        raise SystemExit(f"error: {' '.join(str(error).split())}") from None


def log_startup_summary(config: Config, env: DistEnv, run_dir: Path, bundle: ModelBundle,
                        precision: Precision, steps_per_epoch: int, objective: Objective | None,
                        cpu_threads: str) -> None:
    """Rank 0's start-up block (fastclip.run.summary): what is about to run, before the first step."""
    if not env.is_master:
        return
    state = objective.per_sample if objective is not None else None
    loss, data, optim = config.objective, config.data, config.optim
    logger.info("%s", format_summary(RunFacts(
        version=version_name(loss.fastclip, loss.temperature_scheme, loss.multiply_tau, loss.siglip),
        world_size=env.world_size, local_ranks=local_ranks(os.environ), device=str(env.device),
        precision=precision.describe(), model=config.model.model,
        parameters=sum(p.numel() for p in bundle.model.parameters()),
        batch_size=data.batch_size, steps_per_epoch=steps_per_epoch, epochs=optim.epochs, stop_epochs=optim.stop_epochs,
        data_size=data.data_size if isinstance(data.data_size, int) else None,
        state_bytes_per_sample=state.columns * state.table.element_size() if state is not None else 0,
        state_rows_per_rank=state.rows if state is not None else 0,
        cpu_threads=cpu_threads, output=str(run_dir.resolve()), paths_relative_to=config.run.paths_relative_to,
    )))


def effective_precision(name: str, device: torch.device) -> Precision:
    """--precision on this device (recorded as `precision_effective` in params.json and checkpoints); a
    precision the device cannot run stops the run with the reason."""
    try:
        precision = resolve_precision(name, device)
    except PrecisionError as error:
        raise SystemExit(f"error: {error}") from None
    logger.info("precision %s", precision.describe())
    slow = slow_on_device(precision, device)
    if slow:
        logger.warning("%s", slow)
    return precision


def plain_config(config: Config) -> dict:
    """The settled flags that a weights_only checkpoint can hold."""
    return {k: v for k, v in config.flat().items() if isinstance(v, (int, float, str, bool, list, type(None)))}


def resume_candidates(config: Config, run_dir: Path) -> tuple[list[Path], bool]:
    """The checkpoints `--resume` names, newest first (`preflight.resume_candidates`), and whether the user
    named one explicitly; the unreadable ones of 'latest' are logged, and none usable at all is an error."""
    candidates, unreadable, explicit = preflight.resume_candidates(config)
    if config.checkpoint.resume != "latest":
        return candidates, explicit
    for problem in unreadable:
        logger.warning("--resume latest: skipping a bad checkpoint: %s", problem)
    if not candidates and not unreadable:
        logger.info("--resume latest: no checkpoint in %s yet, starting from scratch", run_dir / "checkpoints")
    elif not candidates:
        raise SystemExit(f"error: --resume latest: no usable checkpoint in {run_dir / 'checkpoints'}")
    return candidates, False
