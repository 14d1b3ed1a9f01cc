"""OpenCLIP-style training script for FastCLIP and OpenCLIP.

Runs as `python -u src/training/main.py ...` (one process, or one per task under `srun`) and as
`cd src && torchrun --nproc_per_node=N -m training.main ...`; tests call `main([...])`.
Exit codes: 0 done, 1 an error (one line says which), 75 stopped by a signal after saving a
checkpoint, 76 another rank hung or died, 77 too many non-finite steps (see fastclip.train.progress).
"""

from __future__ import annotations

import logging
import re
import sys
from pathlib import Path
from typing import Sequence

if __package__ in (None, ""):  # `python src/training/main.py`: make `training` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Only the flags at module level: torch, open_clip and the library load inside `main`, after parsing,
# so that `--help` and flag errors come back at once.
from fastclip.run import collector  # noqa: E402
from training.config import Config  # noqa: E402
from training.params import parse_args  # noqa: E402
from training.reimport import check_script_guard, stop_in_child_bootstrap  # noqa: E402

logger = logging.getLogger("fastclip")


def original_message(error: BaseException) -> str:
    """The message `error` was raised with, on one line, also when a DataLoader worker raised it.

    torch re-raises a worker's exception in the main process as the same type with the message
    "Caught <Type> in DataLoader worker process N.\nOriginal Traceback ...", whose last
    "<module>.<Type>: " line starts the original message (torch/_utils.py, ExceptionWrapper.reraise);
    chained causes come before it.
    """
    text = str(error)
    name = type(error).__name__
    if text.startswith(f"Caught {name} "):
        starts = [m.end() for m in re.finditer(rf"^(?:[\w.]+\.)?{re.escape(name)}: ", text, re.M)]
        if starts:
            text = text[starts[-1]:]
    return " ".join(line.strip() for line in text.strip().splitlines())


def main(argv: Sequence[str] | None = None) -> dict:
    """Train and/or evaluate as the flags say; returns the last evaluation's metrics.

    Ends with SystemExit: a one-line "error: ..." for bad input (a full traceback with --debug), or the
    exit code of a run that stopped early on purpose (its log says why and how to continue). A script
    that calls it must do so under `if __name__ == "__main__":` (training/reimport.py says why).
    """
    stop_in_child_bootstrap()
    config = Config.from_args(parse_args(argv))
    if config.data.workers:
        from fastclip.data.workers import start_forkserver

        start_forkserver()  # its imports run while this process imports and builds the model
    run = config.run
    from fastclip.checkpoint import files
    from fastclip.checkpoint.checkpointer import CheckpointWriteError
    from fastclip.data.samples import DataError
    from fastclip.distributed import control, init_distributed
    from fastclip.distributed.env import close_distributed
    from fastclip.train.progress import PEER_LOST, RunStopped
    from training.preflight import check_run

    try:
        config = check_run(config)  # before the process group: every rank stops on its own, none waits for another
        if __name__ != "__main__":  # called by another script (this one guards its call below)
            check_script_guard(config.data.workers)  # after the preflight's imports: the forkserver's ran alongside
        from training.builders import build_run  # open_clip and the rest of the library
        from training.loop import train_and_evaluate

        env = init_distributed(run.device, run.dist_backend, run.dist_url, timeout_s=round(60 * run.dist_timeout),
                               set_device_rank=not run.no_set_device_rank)
        built = build_run(config, env)
        collector.resume_frozen()  # the start is over: its objects frozen, the collector on for the steps
        try:
            logger.info("model %s, from %s", config.model.model, config.model.model_source)
            return train_and_evaluate(built)
        finally:
            built.close()
    except RunStopped as stop:
        logger.error("%s", stop)
        raise SystemExit(stop.code) from None
    except (files.CheckpointError, CheckpointWriteError, files.DiskFullError, DataError) as error:
        if run.debug:
            raise
        raise SystemExit(f"error: {original_message(error)}") from None
    except RuntimeError as error:
        if not control.is_peer_failure(error):
            raise
        logger.error("lost contact with another rank (%s: %s): it hung or died. No rank waits longer than "
                     "--dist-timeout (%g min). Continue with --resume latest", type(error).__name__,
                     str(error).splitlines()[0][:300], run.dist_timeout)
        raise SystemExit(PEER_LOST) from None
    finally:
        close_distributed()


def cli() -> None:
    """The `fastclip-train` console script: `main` on the command line, its metrics not returned as an exit code.
    The process is the command line's alone, so its start runs without the garbage collector
    (fastclip.run.collector: a fifth of the imports' time)."""
    collector.pause_while_starting()
    main()


if __name__ == "__main__":
    cli()
