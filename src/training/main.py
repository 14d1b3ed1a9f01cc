"""OpenCLIP-style training script for FastCLIP and OpenCLIP.

Runs as `python -u src/training/main.py ...` (one process, or one per task under `srun`) and as
`cd src && torchrun --nproc_per_node=N -m training.main ...`; tests call `main([...])`.
Exit codes: 0 done, 1 an error (one line says which), 75 stopped by a signal after saving a
checkpoint, 76 another rank hung or died, 77 too many non-finite steps (see fastclip.progress).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Sequence

if __package__ in (None, ""):  # `python src/training/main.py`: make `training` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fastclip.checkpoint import files  # noqa: E402
from fastclip.checkpoint.checkpointer import CheckpointWriteError  # noqa: E402
from fastclip.distributed import control, init_distributed  # noqa: E402
from fastclip.distributed.env import close_distributed  # noqa: E402
from fastclip.optim import unwrap  # noqa: E402
from fastclip.progress import PEER_LOST, RunStopped  # noqa: E402
from training.builders import Run, build_run, resume_candidates, seed_everything  # noqa: E402
from training.params import parse_args  # noqa: E402

logger = logging.getLogger("fastclip")


def main(argv: Sequence[str] | None = None) -> dict:
    """Train and/or evaluate as the flags say; returns the last evaluation's metrics.

    Ends with SystemExit: a one-line "error: ..." for bad input, or the exit code of a run that
    stopped early on purpose (its log says why and how to continue).
    """
    args = parse_args(argv)
    env = init_distributed(args.device, args.dist_backend, args.dist_url, timeout_s=round(60 * args.dist_timeout))
    try:
        run = build_run(args, env)
        try:
            return train_and_evaluate(run)
        finally:
            run.close()
    except RunStopped as stop:
        logger.error("%s", stop)
        raise SystemExit(stop.code) from None
    except (files.CheckpointError, CheckpointWriteError, files.DiskFullError) as error:
        raise SystemExit(f"error: {error}") from None
    except RuntimeError as error:
        if not control.is_peer_failure(error):
            raise
        logger.error("lost contact with another rank (%s: %s): it hung or died. No rank waits longer than "
                     "--dist-timeout (%g min). Continue with --resume latest", type(error).__name__,
                     str(error).splitlines()[0][:300], args.dist_timeout)
        raise SystemExit(PEER_LOST) from None
    finally:
        close_distributed()


def train_and_evaluate(run: Run) -> dict:
    """Set-up is done: one restore, then the epoch loop with its checkpoints and evaluations."""
    args, env = run.args, run.env
    candidates, explicit = resume_candidates(args, run.run_dir)
    if run.trainer is None:  # evaluation only: the weights of the checkpoint, nothing else
        loaded = files.load_first_good(candidates, explicit)
        if loaded is not None:
            path, checkpoint = loaded
            unwrap(run.model).load_state_dict(files.model_state(checkpoint))
            logger.info("loaded model weights of %s (epoch %s)", path, checkpoint["epoch"])
        return run.evaluate(int(loaded[1]["epoch"]) if loaded else 0)
    progress = run.checkpointer.restore(candidates, explicit)
    if progress.epoch >= args.stop_epochs:
        logger.info("the checkpoint has already trained %d of %d epochs: evaluating only", progress.epoch,
                    args.stop_epochs)
        return run.evaluate(progress.epoch)
    metrics: dict = {}
    steps_per_epoch = len(run.data.train)
    for epoch in range(progress.epoch, args.stop_epochs):
        if progress.step_in_epoch == 0:  # a resumed epoch restored its RNG states and data position
            seed_everything(args.seed + env.rank + 7919 * epoch)
            run.data.train.set_epoch(epoch)
        if not run.trainer.train_epoch(run.data.train, progress, steps_per_epoch, steps_per_epoch * args.epochs,
                                       run.control):
            raise run.control.stop(progress)
        progress.finish_epoch()
        run.control.end_epoch(progress)
        metrics = run.evaluate(progress.epoch, final=progress.epoch == args.stop_epochs) or metrics
    return metrics


if __name__ == "__main__":
    main()
