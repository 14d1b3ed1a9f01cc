"""The whole per-sample table in sample order, for tests that compare against a dense reference.

Gathers every shard onto every rank (O(n) per rank): a test tool only; training never does this.
"""

from __future__ import annotations

import torch

from fastclip.distributed import comm
from fastclip.losses.state import ShardedState


def dense_table(state: ShardedState) -> torch.Tensor:
    """(data_size, C) on the CPU, row i = sample i (collective)."""
    shards = comm.all_gather_no_grad(state.table)
    by_slot = shards.view(state.world_size, state.rows, state.columns).transpose(0, 1)
    return by_slot.reshape(-1, state.columns)[: state.data_size].to("cpu", copy=True)


def load_dense(state: ShardedState, values: torch.Tensor) -> None:
    """Give this rank its rows (i % K == rank) of a dense (data_size, C) table."""
    assert tuple(values.shape) == (state.data_size, state.columns)
    mine = values[state.rank :: state.world_size]
    state.table[: mine.shape[0]] = mine.to(state.table)
