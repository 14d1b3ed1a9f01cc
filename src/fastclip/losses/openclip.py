"""The OpenCLIP baseline: open_clip's ClipLoss behind the engine's objective interface."""

from __future__ import annotations

import open_clip
import torch

from ..distributed import comm


class OpenCLIPObjective:
    """Mini-batch contrastive loss over the gathered batch (`--local-loss --gather-with-grad`).

    `learn_temperature=False` keeps the model's logit scale where it was initialised (`--temperature_scheme
    global_constant`): the baseline that differs from FastCLIP-v1 in u alone."""

    per_sample = None
    per_sample_columns: list[str] = []

    def __init__(self, local_loss: bool, gather_with_grad: bool, rank: int, world_size: int,
                 learn_temperature: bool = True) -> None:
        self.learns_model_temperature = learn_temperature
        self.loss = open_clip.ClipLoss(
            local_loss=local_loss,
            gather_with_grad=gather_with_grad,
            cache_labels=True,
            rank=rank,
            world_size=world_size,
        )
        self.world_size = world_size
        self.gather_with_grad = gather_with_grad

    def __call__(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor,
        index: torch.Tensor,
        logit_bias: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        if self.world_size > 1:
            self._count_traffic(image_features, text_features)
        return {"contrastive_loss": self.loss(image_features, text_features, logit_scale)}

    def _count_traffic(self, image_features: torch.Tensor, text_features: torch.Tensor) -> None:
        """ClipLoss gathers with torch.distributed itself; record the bytes its collectives move."""
        features = image_features.numel() * image_features.element_size() * 2
        comm.COUNTER["all_gather"] += features
        comm.COUNTER["all_gather:calls"] += 2
        if self.gather_with_grad:  # backward of the autograd all_gather: one reduction per feature set
            comm.COUNTER["all_reduce"] += features * self.world_size
            comm.COUNTER["all_reduce:calls"] += 2

    def on_epoch_start(self, epoch: int) -> None:
        pass

    def log_values(self) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
