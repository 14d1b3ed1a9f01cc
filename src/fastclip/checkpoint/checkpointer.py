"""The run's stateful parts, saved and restored in one call each.

Saving is collective. Every rank writes its rows of the per-sample state to its own file in a fresh
`<stem>.per_sample.<token>/` folder (in parallel, in bounded chunks: no rank ever holds more than its
own shard), and sends rank 0 a few small values (its RNG states and its data position). Rank 0 then
writes the manifest and the `<stem>.pt` itself, atomically; the .pt names the folder, so the new
checkpoint exists exactly when its .pt does and the previous one stays intact until then.

The .pt holds the bare model under "state_dict", each registered part (`StatefulParts.states`) under
its own name, the progress, the ranks' small values under "ranks" and the recorded extras.

Restoring is collective too: each candidate (newest first for `latest`) is verified on every rank
(the .pt loads and holds finite weights; the rank's per-sample files match their manifest and
checksums) and used only when every rank could read its part; otherwise all ranks move on together.
"""

from __future__ import annotations

import logging
import random
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from ..distributed import comm, control
from ..losses.base import Objective
from ..train.optim import unwrap
from ..train.progress import Progress, StepPlan
from . import files, sharded

logger = logging.getLogger("fastclip")


# The .pt's own entries; no registered part or extra may take their names.
RESERVED = ("epoch", "step", "step_in_epoch", "steps_per_epoch", "world_size", "state_dict", "per_sample_dir",
            "ranks")


