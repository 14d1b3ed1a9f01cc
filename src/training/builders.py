"""From parsed flags to library objects: the only place where argparse meets the fastclip library.

`build_trainer` wires a model and an objective into a `Trainer` (optimizer, schedules, DDP); the
benchmarks use it as the training script does. `build_run` sets up a whole run: its folder and lock,
logging, model, objective, data (`data_setup`), trainer, checkpointer, the between-steps control and
the evaluations (`evaluation`).
"""

from __future__ import annotations

import argparse
import contextlib
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
from fastclip.losses.fastclip import FastCLIPConfig, FastCLIPObjective
from fastclip.losses.openclip import OpenCLIPObjective
from fastclip.losses.siglip import SigLIPObjective
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
from training.data_setup import DataBundle, build_data, resolve_auto_sizes
from training import preflight
from training.evaluation import run_evaluations
from training.params import save_params, trains

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


def build_trainer(args: argparse.Namespace, env: DistEnv, model: torch.nn.Module, objective: Objective,
                  precision: Precision, steps: StepPlan, metrics: MetricsSink | None = None) -> Trainer:
    """Optimizer, schedules over the `steps` of the run, DDP and compile around `model`."""
    if not objective.learns_model_temperature:
        model.logit_scale.requires_grad_(False)
    tau_lr = args.lr_tau if args.fastclip and objective.learns_model_temperature else None
    optimizer = build_optimizer(model, args.lr, args.wd, (args.beta1, args.beta2), args.eps, tau_lr,
                                fused=env.device.type == "cuda", opt=args.opt, momentum=args.momentum)
    cooldown_steps = (args.epochs_cooldown or 0) * steps.steps_per_epoch
    lr_schedule = LrSchedule("none" if args.skip_scheduler else args.lr_scheduler, args.lr, args.warmup,
                             steps.total_steps, cooldown_steps, args.lr_cooldown_end, args.lr_cooldown_power)
    tau_schedule = TauLrSchedule(args.lr_tau_scheduler, args.lr_tau, args.warmup, steps.total_steps)
    if env.distributed:
        model = wrap_ddp(model, env, args.use_bn_sync, args.ddp_static_graph)
    if args.torchcompile:
        model = torch.compile(model)
    return Trainer(
        model=model, objective=objective, optimizer=optimizer, lr_schedule=lr_schedule, tau_schedule=tau_schedule,
        precision=precision, device=env.device, world_size=env.world_size, grad_clip_norm=args.grad_clip_norm,
        log_every_n_steps=args.log_every_n_steps, profile=args.profile, metrics=metrics,
        max_bad_steps=args.max_bad_steps, accum_freq=args.accum_freq,
    )


def build_objective(args: argparse.Namespace, env: DistEnv) -> Objective:
    if args.siglip:
        return SigLIPObjective(env.rank, env.world_size, args.loss_dist_impl)
    if not args.fastclip:
        return OpenCLIPObjective(args.local_loss, args.gather_with_grad, env.rank, env.world_size)
    config = FastCLIPConfig(
        temperature_scheme=args.temperature_scheme,
        data_size=args.data_size,
        gamma=args.gamma,
        gamma_schedule=args.gamma_schedule,
        gamma_decay_epochs=args.gamma_decay_epochs,
        temperature=args.temperature,
        rho=args.rho,
        fastclip_eps=args.fastclip_eps,
        multiply_tau=args.multiply_tau,
        lr_tau=args.lr_tau,
        beta1=args.beta1,
        beta2=args.beta2,
        eps=args.eps,
    )
    return FastCLIPObjective(config, env.device)


@dataclass
class Run:
    """A set-up run; `steps`, `trainer`, `checkpointer` and `control` are None when it only evaluates."""

    args: argparse.Namespace
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
        return run_evaluations(self.args, self.env, self.model, self.bundle, self.data, progress, checkpoint,
                               self.run_dir, self.precision, final)

    def close(self) -> None:
        self.stack.close()


