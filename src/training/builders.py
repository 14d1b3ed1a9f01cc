"""From parsed flags to library objects: the only place where argparse meets the fastclip library."""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch

from fastclip import evaluate
from fastclip.data.synthetic import build_synthetic_loader
from fastclip.data.wds import TrainLoader, build_train_loader, build_val_loader
from fastclip.distributed import DistEnv
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
class DataBundle:
    train: TrainLoader | None  # set_epoch(e), then iterate: exactly len() batches on every rank
    val: Callable[[], Iterable[dict]] | None  # a fresh pass over the retrieval validation set


def build_data(args: argparse.Namespace, env: DistEnv, bundle: ModelBundle) -> DataBundle:
    """The training loader of this rank (webdataset or synthetic) and, on rank 0, the validation loader."""
    pin = env.device.type == "cuda"
    common = dict(preprocess=bundle.preprocess_train, tokenizer=bundle.tokenizer, batch_size=args.batch_size,
                  seed=args.seed, rank=env.rank, world_size=env.world_size, workers=args.workers, pin_memory=pin)
    train = None
    if args.dataset_type == "webdataset" and args.train_data:
        train = build_train_loader(args.train_data, num_samples=args.train_num_samples, data_size=args.data_size,
                                   **common)
    elif args.dataset_type == "synthetic":
        size = unwrap(bundle.model).visual.image_size
        train = build_synthetic_loader(args.train_num_samples, image_size=size if isinstance(size, int) else size[0],
                                       **common)
    if not (args.val_data and env.is_master):
        return DataBundle(train, None)

    def val() -> Iterable[dict]:
        loader = build_val_loader(args.val_data, bundle.preprocess_val, bundle.tokenizer, args.batch_size,
                                  workers=args.workers, pin_memory=pin)
        return first_samples(loader, args.val_num_samples) if args.val_num_samples else loader

    return DataBundle(train, val)


def first_samples(batches: Iterable[dict], limit: int) -> Iterator[dict]:
    """The first `limit` samples of a stream of batches (--val-num-samples), the last batch cut to fit."""
    remaining = limit
    for batch in batches:
        if remaining <= 0:
            return
        size = len(batch["index"])
        yield batch if size <= remaining else {k: v[:remaining] if torch.is_tensor(v) else v for k, v in batch.items()}
        remaining -= size


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
        shown = " ".join(f"{k}: {v if isinstance(v, int) else round(v, 4)}" for k, v in metrics.items())
        logger.info("Eval Epoch: %d %s", epoch, shown)
    return metrics
