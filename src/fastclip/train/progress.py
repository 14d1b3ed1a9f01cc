"""Where a run stands, and why it may end early (with the process exit codes a job script can test)."""

from __future__ import annotations

from dataclasses import dataclass

# Exit codes besides 0 (done) and 1 (an error, with a one-line message):
PREEMPTED = 75  # a stop signal arrived; a checkpoint was written: resubmit with --resume latest
PEER_LOST = 76  # another rank hung or died (--dist-timeout); resume with --resume latest
NON_FINITE = 77  # --max-bad-steps consecutive non-finite steps; the last good checkpoint is kept


@dataclass
class Progress:
    """`epoch` epochs are complete, `step_in_epoch` batches of the next one, `global_step` in all."""

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0

    def step(self) -> None:
        self.step_in_epoch += 1
        self.global_step += 1

    def finish_epoch(self) -> None:
        self.epoch += 1
        self.step_in_epoch = 0


class RunStopped(Exception):
    """The run ends early on purpose; `code` is the exit code, the message says why and what next."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
