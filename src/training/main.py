"""OpenCLIP-style training script for FastCLIP and OpenCLIP.

Runs as `python -u src/training/main.py ...` (one process, or one per task under `srun`) and as
`cd src && torchrun --nproc_per_node=N -m training.main ...`; tests call `main([...])`.
"""

from __future__ import annotations

import argparse
import logging
import random
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

if __package__ in (None, ""):  # `python src/training/main.py`: make `training` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fastclip.checkpoint import files as ckpt  # noqa: E402
from fastclip.distributed import DistEnv, init_distributed  # noqa: E402
from fastclip.distributed.env import close_distributed  # noqa: E402
from fastclip.engine import Trainer  # noqa: E402
from fastclip.log import MetricsSink, setup_logging  # noqa: E402
from fastclip.models import build_model  # noqa: E402
from fastclip.optim import build_optimizer, unwrap  # noqa: E402
from fastclip.precision import resolve_precision  # noqa: E402
from fastclip.schedules import LrSchedule, TauLrSchedule  # noqa: E402
from training.builders import build_data, build_objective, run_evaluations  # noqa: E402
from training.params import parse_args, save_params  # noqa: E402

logger = logging.getLogger("fastclip")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _prepare_run_dir(args: argparse.Namespace) -> Path:
    """The run's folder; an existing one is an error unless the run resumes (or only evaluates)."""
    run_dir = Path(args.logs) / args.name
    training = args.dataset_type != "none" and args.epochs > 0
    if training and args.resume is None and (run_dir / "checkpoints").exists() and any(
        (run_dir / "checkpoints").iterdir()
    ):
        raise SystemExit(
            f"error: {run_dir} already holds checkpoints. Continue it with --resume latest, "
            "or pick another --name."
        )
    return run_dir


def wrap_ddp(model: torch.nn.Module, env: DistEnv) -> torch.nn.Module:
    """DDP without device_ids on CPU (a CPU device id fails); buffers are broadcast every step only
    when some change in training (batch norm statistics), not for constant ones like attention masks."""
    device_ids = [env.device] if env.device.type == "cuda" else None
    has_running_stats = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids, broadcast_buffers=has_running_stats)


def _resume_path(args: argparse.Namespace, run_dir: Path) -> Path | None:
    if args.resume is None:
        return None
    if args.resume == "latest":
        path = ckpt.find_latest(run_dir / "checkpoints")
        if path is None:
            logger.info("--resume latest: no checkpoint in %s yet, starting from scratch", run_dir / "checkpoints")
        return path
    path = Path(args.resume)
    if not path.is_file():
        raise SystemExit(f"error: --resume {args.resume}: no such file")
    return path


def main(argv: Sequence[str] | None = None) -> dict:
    """Train and/or evaluate as the flags say; returns the last evaluation's metrics."""
    args = parse_args(argv)
    env = init_distributed(args.device, args.dist_backend, args.dist_url)
    try:
        return _run(args, env)
    finally:
        close_distributed()


