"""Where a run stands, and why it may end early (with the process exit codes a job script can test)."""

from __future__ import annotations

import math
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


def batches_per_epoch(num_samples: int, batch_size: int, world_size: int) -> int:
    """Batches every rank yields per epoch: ceil(num_samples / global batch), as open_clip counts."""
    return math.ceil(num_samples / (batch_size * world_size))


def optimizer_steps(batches: int, accum_freq: int) -> int:
    """Optimizer steps in an epoch of `batches` batches: one per `accum_freq` of them (a rest is dropped)."""
    return batches // accum_freq


@dataclass(frozen=True)
class StepPlan:
    """A run's optimizer steps: per epoch (under --accum-freq) and over the `epochs` its schedules span.
    Everything that counts steps (schedules, the loop, checkpoints, the summary, plots) asks this."""

    steps_per_epoch: int
    epochs: int

    @classmethod
    def of_epoch(cls, batches: int, accum_freq: int, epochs: int) -> StepPlan:
        """The plan of an epoch of `batches` batches per rank."""
        return cls(optimizer_steps(batches, accum_freq), epochs)

    @classmethod
    def of_samples(cls, num_samples: int, batch_size: int, world_size: int, accum_freq: int = 1,
                   epochs: int = 1) -> StepPlan:
        """The plan of `num_samples` samples per epoch over `world_size` ranks (--train-num-samples)."""
        return cls.of_epoch(batches_per_epoch(num_samples, batch_size, world_size), accum_freq, epochs)

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.epochs


class RunStopped(Exception):
    """The run ends early on purpose; `code` is the exit code, the message says why and what next."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
