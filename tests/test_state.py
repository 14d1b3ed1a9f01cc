"""ShardedState on 1, 2 and 3 real gloo processes: owner layout, fetch/store, resharding checkpoints."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from dense_state import dense_table, load_dense
from multiprocess import spawn

from fastclip.distributed import comm
from fastclip.losses.state import ShardedState, _last_occurrence

N = 11  # divisible by neither 2 nor 3: the last shards are ragged
INITIAL = (0.0, 0.07, -1.0)
LOCAL_BATCH = 4
ROUNDS = 6




def exercise(source: torch.Tensor | None, seed: int, out: Path | None = None) -> torch.Tensor:
    """Load `source` (or start fresh), check it, run random fetch/store rounds against a dense table.

    Runs the same on every rank (same seed); returns the final global table, saved by rank 0 to `out`.
    """
    world, rank = comm.world_size(), comm.rank()
    state = ShardedState(N, INITIAL)
    assert state.table.shape == (math.ceil(N / world), len(INITIAL))
    expected = torch.tensor(INITIAL).repeat(N, 1)
    if source is not None:
        load_dense(state, source)
        expected = source.clone()
    assert torch.equal(dense_table(state), expected)

    gen = torch.Generator().manual_seed(seed)
    mine = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
    for _ in range(ROUNDS):
        index = torch.randint(0, N, (world * LOCAL_BATCH,), generator=gen)
        index[-1] = index[0]  # at least one sample twice in the batch
        values = torch.randn(world * LOCAL_BATCH, len(INITIAL), generator=gen)
        assert torch.equal(state.fetch(index), expected[index[mine]])
        state.store(index, values)
        for position, i in enumerate(index.tolist()):  # the last position of a repeated sample wins
            expected[i] = values[position]
        assert torch.equal(state.fetch(index), expected[index[mine]])

    owned = torch.arange(rank, N, world)  # pair i on rank i % K, slot i // K
    assert torch.equal(state.table[: len(owned)], expected[owned])
    final = dense_table(state)
    assert torch.equal(final, expected)
    if out is not None and rank == 0:
        torch.save(final, out)
    return final


def test_round_trip_single_process_without_group():
    exercise(None, seed=0)


def test_round_trips_and_resharding_1_to_2_2_to_1_2_to_3(tmp_path):
    """One chain of runs, each loading the previous one's checkpoint; every run also does round trips."""
    start = torch.randn(N, len(INITIAL), generator=torch.Generator().manual_seed(1))
    on_one = exercise(start, seed=2)
    spawn(2, exercise, on_one, 3, tmp_path / "two.pt")  # 1 -> 2
    on_two = torch.load(tmp_path / "two.pt")
    exercise(on_two, seed=4)  # 2 -> 1
    spawn(3, exercise, on_two, 5, tmp_path / "three.pt")  # 2 -> 3
    assert not torch.equal(torch.load(tmp_path / "three.pt"), on_two)


def test_last_occurrence_marks_the_last_position_of_each_sample():
    """What makes a repeated sample's write deterministic where index_copy_ is not (CUDA)."""
    index = torch.tensor([4, 1, 4, 9, 1, 4])
    assert _last_occurrence(index).tolist() == [False, False, False, True, True, True]
