"""From parsed flags to library objects: the only place where argparse meets the fastclip library."""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch

from fastclip import evaluate
from fastclip.dist import DistEnv
from fastclip.losses.base import Objective
from fastclip.losses.fastclip import FastCLIPConfig, FastCLIPObjective
from fastclip.losses.openclip import OpenCLIPObjective
from fastclip.models import ModelBundle
from fastclip.optim import unwrap
from fastclip.precision import Precision

logger = logging.getLogger("fastclip")


def build_objective(args: argparse.Namespace, env: DistEnv) -> Objective:
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
class TrainData:
    steps_per_epoch: int
    loader: Callable[[int], Iterable[dict]]  # epoch -> that epoch's batches


@dataclass
class DataBundle:
    train: TrainData | None
    val: Callable[[], Iterable[dict]] | None


def build_data(args: argparse.Namespace, env: DistEnv, bundle: ModelBundle) -> DataBundle:
    raise NotImplementedError


def run_evaluations(
    args: argparse.Namespace,
    env: DistEnv,
    model: torch.nn.Module,
    bundle: ModelBundle,
    data: DataBundle,
    epoch: int,
    run_dir: Path,
    precision: Precision,
    final: bool = True,
) -> dict:
    """Zero-shot and retrieval evaluations due at `epoch`, on rank 0; results appended to results.jsonl."""
    if not env.is_master:
        return {}
    metrics: dict = {}
    due_zeroshot = args.imagenet_val and (final or (args.zeroshot_frequency and epoch % args.zeroshot_frequency == 0))
    due_val = data.val is not None and (final or (args.val_frequency and epoch % args.val_frequency == 0))
    bare = unwrap(model)
    if due_zeroshot:
        metrics.update(evaluate.zero_shot_eval(
            bare, args.imagenet_val, bundle.preprocess_val, bundle.tokenizer, env.device,
            batch_size=args.batch_size, workers=args.workers, precision=precision, classnames_file=args.zeroshot_classnames,
        ))
    if due_val:
        metrics.update(evaluate.retrieval_eval(bare, data.val(), env.device, precision=precision))
    if metrics:
        record = {"epoch": epoch, **metrics}
        evaluate.append_results(run_dir / "results.jsonl", record)
        logger.info("Eval Epoch: %d %s", epoch, " ".join(f"{k}: {v:.4f}" for k, v in metrics.items()))
    return metrics
