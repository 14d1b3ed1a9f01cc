"""FastCLIP's per-sample table in a user's own checkpoint: each rank's shard as a plain dict of tensors
and values (torch.save / torch.load with weights_only), read back on any number of ranks.

A shard holds rank k's rows as the training uses them (row s is pair s * K + k), so saving copies no
more than the rank's own n / K rows and involves no collective. Loading on K' ranks reads, out of the
K old shards, only those holding rows of this rank (the strides of checkpoint/sharded.py, where the
training script's per-rank files are read the same way).
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

from ..checkpoint import sharded
from ..losses.state import ShardedState

FORMAT = 1
_KEYS = ("format", "data_size", "columns", "rank", "world_size", "rows")


def shard_state(state: ShardedState, columns: list[str]) -> dict:
    """This rank's shard of the table, on the CPU: the `per_sample` entry of a loss's state_dict()."""
    return {"format": FORMAT, "data_size": state.data_size, "columns": list(columns), "rank": state.rank,
            "world_size": state.world_size, "rows": state.table.detach().to("cpu", copy=True)}


def _check(shard: Mapping, state: ShardedState, columns: list[str]) -> None:
    missing = [key for key in _KEYS if key not in shard]
    if missing:
        raise ValueError(f"not a FastCLIP per-sample state (no {', '.join(missing)})")
    if shard["format"] != FORMAT:
        raise ValueError(f"per-sample state format {shard['format']!r}; this version reads {FORMAT}")
    if shard["data_size"] != state.data_size:
        raise ValueError(f"the state was saved with data_size {shard['data_size']}, this loss has data_size "
                         f"{state.data_size}: build the loss with the data size that saved it (the index range "
                         "of the pairs)")
    if list(shard["columns"]) != list(columns):
        raise ValueError(f"the state holds the per-sample columns {list(shard['columns'])}, this loss "
                         f"{list(columns)}: it was saved by another FastCLIP version")
    rows = math.ceil(state.data_size / shard["world_size"])
    if tuple(shard["rows"].shape) != (rows, len(columns)):
        raise ValueError(f"the shard of rank {shard['rank']} holds a {tuple(shard['rows'].shape)} table where "
                         f"{shard['world_size']} ranks keep ({rows}, {len(columns)}) each: it is damaged")


def load_shard_states(state: ShardedState, columns: list[str], shards: Sequence[Mapping]) -> None:
    """Fill this rank's rows from the shards of a table saved by any number of ranks.

    `shards` must hold every old shard this rank needs: its own when the number of ranks is unchanged,
    the single shard of a one-process save, otherwise those of old ranks k = rank mod gcd(K, K_old) (the
    simplest: all of them). Everything is checked before any row changes.
    """
    for shard in shards:
        _check(shard, state, columns)
    worlds = {shard["world_size"] for shard in shards}
    if len(worlds) != 1:
        raise ValueError(f"the shards come from saves on different numbers of ranks ({sorted(worlds)})")
    old_world = worlds.pop()
    given = {shard["rank"]: shard for shard in shards}
    needed = sharded.needed_shards(state, old_world)
    missing = sorted(set(needed) - set(given))
    if missing:
        raise ValueError(f"rank {state.rank} of {state.world_size} needs the per-sample shards of ranks {missing} of "
                         f"the {old_world} that saved this state: pass a list of every rank's state_dict() "
                         "(torch.load(path, mmap=True) reads only the rows used)")
    for rank, stride in needed.items():
        sharded.copy_shard_rows(state, given[rank]["rows"], stride)
