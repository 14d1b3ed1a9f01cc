"""When to save and when to stop: the training loop's hook between steps and at epoch ends.

After every step each rank states its requests (a stop signal arrived, rank 0's clock says a timed
checkpoint is due, too many consecutive non-finite steps) and learns what all ranks requested one
step earlier (`StopAgreement`), so every rank saves and stops at the same step with no per-step GPU
synchronisation. Checkpoints by step count need no agreement: every rank counts the same steps.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from ..checkpoint import files
from ..checkpoint.checkpointer import Checkpointer
from ..distributed import comm
from ..distributed.control import Request, StopAgreement
from ..train.guard import NonFiniteGuard
from ..train.progress import NON_FINITE, PREEMPTED, Progress, RunStopped
from .signals import StopSignals

logger = logging.getLogger("fastclip")


@dataclass(frozen=True)
class SavePolicy:
    every_n_epochs: int = 1  # --save-frequency (0: no numbered checkpoints)
    final_epoch: int = 0  # --epochs: the last epoch is always saved when every_n_epochs > 0
    most_recent: bool = False  # --save-most-recent: epoch_latest.pt at every epoch end
    delete_previous: bool = False  # --delete-previous-checkpoint
    every_n_steps: int = 0  # --save-every-n-steps: epoch_latest.pt mid-epoch
    every_minutes: float = 0.0  # --save-every-minutes: epoch_latest.pt mid-epoch, by rank 0's clock


class RunControl:
    """The `StepHook` of a run, and its epoch-end checkpoints."""

    def __init__(self, checkpointer: Checkpointer, policy: SavePolicy, signals: StopSignals,
                 guard: NonFiniteGuard) -> None:
        self.checkpointer, self.policy, self.signals, self.guard = checkpointer, policy, signals, guard
        self.agreement = StopAgreement()
        self.agreed = Request.NONE
        self._last_save = time.monotonic()

    def _requests(self) -> Request:
        requests = Request.NONE
        if self.signals.received:
            requests |= Request.STOP_SIGNAL
        if self.guard.exceeded:
            requests |= Request.NON_FINITE
        minutes = self.policy.every_minutes
        if minutes and comm.rank() == 0 and time.monotonic() - self._last_save >= 60 * minutes:
            requests |= Request.SAVE
        return requests

    def after_step(self, progress: Progress) -> bool:
        self.agreed = self.agreement.poll(self._requests())
        if self.agreed & (Request.STOP_SIGNAL | Request.NON_FINITE):
            return True
        steps = self.policy.every_n_steps
        if self.agreed & Request.SAVE or (steps and progress.global_step % steps == 0):
            self.save_latest(progress)
        return False

    def save_latest(self, progress: Progress) -> Path:
        path = self.checkpointer.save(progress, files.LATEST_STEM)
        self._last_save = time.monotonic()
        return path

    def stop(self, progress: Progress) -> RunStopped:
        """The exception that ends a run the hook stopped, after its checkpoint (signals) or none
        (non-finite steps: the last good checkpoint stays the newest)."""
        self.agreement.drain()
        if self.agreed & Request.NON_FINITE:
            message = (f"stopped at epoch {progress.epoch}, step {progress.global_step}: "
                       f"{self.guard.max_bad_steps} consecutive steps had NaN or inf gradients and were skipped; "
                       "the weights are those of the last good step and no checkpoint was written. Lower --lr, "
                       "set --grad-clip-norm or check the data, then --resume latest (or --max-bad-steps)")
            return RunStopped(NON_FINITE, message)
        path = self.save_latest(progress)
        why = self.signals.received or "a stop signal on another rank"
        return RunStopped(PREEMPTED, f"stopped by {why} at epoch {progress.epoch}, step {progress.global_step}: "
                                     f"saved {path}; continue with --resume latest")

    def end_epoch(self, progress: Progress) -> Path | None:
        """Epoch-end checkpoints: epoch_N.pt when due, epoch_latest.pt with --save-most-recent; a
        mid-epoch epoch_latest.pt is removed once a newer checkpoint is complete. Returns the file that
        holds this epoch's weights now (epoch_N.pt first; a later save may replace epoch_latest.pt, and
        --delete-previous-checkpoint removes epoch_N.pt), None when none was written."""
        policy, epoch = self.policy, progress.epoch
        numbered = policy.every_n_epochs > 0 and (epoch % policy.every_n_epochs == 0 or epoch == policy.final_epoch)
        checkpoint_dir = self.checkpointer.dir
        path = None
        if numbered:
            path = self.checkpointer.save(progress, f"epoch_{epoch}")
            if comm.rank() == 0 and policy.delete_previous:
                files.prune_previous(checkpoint_dir, keep=path)
        if policy.most_recent:
            latest = self.save_latest(progress)
            path = path or latest
        elif numbered and comm.rank() == 0:
            files.remove_checkpoint(checkpoint_dir / files.LATEST)
        return path

    def close(self) -> None:
        self.agreement.drain()
