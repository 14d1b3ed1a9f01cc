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


class Tokenizes(IterableDataset):
    """Yields its tokenizer's tokens of a few captions, from inside a worker."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    def __iter__(self):
        yield self.tokenizer(CAPTIONS)


CAPTIONS = ["a photo of the letter A", "LATIN SMALL LETTER SHARP S", "ünïcödé and 数字 7"]


def test_the_bpe_tokenizer_reaches_workers_as_its_recipe_and_tokenizes_the_same() -> None:
    import pickle

    from multiprocessing.reduction import ForkingPickler

    from fastclip.models import PortableTokenizer, TokenizerRecipe, portable_tokenizer

    tokenizer = portable_tokenizer(TokenizerRecipe("ViT-Tiny-32px"))
    assert isinstance(tokenizer, PortableTokenizer)
    assert len(bytes(ForkingPickler.dumps(tokenizer))) < 1_000  # the tables themselves are about 2 MB
    assert len(pickle.dumps(tokenizer.tokenizer)) > 1_000_000
    assert tokenizer.context_length == 32  # attributes are the wrapped tokenizer's
    [in_worker] = DataLoader(Tokenizes(tokenizer), batch_size=None, timeout=60, **worker_arguments(1))
    assert torch.equal(in_worker, tokenizer(CAPTIONS))
    assert torch.equal(tokenizer(CAPTIONS, context_length=8), tokenizer.tokenizer(CAPTIONS, 8))