def _run(args: argparse.Namespace, env: DistEnv) -> dict:
    run_dir = _prepare_run_dir(args)
    setup_logging(run_dir / "out.log", env.rank)
    if env.is_master:
        save_params(args, run_dir)
    logger.info("run %s: rank %d of %d on %s", args.name, env.rank, env.world_size, env.device)
    seed_everything(args.seed)  # identical initial weights on every rank
    precision = resolve_precision(args.precision, env.device)
    if env.device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input sizes: let cuDNN pick the fastest kernels
    bundle = build_model(args.model, env.device, args.temperature, precision.model_dtype, args.pretrained,
                         args.grad_checkpointing)
    model = bundle.model
    objective = build_objective(args, env)
    if not objective.learns_model_temperature:
        model.logit_scale.requires_grad_(False)

    resume_path = _resume_path(args, run_dir)
    checkpoint = ckpt.load(resume_path) if resume_path else None
    if checkpoint is not None:
        unwrap(model).load_state_dict(ckpt.model_state(checkpoint))
        logger.info("loaded model weights of %s (epoch %s)", resume_path, checkpoint.get("epoch"))

    data = build_data(args, env, bundle)
    metrics: dict = {}
    if data.train is None or args.epochs == 0:  # evaluation only: no optimizer, no per-sample state
        return run_evaluations(args, env, model, bundle, data, epoch=int(checkpoint["epoch"]) if checkpoint else 0,
                               run_dir=run_dir, precision=precision)

    tau_lr = args.lr_tau if args.fastclip and objective.learns_model_temperature else None
    optimizer = build_optimizer(model, args.lr, args.wd, (args.beta1, args.beta2), args.eps, tau_lr)
    steps_per_epoch = len(data.train)
    total_steps = steps_per_epoch * args.epochs
    cooldown_steps = (args.epochs_cooldown or 0) * steps_per_epoch
    lr_schedule = LrSchedule(args.lr_scheduler, args.lr, args.warmup, total_steps, cooldown_steps, args.lr_cooldown_end)
    tau_schedule = TauLrSchedule(args.lr_tau_scheduler, args.lr_tau, args.warmup, total_steps)

    if env.distributed:
        model = wrap_ddp(model, env)
    if args.torchcompile:
        model = torch.compile(model)

    trainer = Trainer(
        model=model, objective=objective, optimizer=optimizer, lr_schedule=lr_schedule, tau_schedule=tau_schedule,
        precision=precision, device=env.device, world_size=env.world_size, grad_clip_norm=args.grad_clip_norm,
        log_every_n_steps=args.log_every_n_steps, profile=args.profile,
        metrics=MetricsSink(run_dir, args.report_to, vars(args), enabled=env.is_master),
    )
    start_epoch, global_step = 0, 0
    if checkpoint is not None:
        start_epoch, global_step = int(checkpoint["epoch"]), int(checkpoint["step"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        if trainer.scaler is not None and "scaler" in checkpoint:
            trainer.scaler.load_state_dict(checkpoint["scaler"])
        objective.load_state_dict(checkpoint["objective"])
        tau_schedule.load_state_dict(checkpoint["tau_schedule"])
        logger.info("resumed at epoch %d, step %d", start_epoch, global_step)
    if start_epoch >= args.stop_epochs:
        logger.info("the checkpoint has already trained %d of %d epochs: evaluating only", start_epoch, args.stop_epochs)
        return run_evaluations(args, env, model, bundle, data, start_epoch, run_dir, precision)

    for epoch in range(start_epoch, args.stop_epochs):
        seed_everything(args.seed + env.rank + 7919 * epoch)  # a resumed epoch sees the same augmentations
        data.train.set_epoch(epoch)
        global_step = trainer.train_epoch(data.train, epoch, global_step, steps_per_epoch, total_steps)
        completed = epoch + 1
        _save(args, env, run_dir, trainer, objective, tau_schedule, completed, global_step)
        metrics = run_evaluations(args, env, model, bundle, data, completed, run_dir, precision,
                                  final=completed == args.stop_epochs) or metrics
    if trainer.metrics is not None:
        trainer.metrics.close()
    return metrics


def _save(args, env, run_dir, trainer, objective, tau_schedule, epoch: int, step: int) -> None:
    """Every rank takes part (the objective's sharded state is gathered); rank 0 writes."""
    due = args.save_frequency > 0 and (epoch % args.save_frequency == 0 or epoch == args.epochs)
    if not (due or args.save_most_recent):
        return
    payload = {
        "epoch": epoch,
        "step": step,
        "name": args.name,
        "state_dict": unwrap(trainer.model).state_dict(),
        "optimizer": trainer.optimizer.state_dict(),
        "objective": objective.state_dict(),
        "tau_schedule": tau_schedule.state_dict(),
        "config": {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, list, type(None)))},
    }
    if trainer.scaler is not None:
        payload["scaler"] = trainer.scaler.state_dict()
    if not env.is_master:
        return
    checkpoint_dir = run_dir / "checkpoints"
    if due:
        path = checkpoint_dir / f"epoch_{epoch}.pt"
        ckpt.save_atomic(payload, path)
        logger.info("saved %s", path)
        if args.delete_previous_checkpoint:
            ckpt.prune_previous(checkpoint_dir, keep=path)
    if args.save_most_recent:
        ckpt.save_atomic(payload, checkpoint_dir / "epoch_latest.pt")


if __name__ == "__main__":
    main()
