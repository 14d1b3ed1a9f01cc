"""How DataLoader worker processes start, and how they end with the process that reads them.

Start: from a forkserver, never as forks of the training process. The training process runs threads
(torch's intra-op pool, gloo or NCCL, the DataLoader's queue feeders and pin-memory thread, tqdm's
monitor). A fork copies every lock one of them holds at that instant, and the child then waits on it
forever. CPython before 3.12 does this in `PyOS_AfterFork_Child` whenever another thread is starting or
ending (python/cpython#112275): a rank's evaluation loader hung that way after 24 epochs, and every rank
of the run waited on it. A forkserver is started once by fork + exec, has no other thread and has torch
and the data modules imported already; each worker is a fork of it, so a worker starts in about the time
a fork takes. The dataset is pickled to the worker: tensors in shared memory (the CSV table's columns)
travel as file descriptors, not as copies.

End: a worker's parent is the forkserver, not the rank, so torch's check that the worker's parent is
alive never sees the rank die, and the forkserver stays while any worker holds its keep-alive pipe. A
rank killed by SIGKILL (the OOM killer, slurm after a preemption's grace period, a node health check)
would leave all of them running for good. So each worker watches the rank that reads it and exits as
soon as it is gone; with the workers gone the forkserver and multiprocessing's resource tracker see
their pipes close and exit too. On Linux the watch is a pidfd (woken by the rank's exit, no polling);
elsewhere it polls the rank's pid every second.
"""

from __future__ import annotations

import multiprocessing
import os
import select
import threading
import time
from dataclasses import dataclass
from multiprocessing.context import BaseContext
from typing import Any, Callable

# imported by the forkserver before it forks any worker; the first pauses the garbage collector for the
# imports, the last one freezes them for the workers, resumes it and makes the server's own end quick
PRELOADED = ["fastclip.data.forkserver_start", "torch", "torchvision", "open_clip", "fastclip.data.loader",
             "fastclip.evaluate", "fastclip.data.forkserver_end"]
POLL_S = 1.0  # where no pidfd exists: how often a worker checks that its rank is alive


def worker_context(workers: int) -> BaseContext | None:
    """The `multiprocessing_context` of a DataLoader with `workers` worker processes (None without any)."""
    if workers == 0:
        return None
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOADED)  # read when the server starts: the first loader's workers
    return context


def start_forkserver() -> None:
    """Start the workers' forkserver now, from this (main) thread, so that its imports of torch and the
    data modules run while the caller builds its model, not when the first loader needs its workers."""
    worker_context(1)
    from multiprocessing import forkserver

    forkserver.ensure_running()


@dataclass(frozen=True)
class WorkerStart:
    """A DataLoader `worker_init_fn`: watch the rank that started this worker, then run `then`."""

    rank_pid: int
    then: Callable[[int], Any] | None = None

    def __call__(self, worker_id: int) -> None:
        threading.Thread(target=_exit_with, args=(self.rank_pid,), name="rank-watch", daemon=True).start()
        if self.then is not None:
            self.then(worker_id)


def worker_arguments(workers: int, worker_init_fn: Callable[[int], Any] | None = None) -> dict[str, Any]:
    """The DataLoader arguments of `workers` worker processes that start from the forkserver and end with
    this process (`worker_init_fn` runs in each after the watch has started)."""
    if workers == 0:
        return {"num_workers": 0, "worker_init_fn": worker_init_fn}
    return {"num_workers": workers, "multiprocessing_context": worker_context(workers),
            "worker_init_fn": WorkerStart(os.getpid(), worker_init_fn)}


def _exit_with(pid: int) -> None:
    """Block until process `pid` has ended, then end this process at once (its queues have no reader)."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        os._exit(1)
    except (AttributeError, OSError):  # not Linux (or a kernel before 5.3): poll
        while _alive(pid):
            time.sleep(POLL_S)
        os._exit(1)
    select.select([pidfd], [], [])
    os._exit(1)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