class Stateful(Protocol):
    """A registered part: its state as plain tensors and values (weights_only-loadable), and back."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


@dataclass
class StatefulParts:
    """Everything a run changes as it trains.

    `states` is the registry: each part's state_dict() is saved under its name and handed back to its
    load_state_dict() on resume, so that a new part (an EMA model, a data-mixing state) is one entry
    where the run is built. Parts hold state every rank shares: rank 0's is saved. The other fields are
    special: `model` is saved bare (unwrapped, finite) under "state_dict", where open_clip.load_checkpoint
    reads it; `objective`'s per-sample state is written sharded per rank beside the .pt (its small values
    are a registered part); `loader` (the training loader) holds a per-rank position, gathered to rank 0
    with the RNG states; `extra` (run name, resolved flags) is recorded, never restored. A checkpoint
    without a `required` part cannot be resumed (it is not one of this run's kind: a weights file, say);
    any other part it lacks starts afresh.
    """

    model: torch.nn.Module
    objective: Objective
    states: dict[str, Stateful]
    loader: Any = None
    extra: dict = field(default_factory=dict)
    required: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        taken = [name for name in self.states if name in RESERVED or name in self.extra]
        if taken:
            raise ValueError(f"stateful parts {taken} would overwrite other entries of the checkpoint")


def capture_rng() -> dict:
    """This process's random states (python, numpy, torch, CUDA) as weights_only-loadable values."""
    kind, keys, position, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.copy()), position, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: dict) -> None:
    random.setstate(state["python"])
    kind, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy(), position, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (a full disk, say); the previous one is intact."""


class Checkpointer:
    """Saves and restores `parts`; `steps_per_epoch` (this run's) is recorded, and a checkpoint written
    with another number of steps per epoch (other ranks, batch size or --accum-freq) is resumed at the
    same point of training measured in epochs (`rescale`)."""

    def __init__(self, checkpoint_dir: Path, parts: StatefulParts, steps_per_epoch: int | None = None) -> None:
        self.steps_per_epoch = steps_per_epoch
        self.dir = checkpoint_dir
        self.parts = parts

    # ------------------------------------------------------------------------------------- saving

    def save(self, progress: Progress, stem: str) -> Path:
        """Write `<stem>.pt` (+ per-sample folder) for `progress`; collective. Raises
        `CheckpointWriteError` on every rank when any rank failed."""
        path = self.dir / f"{stem}.pt"
        token = control.broadcast_from_master(f"{progress.global_step}-{secrets.token_hex(4)}")
        state_dir = self.dir / f"{stem}.per_sample.{token}" if self.parts.objective.per_sample is not None else None
        shard, error = None, None
        if state_dir is not None:
            try:
                shard = sharded.write_shard(self.parts.objective.per_sample, state_dir)
            except OSError as err:
                error = _write_error(state_dir, err)
        rank_state = {"rng": capture_rng(), "data": self._loader_position()}
        gathered = control.gather_to_master((shard, error, rank_state))
        if comm.rank() == 0:
            error = self._commit(path, progress, state_dir, gathered)
        error = control.broadcast_from_master(error)
        if error is not None:
            raise CheckpointWriteError(error)
        logger.info("saved %s (epoch %d, step %d)", path, progress.epoch, progress.global_step)
        return path

    def _commit(self, path: Path, progress: Progress, state_dir: Path | None, gathered: list) -> str | None:
        """Rank 0: the manifest, then the .pt; on any failure the new folder goes and the reason is returned."""
        error = next((e for _, e, _ in gathered if e is not None), None)
        if error is None:
            try:
                self._write_manifest(state_dir, [shard for shard, _, _ in gathered])
                files.save_atomic(self._payload(progress, state_dir, [rank for *_, rank in gathered]), path)
                files.remove_superseded_state(path, keep=state_dir)
                return None
            except OSError as err:
                error = _write_error(path, err)
            except (files.CheckpointError, files.DiskFullError) as err:
                error = str(err)
        if state_dir is not None:
            files.remove_path(state_dir)
        return error

    def _write_manifest(self, state_dir: Path | None, shards: list[dict]) -> None:
        if state_dir is None:
            return
        per_sample = self.parts.objective.per_sample
        sharded.write_manifest(state_dir, shards, per_sample.data_size, comm.world_size(),
                               self.parts.objective.per_sample_columns, per_sample.table.dtype)

    def _payload(self, progress: Progress, state_dir: Path | None, ranks: list[dict]) -> dict:
        parts = self.parts
        weights = unwrap(parts.model).state_dict()
        bad = files.non_finite_tensors(weights)
        if bad:
            raise files.CheckpointError(f"refusing to save: {len(bad)} model tensors hold NaN or inf (e.g. {bad[0]})")
        return {
            **parts.extra,
            "epoch": progress.epoch,
            "step": progress.global_step,
            "step_in_epoch": progress.step_in_epoch,
            "steps_per_epoch": self.steps_per_epoch,
            "world_size": comm.world_size(),
            "state_dict": weights,
            **{name: part.state_dict() for name, part in parts.states.items()},
            "per_sample_dir": None if state_dir is None else state_dir.name,
            "ranks": ranks,
        }

    def _loader_position(self) -> dict | None:
        return None if self.parts.loader is None else self.parts.loader.state_dict()

    # ----------------------------------------------------------------------------------- restoring

    def restore(self, candidates: list[Path], explicit: bool) -> tuple[Progress, Path | None]:
        """Load the first candidate every rank can read (collective): the progress it holds and its
        path; a fresh Progress and None when none is given.

        `explicit` (a --resume PATH): a bad file is an error. Otherwise (--resume latest) a bad file
        is skipped with a warning naming it, and the next newest is tried.
        """
        found = files.load_first_good(candidates, explicit, self._read, control.first_error)
        if found is None:
            return Progress(), None
        path, checkpoint = found
        return self._apply(path, checkpoint), path

    def _read(self, path: Path) -> dict:
        """This rank's part of a checkpoint, verified: the .pt, and its rows of the per-sample state."""
        checkpoint = files.load(path)
        if self.parts.objective.per_sample is not None:
            try:
                self._read_per_sample(path, checkpoint)
            except sharded.StateFileError as err:
                raise files.CheckpointError(str(err)) from err
        return checkpoint

    def _read_per_sample(self, path: Path, checkpoint: dict) -> None:
        per_sample = self.parts.objective.per_sample
        state_dir = files.per_sample_dir(path, checkpoint)
        if state_dir is not None:
            sharded.load_shard(per_sample, state_dir, self.parts.objective.per_sample_columns)
            return
        legacy = checkpoint.get("objective", {}).get("per_sample")  # a dense table inside the .pt
        if legacy is None or tuple(legacy.shape) != (per_sample.data_size, per_sample.columns):
            raise files.CheckpointError(f"{path} holds no per-sample state for this objective (was it written by "
                                        "an OpenCLIP run, or with another --data_size?)")
        mine = legacy[per_sample.rank :: per_sample.world_size]
        per_sample.table[: mine.shape[0]] = mine.to(per_sample.table)

    def _apply(self, path: Path, checkpoint: dict) -> Progress:
        unwrap(self.parts.model).load_state_dict(files.model_state(checkpoint))
        self._load_states(path, checkpoint)
        progress = Progress(int(checkpoint["epoch"]), int(checkpoint.get("step_in_epoch", 0)), int(checkpoint["step"]))
        saved = saved_steps_per_epoch(checkpoint)
        if self.steps_per_epoch is not None and saved is not None and saved != self.steps_per_epoch:
            progress = rescale(progress, saved, self.steps_per_epoch)
            logger.warning("%s was written with %d steps per epoch (%s ranks), this run has %d: it continues at "
                           "the same point of training, epoch %d + %d/%d steps (global step %d), and its schedules "
                           "span %d steps per epoch", path, saved, checkpoint.get("world_size", "?"),
                           self.steps_per_epoch, progress.epoch, progress.step_in_epoch, self.steps_per_epoch,
                           progress.global_step, self.steps_per_epoch)
        self._restore_rank_state(checkpoint, progress)
        logger.info("resumed from %s at epoch %d, step %d (%d into the epoch)", path, progress.epoch,
                    progress.global_step, progress.step_in_epoch)
        return progress

    def _load_states(self, path: Path, checkpoint: dict) -> None:
        """Each registered part from the entry of its name; a part the checkpoint predates (the guard of
        older checkpoints, a part added since) keeps its fresh state."""
        for name, part in self.parts.states.items():
            if name in checkpoint:
                part.load_state_dict(checkpoint[name])
            elif name in self.parts.required:
                raise files.CheckpointError(f"{path} holds no {name!r} state, so it cannot be resumed: to start "
                                            f"from its weights, pass --pretrained {path} instead of --resume")
            else:
                logger.warning("%s holds no %r state (written before that part was saved): it starts afresh",
                               path, name)

    def _restore_rank_state(self, checkpoint: dict, progress: Progress) -> None:
        """This rank's RNG states and data position, when the checkpoint was written by as many ranks."""
        if progress.step_in_epoch == 0:
            return  # an epoch boundary: the loop reseeds and starts the epoch's stream itself
        if self.parts.loader is not None:
            self.parts.loader.set_epoch(progress.epoch)
        ranks = checkpoint.get("ranks")
        if not ranks or len(ranks) != comm.world_size():
            logger.warning("the checkpoint was written by %s ranks and this run has %d: the rest of epoch %d "
                           "draws from a fresh shuffle and fresh random states", len(ranks or []),
                           comm.world_size(), progress.epoch)
            return
        mine = ranks[comm.rank()]
        restore_rng(mine["rng"])
        if self.parts.loader is not None and mine.get("data") is not None:
            try:
                self.parts.loader.load_state_dict(mine["data"])
            except ValueError as err:
                logger.warning("data position not restored (%s)", err)


def saved_steps_per_epoch(checkpoint: dict) -> int | None:
    """The steps per epoch of the run that wrote `checkpoint`: recorded, or (older checkpoints) implied by
    its global step after whole epochs, or by its flags; None when nothing tells."""
    if checkpoint.get("steps_per_epoch"):
        return int(checkpoint["steps_per_epoch"])
    epoch, step, in_epoch = int(checkpoint["epoch"]), int(checkpoint["step"]), int(checkpoint.get("step_in_epoch", 0))
    if epoch > 0:
        return (step - in_epoch) // epoch
    config, world_size = checkpoint.get("config", {}), checkpoint.get("world_size")
    if all(isinstance(config.get(k), int) for k in ("train_num_samples", "batch_size")) and world_size:
        return StepPlan.of_samples(config["train_num_samples"], config["batch_size"], int(world_size),
                                   config.get("accum_freq") or 1).steps_per_epoch
    return None


def rescale(progress: Progress, saved_steps_per_epoch: int, steps_per_epoch: int) -> Progress:
    """The same point of training on a run with `steps_per_epoch` steps per epoch.

    Progress is measured in epochs: `epoch` whole ones plus the fraction step_in_epoch / saved steps
    of the next. That fraction becomes round(fraction x steps_per_epoch) steps of the new epoch (a
    whole epoch when it rounds up to all of them), and the global step is epochs x steps_per_epoch
    plus those steps, so schedules over epochs x steps_per_epoch steps end where they would have.
    """
    in_epoch = round(progress.step_in_epoch * steps_per_epoch / saved_steps_per_epoch)
    epoch = progress.epoch + in_epoch // steps_per_epoch
    in_epoch %= steps_per_epoch
    return Progress(epoch, in_epoch, epoch * steps_per_epoch + in_epoch)


def _write_error(path: Path, error: OSError) -> str:
    full = files.disk_full_cause(error)
    return f"could not write {path}: {error}" if full is None else files.disk_full_message(path, full)
