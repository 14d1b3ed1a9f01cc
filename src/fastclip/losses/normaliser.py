"""What a step divides each anchor's weights by: the paper's u, or u clamped to within a factor of the
step's own mini-batch estimate g (`--clamp_u_to_g C`, opt-in; not in the paper).

FastCLIP weighs candidate j of anchor i by exp(d_ij) / u_i, so a step's weights for i sum to g_i(B) / u_i
times the mini-batch softmax's (which always sum to one). Where g is spread over many negatives, a batch's
g is close to u and the ratio stays near 1: u only corrects the mini-batch's bias. Where a few hard
negatives carry g (a few thousand pairs visited tens of times), most batches miss them and a few hold one:
the ratio is well below 1 in most steps and very large in a few (measured: geometric mean 0.5, mean 1.5
to 6), and the gradient's variance grows with it. Clamping log(u + eps) into [log g - log C, log g + log C]
keeps every step's ratio within [1/C, C]: u as it is wherever it agrees with the batch within a factor C,
the mini-batch normalisation as C -> 1, the paper's estimator as C -> infinity. u itself, its update, and
v3's tau term (which estimates log g with u) are unchanged.
"""

from __future__ import annotations

import math

import torch


class PaperNormaliser:
    """shift_i = log(u_i + eps), as the paper and the reference."""

    def local(self, shift: torch.Tensor, log_g: torch.Tensor) -> torch.Tensor:
        """The local anchors' shift, (2, b)."""
        return shift

    def shared(self, log_g: torch.Tensor) -> list[torch.Tensor]:
        """What the gathered anchors' shift needs besides their u, as (b, ...) tensors to all-gather."""
        return []

    def gathered(self, shift: torch.Tensor, shared: list[torch.Tensor]) -> torch.Tensor:
        """The gathered anchors' shift, (2, m), from their u's and the gathered `shared` tensors."""
        return shift


class ClampedToBatch(PaperNormaliser):
    """shift_i = log(u_i + eps) clamped into [log g_i - log C, log g_i + log C] (C >= 1)."""

    def __init__(self, factor: float):
        if not factor >= 1:
            raise ValueError(f"--clamp_u_to_g must be at least 1, got {factor}")
        self.log_factor = math.log(factor)

    def local(self, shift: torch.Tensor, log_g: torch.Tensor) -> torch.Tensor:
        return torch.clamp(shift, log_g - self.log_factor, log_g + self.log_factor)

    def shared(self, log_g: torch.Tensor) -> list[torch.Tensor]:
        return [log_g.detach().t()]

    def gathered(self, shift: torch.Tensor, shared: list[torch.Tensor]) -> torch.Tensor:
        return self.local(shift, shared[0].t())


def build_normaliser(clamp_u_to_g: float | None) -> PaperNormaliser:
    return PaperNormaliser() if clamp_u_to_g is None else ClampedToBatch(clamp_u_to_g)
