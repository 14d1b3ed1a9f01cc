"""Checkpoints: written atomically, found again with `latest`, loadable by open_clip.

A checkpoint is one dict of state_dicts. Its "state_dict" entry is the bare model's, so
`open_clip.load_checkpoint(model, path)` (weights_only) loads it as it loads open_clip_train's.
Everything else in it (optimizer, scaler, objective with its per-sample state, schedules, epoch,
step, resolved config) is plain tensors and Python values, so weights_only loading works throughout.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

_EPOCH_FILE = re.compile(r"epoch_(\d+)\.pt$")


def save_atomic(payload: dict, path: Path) -> None:
    """Write to a temporary file in the same folder, then rename: a crash never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def find_latest(checkpoint_dir: Path) -> Path | None:
    """The checkpoint of the highest epoch in `checkpoint_dir` (epoch_latest.pt wins when it is newer)."""
    if not checkpoint_dir.is_dir():
        return None
    numbered = [(int(m.group(1)), p) for p in checkpoint_dir.iterdir() if (m := _EPOCH_FILE.search(p.name))]
    best = max(numbered)[1] if numbered else None
    latest = checkpoint_dir / "epoch_latest.pt"
    if latest.exists() and (best is None or latest.stat().st_mtime >= best.stat().st_mtime):
        return latest
    return best


def load(path: Path | str) -> dict:
    """Read a checkpoint on the CPU with weights_only=True (no pickled code runs)."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ValueError(f"{path} is not a training checkpoint (no 'state_dict' entry)")
    return checkpoint


def model_state(checkpoint: dict) -> dict:
    """The model weights, without the 'module.' prefix DDP-saved files from elsewhere may carry."""
    state = checkpoint["state_dict"]
    if next(iter(state), "").startswith("module."):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def prune_previous(checkpoint_dir: Path, keep: Path) -> None:
    """Delete numbered checkpoints other than `keep` (--delete-previous-checkpoint)."""
    for path in checkpoint_dir.iterdir():
        if _EPOCH_FILE.search(path.name) and path != keep:
            path.unlink()