def prepare_run_dir(args: argparse.Namespace, env: DistEnv, stack: contextlib.ExitStack) -> tuple[Path, str | None]:
    """The run's folder, locked by rank 0 for the whole run, and the dead process whose lock was taken
    over, if any. An existing run's folder is an error unless the run resumes (or only evaluates).
    Every rank raises the same one-line error."""
    run_dir = Path(args.logs) / args.name
    checkpoint_dir = run_dir / "checkpoints"
    error, previous = None, None
    if trains(args) and args.resume is None and files.checkpoint_files(checkpoint_dir):
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


def build_run(args: argparse.Namespace, env: DistEnv) -> Run:
    """Everything a run needs, built in order; rank 0 owns the folder (lock, params, logs). What was
    set up is undone if a later part fails."""
    stack = contextlib.ExitStack()
    try:
        return _build_run(args, env, stack)
    except BaseException:
        stack.close()
        raise


def start_remote_sync(args: argparse.Namespace, env: DistEnv, run_dir: Path, stack: contextlib.ExitStack) -> None:
    """--remote-sync: rank 0 checks the remote, copies its checkpoints onto a disk that has none (a job
    restarted elsewhere, --resume latest), then mirrors the run folder until `stack` closes, with a
    last sync then. Every rank waits for the fetch, and stops with rank 0's error."""
    if not args.remote_sync:
        return
    error = None
    if env.is_master:
        remote = remote_run_dir(args.remote_sync, args.name)
        error = check_remote(remote, args.remote_sync_protocol)
        if error is None and args.resume == "latest":
            try:
                fetched = fetch_checkpoints(remote, run_dir, args.remote_sync_protocol)
            except RemoteSyncError as failure:
                error = str(failure)
            else:
                if fetched:
                    logger.info("--remote-sync: fetched %d checkpoints from %s (%s)", len(fetched), remote,
                                ", ".join(fetched))
        if error is None:
            syncer = RemoteSync(run_dir, remote, args.remote_sync_protocol, args.remote_sync_frequency)
            syncer.start()
            stack.callback(syncer.close)
            logger.info("--remote-sync: mirroring %s to %s every %d s", run_dir, remote, args.remote_sync_frequency)
    error = control.broadcast_from_master(None if error is None else f"error: --remote-sync: {error}")
    if error is not None:
        raise SystemExit(error)


def _build_run(args: argparse.Namespace, env: DistEnv, stack: contextlib.ExitStack) -> Run:
    run_dir, previous_holder = prepare_run_dir(args, env, stack)
    setup_logging(run_dir / "out.log", env.rank, logging.DEBUG if args.debug else logging.INFO, env.local_rank,
                  args.log_local)
    if env.rendezvous:
        logger.info("%s", env.rendezvous)
    if previous_holder is not None:
        logger.info("took over the lock of %s, which no longer runs", previous_holder)
    start_remote_sync(args, env, run_dir, stack)
    resolve_auto_sizes(args, env)
    if env.is_master:
        removed = files.remove_leftovers(run_dir / "checkpoints")
        if removed:
            logger.info("removed %d leftovers of interrupted saves (e.g. %s)", len(removed), removed[0].name)
    logger.info("run %s: rank %d of %d on %s", args.name, env.rank, env.world_size, env.device)
    silence_known_warnings()
    cpu_threads = configure_cpu_threads(env.device, args.workers)
    seed_everything(args.seed)  # identical initial weights on every rank
    precision = effective_precision(args, env.device)
    if env.device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input sizes: let cuDNN pick the fastest kernels
    try:
        options = ModelOptions.from_args(args)
        bundle = build_model(args.model, env.device, args.temperature, precision.model_dtype, args.pretrained,
                             args.grad_checkpointing, options)
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None
    data = build_data(args, env, bundle)  # fills the sizes a CSV leaves open
    if env.is_master:
        save_params(args, run_dir)
    if not trains(args) or data.train is None:
        log_startup_summary(args, env, run_dir, bundle, precision, 0, None, cpu_threads)
        return Run(args, env, run_dir, bundle, precision, data, None, None, None, None, stack)
    objective = build_objective(args, env)
    metrics = stack.enter_context(contextlib.closing(
        MetricsSink(run_dir, args.report_to, vars(args), enabled=env.is_master, wandb_project=args.wandb_project_name,
                    wandb_notes=args.wandb_notes)))
    steps = StepPlan.of_epoch(len(data.train), args.accum_freq, args.epochs)
    trainer = build_trainer(args, env, bundle.model, objective, precision, steps, metrics)
    states = {"optimizer": trainer.optimizer, "scaler": trainer.stepper, "objective": objective, "guard": trainer.guard}
    parts = StatefulParts(trainer.model, objective, states, data.train,
                          extra={"name": args.name, "config": plain_config(args)})
    checkpointer = Checkpointer(run_dir / "checkpoints", parts, steps.steps_per_epoch)
    policy = SavePolicy(args.save_frequency, args.epochs, args.save_most_recent, args.delete_previous_checkpoint,
                        args.save_every_n_steps, args.save_every_minutes)
    signals = stack.enter_context(StopSignals())
    run_control = RunControl(checkpointer, policy, signals, trainer.guard)
    stack.callback(run_control.close)
    log_startup_summary(args, env, run_dir, bundle, precision, steps.steps_per_epoch, objective, cpu_threads)
    return Run(args, env, run_dir, bundle, precision, data, steps, trainer, checkpointer, run_control, stack)


