"""Preemption signals: SIGTERM (slurm's preemption and time limit), SIGUSR1 (`--signal=USR1@120`) and
SIGINT (Ctrl-C) ask the run to stop after the current step with a checkpoint.

The handler only records the request; the training loop turns it into an agreement between ranks,
a checkpoint and the exit code `PREEMPTED`. A second Ctrl-C stops at once, without a checkpoint.
"""

from __future__ import annotations

import signal
from types import FrameType
from typing import Callable

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class StopSignals:
    """Records the first stop signal; a context manager that restores the previous handlers."""

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict[int, Callable | int | None] = {}

    def __enter__(self) -> "StopSignals":
        for signum in STOP_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: the user wants out now
        self.received = self.received or signal.Signals(signum).name
