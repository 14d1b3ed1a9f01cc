"""The SigLIP baseline: open_clip's SigLipLoss behind the engine's objective interface."""

from __future__ import annotations

import math

import torch
from open_clip.loss import SigLipLoss  # not re-exported at the package's top level

from ..model_options import SIGLIP_LOGIT_BIAS, SIGLIP_TEMPERATURE

# open_clip_train's `--siglip` model: tau 0.1 rather than CLIP's 0.07, and a learned logit bias starting
# at -10, so that the n^2 - n negative pairs' sigmoid terms start near 0 instead of dominating the loss.
SIGLIP_MODEL_KWARGS: dict[str, float] = {"init_logit_scale": math.log(1 / SIGLIP_TEMPERATURE),
                                         "init_logit_bias": SIGLIP_LOGIT_BIAS}


class SigLIPObjective:
    """Pairwise sigmoid loss over the global batch: `--siglip`.

    On K ranks each rank scores its images against every rank's texts, which open_clip passes from
    neighbour to neighbour (`dist_impl`, its default "bidir"), and divides by the local batch size b.
    The ranks' losses then sum to K times the loss of the global batch, so DDP's gradient average is
    that loss's gradient.
    """

    learns_model_temperature = True
    per_sample = None
    per_sample_columns: list[str] = []

    def __init__(self, rank: int, world_size: int, dist_impl: str | None = None) -> None:
        self.loss = SigLipLoss(rank=rank, world_size=world_size, dist_impl=dist_impl)
        self.logit_bias: torch.Tensor | None = None  # the last step's, for the log

    def __call__(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor,
        index: torch.Tensor,
        logit_bias: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        if logit_bias is None:
            # without a bias the loss still runs but the negatives swamp it: a wiring mistake, not a choice
            raise ValueError("SigLIP needs a model with a logit_bias: build it with SIGLIP_MODEL_KWARGS")
        self.logit_bias = logit_bias.detach()
        return {"contrastive_loss": self.loss(image_features, text_features, logit_scale, logit_bias)}

    def on_epoch_start(self, epoch: int) -> None:
        pass

    def log_values(self) -> dict[str, float]:
        return {} if self.logit_bias is None else {"logit_bias": float(self.logit_bias)}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
