"""Checkpoint files: written atomically, verified when read, found again with `latest`.

A checkpoint is `checkpoints/<stem>.pt`, one dict of state_dicts whose "state_dict" entry is the
bare model's, so `open_clip.load_checkpoint(model, path)` (weights_only) loads it as it loads
open_clip_train's; per-sample state, when the objective has some, sits beside it in the folder
`<stem>.per_sample.<token>/` that the .pt names (written first, so a .pt never names a missing
folder). Everything in the .pt is plain tensors and Python values: weights_only loading works.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import socket
from pathlib import Path
from typing import BinaryIO, Callable, Iterable

import torch

logger = logging.getLogger("fastclip")
EPOCH_FILE = re.compile(r"^epoch_(\d+)\.pt$")
LATEST_STEM = "epoch_latest"  # the most recent checkpoint (mid-epoch, or --save-most-recent)
LATEST = f"{LATEST_STEM}.pt"
PER_SAMPLE_DIR = re.compile(r"^(?P<stem>.+)\.per_sample\.(?P<token>[0-9a-z-]+)$")
TMP_MARK = ".tmp-"
REQUIRED_KEYS = ("epoch", "step", "state_dict")
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and the problem."""


class DiskFullError(RuntimeError):
    """No space (or quota) left while writing a checkpoint; the previous checkpoint is intact."""


def unique_tmp(path: Path) -> Path:
    """A temporary name beside `path`, unique per host and process: concurrent writers never share one."""
    return path.with_name(f"{path.name}{TMP_MARK}{socket.gethostname()}-{os.getpid()}")


def fsync_directory(directory: Path) -> None:
    """Make a new or renamed entry of `directory` durable, not only the file's bytes."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """`write(file)` into a unique temporary file, fsync, rename: a crash or a full disk never leaves half
    a file under `path`, and the file `path` held before stays intact until the new one is complete."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = unique_tmp(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        tmp.unlink(missing_ok=True)
        full = disk_full_cause(error)
        if full is not None:
            raise DiskFullError(disk_full_message(path, full)) from error
        raise
    fsync_directory(path.parent)


def save_atomic(payload: dict, path: Path) -> None:
    """torch.save `payload` to `path` with `write_atomic`."""
    write_atomic(path, lambda f: torch.save(payload, f))


def disk_full_cause(error: BaseException | None) -> OSError | None:
    """The "no space" error behind `error`, if any (torch.save re-raises it as a RuntimeError of its zip
    writer, with the OSError as the context)."""
    while error is not None:
        if isinstance(error, OSError) and error.errno in DISK_FULL_ERRNOS:
            return error
        error = error.__cause__ or error.__context__
    return None


def disk_full_message(path: Path, error: OSError) -> str:
    return (
        f"no space left on the device while writing {path} ({os.strerror(error.errno)}): free space in "
        f"{path.parent} or point --logs elsewhere; the previous checkpoint is intact, resume from it with "
        "--resume latest"
    )


def peek(path: Path) -> dict:
    """The checkpoint's small entries (epoch, step, ...) without reading its tensors (mmap)."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # torch raises EOFError, RuntimeError, UnpicklingError, ... for bad files
        raise CheckpointError(f"{path}: unreadable ({_reason(error)})") from error
    _check_keys(path, checkpoint)
    return checkpoint


def load(path: Path | str) -> dict:
    """Read a checkpoint on the CPU with weights_only=True (no pickled code runs) and verify it: the
    required entries are there and every model weight is finite."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise CheckpointError(f"{path}: unreadable ({_reason(error)})") from error
    _check_keys(path, checkpoint)
    bad = non_finite_tensors(checkpoint["state_dict"])
    if bad:
        raise CheckpointError(f"{path}: {len(bad)} model tensors hold NaN or inf values (e.g. {bad[0]})")
    return checkpoint


def non_finite_tensors(state_dict: dict) -> list[str]:
    """Names of the floating-point tensors holding NaN or inf (one host read per tensor: save/load only)."""
    return [name for name, value in state_dict.items()
            if torch.is_tensor(value) and value.is_floating_point() and not bool(torch.isfinite(value).all())]


def load_first_good(candidates: list[Path], explicit: bool, read: Callable[[Path], dict] | None = None,
                    agree: Callable[[str | None], str | None] | None = None) -> tuple[Path, dict] | None:
    """The first candidate that `read` (default: `load`) loads; with `explicit` (a path the user named) a
    bad one is an error, otherwise it is skipped with a warning naming it.

    `agree` joins the ranks' outcomes (e.g. `control.first_error`), so that every rank takes the same
    file, or raises the same error, even when one rank cannot read what the others can.
    """
    problems = []
    for path in candidates:
        try:
            checkpoint, error = (read or load)(path), None
        except CheckpointError as err:
            checkpoint, error = None, str(err)
        if agree is not None:
            error = agree(error)
        if error is None:
            return path, checkpoint
        if explicit:
            raise CheckpointError(error)
        logger.warning("--resume latest: skipping a bad checkpoint: %s", error)
        problems.append(error)
    if problems:
        raise CheckpointError(f"no usable checkpoint in {candidates[0].parent}: " + "; ".join(problems))
    return None


