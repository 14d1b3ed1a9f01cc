"""A set-up run from start to end: one restore, then the epoch loop with its checkpoints and evaluations."""

from __future__ import annotations

import logging

from fastclip.checkpoint import files
from fastclip.distributed import control
from fastclip.train.optim import unwrap
from fastclip.train.progress import Progress
from training.builders import Run, resume_candidates, seed_everything

logger = logging.getLogger("fastclip")


def train_and_evaluate(run: Run) -> dict:
    """Set-up is done: one restore, then the epoch loop with its checkpoints and evaluations."""
    config, env = run.config, run.env
    stop_epochs = config.optim.stop_epochs
    candidates, explicit = resume_candidates(config, run.run_dir)
    if run.trainer is None:  # evaluation only: the weights of the checkpoint, nothing else
        loaded = files.load_first_good(candidates, explicit, agree=control.first_error)  # the same on every rank
        if loaded is None:
            return run.evaluate(Progress(), None)
        path, checkpoint = loaded
        unwrap(run.model).load_state_dict(files.model_state(checkpoint))
        logger.info("loaded model weights of %s (epoch %s)", path, checkpoint["epoch"])
        return run.evaluate(Progress(epoch=int(checkpoint["epoch"]), global_step=int(checkpoint["step"])), path)
    progress, restored = run.checkpointer.restore(candidates, explicit)
    if progress.epoch >= stop_epochs:
        logger.info("the checkpoint has already trained %d of %d epochs: evaluating only", progress.epoch,
                    stop_epochs)
        return run.evaluate(progress, restored)
    metrics: dict = {}
    for epoch in range(progress.epoch, stop_epochs):
        if progress.step_in_epoch == 0:  # a resumed epoch restored its RNG states and data position
            seed_everything(config.run.seed + env.rank + 7919 * epoch)
            run.data.train.set_epoch(epoch)
        if not run.trainer.train_epoch(run.data.train, progress, run.steps.steps_per_epoch, run.steps.total_steps,
                                       run.control):
            raise run.control.stop(progress)
        progress.finish_epoch()
        checkpoint = run.control.end_epoch(progress)
        metrics = run.evaluate(progress, checkpoint, final=progress.epoch == stop_epochs) or metrics
    return metrics
