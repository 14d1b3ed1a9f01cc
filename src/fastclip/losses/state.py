"""Per-sample state sharded over ranks: pair i lives on rank i % K at slot i // K.

Each rank keeps ceil(n / K) rows instead of the reference's full copy of n rows. A step reads the
values of its local batch with one reduce-scatter and writes the whole batch's new values after one
all-gather (the objective's), each owner keeping the rows it owns. Nothing here synchronises the host
with the device, so the step stays asynchronous on GPUs.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from ..distributed import comm


def _last_occurrence(index: torch.Tensor) -> torch.Tensor:
    """True at the last position of each distinct value: a sample drawn twice is written once."""
    sorted_index, order = torch.sort(index, stable=True)
    last_sorted = torch.ones_like(sorted_index, dtype=torch.bool)
    last_sorted[:-1] = sorted_index[1:] != sorted_index[:-1]
    last = torch.empty_like(last_sorted)
    last[order] = last_sorted
    return last


class ShardedState:
    """A (data_size x C) table of per-sample floats, sharded by owner rank i % K and slot i // K.

    Create it after the process group: K and the rank are read once, at construction. `initial`
    holds the starting value of each column (e.g. 0 for u, --temperature for per-sample taus).
    """

    def __init__(
        self,
        data_size: int,
        initial: Sequence[float],
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if data_size <= 0:
            raise ValueError(f"data_size must be positive, got {data_size}")
        self.data_size = data_size
        self.world_size = comm.world_size()
        self.rank = comm.rank()
        self.rows = math.ceil(data_size / self.world_size)
        self._initial = torch.tensor(list(initial), dtype=dtype, device=device)
        # One extra row at the end takes the writes of rows this rank does not own, so that a store
        # is a single index_copy_ with no data-dependent (host-synchronising) selection.
        self._storage = self._initial.repeat(self.rows + 1, 1)

    @property
    def columns(self) -> int:
        return self._initial.numel()

    @property
    def table(self) -> torch.Tensor:
        """This rank's shard: (ceil(data_size / K), C); row s holds sample s * K + rank."""
        return self._storage[: self.rows]

    def _owned_slots(self, gathered_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        index = gathered_index.to(self._storage.device)
        return index % self.world_size == self.rank, index // self.world_size

    def fetch(self, gathered_index: torch.Tensor) -> torch.Tensor:
        """Values of this rank's local batch, (m / K, C), from the gathered batch's indices (m,).

        Every rank fills the gathered rows it owns (zeros elsewhere); one reduce-scatter (sum) then
        hands rank k the rows of positions [k*b, (k+1)*b). Collective: every rank calls it.
        """
        owned, slot = self._owned_slots(gathered_index)
        values = torch.where(owned[:, None], self.table.index_select(0, slot), 0.0)
        return comm.reduce_scatter_sum(values)

    def store(self, gathered_index: torch.Tensor, gathered_values: torch.Tensor) -> None:
        """Write the rows this rank owns out of the gathered batch's new values (m, C).

        A sample present several times keeps the values of its last position in the batch, on any K.
        A batch holding any NaN or inf value is not stored at all (its step is skipped too; decided on
        the device, with no host synchronisation).
        """
        owned, slot = self._owned_slots(gathered_index)
        finite = torch.isfinite(gathered_values).all()
        keep = owned & _last_occurrence(gathered_index.to(owned.device)) & finite
        target = torch.where(keep, slot, self.rows)
        self._storage.index_copy_(0, target, gathered_values.to(self._storage.dtype))