def log_startup_summary(args: argparse.Namespace, env: DistEnv, run_dir: Path, bundle: ModelBundle,
                        precision: Precision, steps_per_epoch: int, objective: Objective | None,
                        cpu_threads: str) -> None:
    """Rank 0's start-up block (fastclip.run.summary): what is about to run, before the first step."""
    if not env.is_master:
        return
    state = objective.per_sample if objective is not None else None
    logger.info("%s", format_summary(RunFacts(
        version=version_name(args.fastclip, args.temperature_scheme, args.multiply_tau, args.siglip),
        world_size=env.world_size, local_ranks=local_ranks(os.environ), device=str(env.device),
        precision=precision.describe(), model=args.model, parameters=sum(p.numel() for p in bundle.model.parameters()),
        batch_size=args.batch_size, steps_per_epoch=steps_per_epoch, epochs=args.epochs, stop_epochs=args.stop_epochs,
        data_size=args.data_size if isinstance(args.data_size, int) else None,
        state_bytes_per_sample=state.columns * state.table.element_size() if state is not None else 0,
        state_rows_per_rank=state.rows if state is not None else 0,
        cpu_threads=cpu_threads, output=str(run_dir.resolve()), paths_relative_to=args.paths_relative_to,
    )))


def effective_precision(args: argparse.Namespace, device: torch.device) -> Precision:
    """--precision on this device, recorded in the flags (params.json, checkpoints) as `precision_effective`;
    a precision the device cannot run stops the run with the reason."""
    try:
        precision = resolve_precision(args.precision, device)
    except PrecisionError as error:
        raise SystemExit(f"error: {error}") from None
    args.precision_effective = precision.describe()
    logger.info("precision %s", args.precision_effective)
    slow = slow_on_device(precision, device)
    if slow:
        logger.warning("%s", slow)
    return precision


def plain_config(args: argparse.Namespace) -> dict:
    """The resolved flags that a weights_only checkpoint can hold."""
    return {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, list, type(None)))}


def resume_candidates(args: argparse.Namespace, run_dir: Path) -> tuple[list[Path], bool]:
    """The checkpoints `--resume` names, newest first (`preflight.resume_candidates`), and whether the user
    named one explicitly; the unreadable ones of 'latest' are logged, and none usable at all is an error."""
    candidates, unreadable, explicit = preflight.resume_candidates(args)
    if args.resume != "latest":
        return candidates, explicit
    for problem in unreadable:
        logger.warning("--resume latest: skipping a bad checkpoint: %s", problem)
    if not candidates and not unreadable:
        logger.info("--resume latest: no checkpoint in %s yet, starting from scratch", run_dir / "checkpoints")
    elif not candidates:
        raise SystemExit(f"error: --resume latest: no usable checkpoint in {run_dir / 'checkpoints'}")
    return candidates, False
