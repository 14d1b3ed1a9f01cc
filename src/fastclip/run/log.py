"""Log lines, metric files and optional tensorboard / wandb reporting."""

from __future__ import annotations

import importlib
import json
import logging
import secrets
import sys
from pathlib import Path

LOGGER_NAME = "fastclip"


def setup_logging(log_file: Path | None, rank: int, level: int = logging.INFO, local_rank: int = 0,
                  log_local: bool = False) -> logging.Logger:
    """Rank 0 logs INFO to stdout and the run's out.log; other ranks log warnings only. With `log_local`
    (--log-local) the first rank of every node logs too, to out-RANK.log beside out.log."""
    logger = logging.getLogger(LOGGER_NAME)
    logger.handlers.clear()
    logger.propagate = False
    logs = rank == 0 or (log_local and local_rank == 0)
    logger.setLevel(level if logs else logging.WARNING)
    formatter = logging.Formatter(f"%(asctime)s | rank {rank} | %(levelname)s | %(message)s", "%Y-%m-%d,%H:%M:%S")
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stdout)]
    if log_file is not None and logs:
        if rank != 0:
            log_file = log_file.with_name(f"{log_file.stem}-{rank}{log_file.suffix}")
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file))
    for handler in handlers:
        handler.setFormatter(formatter)
        logger.addHandler(handler)
    return logger


def format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


def append_jsonl(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def _require(module: str, package: str):
    """Import an optional reporting backend, or say which package to install."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise SystemExit(f"error: --report-to {package} needs the {package} package: pip install {package}") from err


# our metrics.jsonl names -> open_clip_train's tensorboard / wandb names (after the "train/" prefix)
OPEN_CLIP_NAMES = {"logit_scale": "scale", "samples_per_second_per_rank": "samples_per_second_per_gpu"}


def board_tag(key: str) -> str:
    """The tensorboard / wandb tag of a training metric: open_clip_train's `train/<name>`, so dashboards
    and scripts made for open_clip runs read ours."""
    return "train/" + OPEN_CLIP_NAMES.get(key, key)


WANDB_ID_FILE = "wandb_id.txt"


def wandb_run_id(run_dir: Path, resume: bool) -> str:
    """The wandb run id kept in the run folder (--remote-sync copies it and fetches it back with the
    checkpoints): a resumed run continues the recorded one; a new run records a new one (of the lower-case
    letters and digits wandb's own ids use)."""
    path = run_dir / WANDB_ID_FILE
    recorded = path.read_text().strip() if resume and path.is_file() else ""
    if recorded:
        return recorded
    run_id = secrets.token_hex(8)
    path.write_text(run_id + "\n")
    return run_id


class MetricsSink:
    """Writes training metrics to metrics.jsonl (plain names), and to tensorboard / wandb when asked and
    installed (open_clip's `train/...` tags)."""

    def __init__(self, run_dir: Path, report_to: list[str], config: dict, enabled: bool,
                 wandb_project: str = "open-clip", wandb_notes: str = "", resume: bool = False) -> None:
        self.path = run_dir / "metrics.jsonl"
        self.enabled = enabled
        self.tensorboard = None
        self.wandb = None
        if not enabled:
            return
        unknown = set(report_to) - {"tensorboard", "wandb"}
        if unknown:
            raise ValueError(f"--report-to {','.join(sorted(unknown))}: use tensorboard and/or wandb")
        if "tensorboard" in report_to:
            SummaryWriter = _require("torch.utils.tensorboard", "tensorboard").SummaryWriter
            self.tensorboard = SummaryWriter(str(run_dir / "tensorboard"))
        if "wandb" in report_to:
            self.wandb = _require("wandb", "wandb")
            # one wandb run per run folder: a requeued job or --resume latest continues it (resume="allow")
            self.wandb.init(project=wandb_project, notes=wandb_notes, name=run_dir.name, config=config,
                            dir=str(run_dir), id=wandb_run_id(run_dir, resume),
                            resume="allow")

    def write(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        append_jsonl(self.path, {"step": step, **values})
        tagged = {board_tag(key): value for key, value in values.items() if isinstance(value, (int, float))}
        if self.tensorboard is not None:
            for tag, value in tagged.items():
                self.tensorboard.add_scalar(tag, value, step)
        if self.wandb is not None:
            self.wandb.log(tagged, step=step)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()
