"""The evaluations of a run, due by epoch and flags, split over the ranks, recorded in results.jsonl."""

from __future__ import annotations

import logging
from datetime import datetime
from pathlib import Path

import torch

from fastclip import evaluate
from fastclip.distributed import DistEnv
from fastclip.models import ModelBundle
from fastclip.train.optim import unwrap
from fastclip.train.precision import Precision
from fastclip.train.progress import Progress
from training.config import Config
from training.data_setup import DataBundle

logger = logging.getLogger("fastclip")


def run_evaluations(
    config: Config,
    env: DistEnv,
    model: torch.nn.Module,
    bundle: ModelBundle,
    data: DataBundle,
    progress: Progress,
    checkpoint: Path | None,
    run_dir: Path,
    precision: Precision,
    final: bool = True,
) -> dict:
    """Zero-shot and retrieval evaluations due after `progress.epoch`, split over the ranks: every rank
    calls this and gets the metrics. Rank 0 appends them to results.jsonl with the run, model, the
    checkpoint file holding the evaluated weights (None: no file does), epoch, global step and time."""
    epoch = progress.epoch
    metrics: dict = {}
    plan, batch_size = config.eval, config.data.batch_size
    due_zeroshot = plan.imagenet_val and (final or (plan.zeroshot_frequency and epoch % plan.zeroshot_frequency == 0))
    due_retrieval = final or (plan.val_frequency and epoch % plan.val_frequency == 0)
    bare = unwrap(model)
    if due_zeroshot:
        metrics.update(evaluate.zero_shot_eval(
            bare, plan.imagenet_val, bundle.preprocess_val, bundle.tokenizer, env.device,
            batch_size=batch_size, workers=config.data.workers, precision=precision,
            classnames_file=plan.zeroshot_classnames,
        ))
    if data.val is not None and due_retrieval:
        metrics.update(evaluate.retrieval_eval(bare, data.val(), env.device, batch_size=batch_size,
                                               precision=precision, num_samples=plan.val_num_samples))
    if data.train_subset is not None and due_retrieval:
        subset = evaluate.retrieval_eval(bare, data.train_subset(), env.device, batch_size=batch_size,
                                         precision=precision, num_samples=plan.train_eval_num_samples)
        metrics.update({f"train_subset_{key}": value for key, value in subset.items()})
    if metrics and env.is_master:
        record = {"name": config.run.name, "model": config.model.model,
                  "checkpoint": None if checkpoint is None else str(Path(checkpoint).resolve()), "epoch": epoch,
                  "step": progress.global_step, "time": datetime.now().astimezone().isoformat(timespec="seconds"),
                  **metrics}
        evaluate.append_results(run_dir / "results.jsonl", record)
        shown = " ".join(f"{k}: {v if isinstance(v, int) else round(v, 4)}" for k, v in metrics.items())
        logger.info("Eval Epoch: %d %s", epoch, shown)
    return metrics
