"""DataLoader workers start from a forkserver: a lock another thread of the training process holds at
the moment the workers start cannot reach them (a forked worker would wait on its copy forever)."""

from __future__ import annotations

import threading

import torch
from torch.utils.data import DataLoader, IterableDataset

from fastclip.data.workers import worker_arguments

HELD_BY_ANOTHER_THREAD = threading.Lock()


class NeedsTheLock(IterableDataset):
    """Yields its worker's id once the module's lock is free, as a library call that takes a lock would."""

    def __iter__(self):
        with HELD_BY_ANOTHER_THREAD:
            yield torch.utils.data.get_worker_info().id


def test_workers_do_not_inherit_a_lock_held_by_another_thread() -> None:
    taken, release = threading.Event(), threading.Event()

    def hold() -> None:
        with HELD_BY_ANOTHER_THREAD:
            taken.set()
            release.wait()

    holder = threading.Thread(target=hold)
    holder.start()
    taken.wait()
    try:
        # the holder still has the lock when the workers start; a forked worker would time out here
        loader = DataLoader(NeedsTheLock(), batch_size=None, timeout=60, **worker_arguments(2))
        batches = iter(loader)
        release.set()
        assert sorted(int(b) for b in batches) == [0, 1]
    finally:
        release.set()
        holder.join()


def test_no_context_without_workers() -> None:
    """torch refuses a start method for in-process loading (workers=0)."""
    assert "multiprocessing_context" not in worker_arguments(0)
    DataLoader(NeedsTheLock(), batch_size=None, **worker_arguments(0))


class FrozenObjects(IterableDataset):
    """Yields how many objects its worker inherited frozen (out of the collector's reach), and whether its
    collector runs."""

    def __iter__(self):
        import gc

        yield gc.get_freeze_count(), gc.isenabled()


def test_workers_inherit_the_forkservers_imports_frozen() -> None:
    """A worker's first full collection would otherwise walk (and copy on write) torch's and open_clip's
    millions of objects, shared with the forkserver: ~0.25 s of every worker's start. The server imported
    them with its collector paused; a worker's runs again."""
    [(frozen, collecting)] = DataLoader(FrozenObjects(), batch_size=None, timeout=60, **worker_arguments(1))
    assert frozen > 100_000
    assert collecting
