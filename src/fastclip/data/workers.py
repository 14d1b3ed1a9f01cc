"""How DataLoader worker processes start: from a forkserver, never as forks of the training process.

The training process runs threads (torch's intra-op pool, gloo or NCCL, the DataLoader's queue feeders
and pin-memory thread, tqdm's monitor). A fork copies every lock one of them holds at that instant, and
the child then waits on it forever. CPython before 3.12 does this in `PyOS_AfterFork_Child` whenever
another thread is starting or ending (python/cpython#112275): a rank's evaluation loader hung that way
after 24 epochs, and every rank of the run waited on it. A forkserver is started once by fork + exec, has
no other thread and has torch and the data modules imported already; each worker is a fork of it, so a
worker starts in about the time a fork takes. The dataset is pickled to the worker: tensors in shared
memory (the CSV table's columns) travel as file descriptors, not as copies.
"""

from __future__ import annotations

import multiprocessing
from multiprocessing.context import BaseContext

PRELOADED = ["torch", "torchvision", "open_clip", "fastclip.data.loader", "fastclip.evaluate"]


def worker_context(workers: int) -> BaseContext | None:
    """The `multiprocessing_context` of a DataLoader with `workers` worker processes (None without any)."""
    if workers == 0:
        return None
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOADED)  # read when the server starts: the first loader's workers
    return context