def _reason(error: Exception) -> str:
    text = str(error).strip().splitlines()
    first = text[0] if text else ""
    if isinstance(error, EOFError) or "failed finding central directory" in first:
        return "empty or truncated file"
    if "Weights only load failed" in first or type(error).__name__ == "UnpicklingError":
        return "not a torch checkpoint, or written by code that is not plain tensors and values"
    return f"{type(error).__name__}: {first[:200]}"


def _check_keys(path: Path, checkpoint: object) -> None:
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{path}: not a training checkpoint (a {type(checkpoint).__name__}, not a dict)")
    missing = [key for key in REQUIRED_KEYS if key not in checkpoint]
    if missing:
        raise CheckpointError(f"{path}: not a training checkpoint (no {', '.join(repr(k) for k in missing)} entry)")


def model_state(checkpoint: dict) -> dict:
    """The model weights, without the 'module.' prefix DDP-saved files from elsewhere may carry."""
    state = checkpoint["state_dict"]
    if next(iter(state), "").startswith("module."):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def checkpoint_files(checkpoint_dir: Path) -> list[Path]:
    """`epoch_N.pt` and `epoch_latest.pt` files in the folder (no temporary files)."""
    if not checkpoint_dir.is_dir():
        return []
    return [p for p in checkpoint_dir.iterdir() if p.is_file() and (EPOCH_FILE.match(p.name) or p.name == LATEST)]


def newest_first(checkpoint_dir: Path) -> tuple[list[Path], list[str]]:
    """Checkpoints ordered by training progress (global step, then modification time), newest first,
    and one line per file that could not even be opened."""
    ranked, problems = [], []
    for path in checkpoint_files(checkpoint_dir):
        try:
            step = int(peek(path)["step"])
        except CheckpointError as error:
            problems.append(str(error))
            continue
        ranked.append((step, path.stat().st_mtime, path))
    return [path for *_, path in sorted(ranked, key=lambda r: (r[0], r[1]), reverse=True)], problems


def per_sample_dir(path: Path, checkpoint: dict) -> Path | None:
    """The per-sample state folder a checkpoint names, or None when its objective has none."""
    name = checkpoint.get("per_sample_dir")
    return None if name is None else path.parent / name


def remove_checkpoint(path: Path) -> None:
    """Delete a checkpoint and every per-sample folder of its stem."""
    path.unlink(missing_ok=True)
    for folder in state_dirs(path.parent, path.stem):
        shutil.rmtree(folder, ignore_errors=True)


def state_dirs(checkpoint_dir: Path, stem: str) -> Iterable[Path]:
    for folder in checkpoint_dir.glob(f"{stem}.per_sample.*"):
        match = PER_SAMPLE_DIR.match(folder.name)
        if match and match["stem"] == stem and folder.is_dir():
            yield folder


def remove_superseded_state(path: Path, keep: Path | None) -> None:
    """Delete the per-sample folders of `path`'s stem other than `keep` (earlier versions of it)."""
    for folder in state_dirs(path.parent, path.stem):
        if folder != keep:
            shutil.rmtree(folder, ignore_errors=True)


def prune_previous(checkpoint_dir: Path, keep: Path) -> None:
    """Delete numbered checkpoints other than `keep` (--delete-previous-checkpoint); called once `keep`
    is complete."""
    for path in checkpoint_dir.iterdir():
        if EPOCH_FILE.match(path.name) and path != keep:
            remove_checkpoint(path)


def remove_leftovers(checkpoint_dir: Path) -> list[Path]:
    """Temporary files and unreferenced per-sample folders of interrupted saves (called by the run that
    holds the folder's lock, so no other writer is active); returns what it removed.

    A folder is unreferenced when no checkpoint names it and no checkpoint that could name it (its stem's
    `.pt`) failed to read: a read error may be passing (a network file system, a copy still arriving), and
    the folder then stays until a later good save of that stem supersedes it."""
    if not checkpoint_dir.is_dir():
        return []
    removed = [p for p in checkpoint_dir.iterdir() if TMP_MARK in p.name]
    referenced, unread_stems = set(), set()
    for path in checkpoint_files(checkpoint_dir):
        try:
            referenced.add(peek(path).get("per_sample_dir"))
        except CheckpointError:
            unread_stems.add(path.stem)
    removed += [p for p in checkpoint_dir.iterdir()
                if (match := PER_SAMPLE_DIR.match(p.name)) and p.is_dir() and p.name not in referenced
                and match["stem"] not in unread_stems]
    for path in removed:
        remove_path(path)
    return removed


def remove_path(path: Path) -> None:
    """Delete a file or a folder, if it is there."""
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
