"""The interface between the training engine and a loss: the engine knows nothing else of it."""

from __future__ import annotations

from typing import Protocol

import torch

from .state import ShardedState


class Objective(Protocol):
    """A contrastive objective over one training step's local batch.

    `__call__` returns named loss terms whose sum is differentiated; every term is a scalar tensor.
    `logit_scale` is the model's output (exp of its parameter, i.e. 1 / tau), `index` the samples'
    dataset indices (int64, local batch), `logit_bias` the model's learnable bias where it has one
    (SigLIP), else None. Collectives run inside `__call__` and `state_dict` only, and
    every rank calls them in the same order.
    """

    learns_model_temperature: bool
    per_sample: ShardedState | None  # per-sample state, checkpointed shard by shard; None when stateless
    per_sample_columns: list[str]  # names of its columns, checked when a checkpoint is restored

    def __call__(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor,
        index: torch.Tensor,
        logit_bias: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]: ...

    def on_epoch_start(self, epoch: int) -> None: ...

    def log_values(self) -> dict[str, float]:
        """Scalars worth a log line (gamma, mean temperature, ...)."""
        ...

    def state_dict(self) -> dict:
        """Small values only: the per-sample state is saved shard by shard by the checkpointer."""
        ...

    def load_state_dict(self, state: dict) -> None: ...
