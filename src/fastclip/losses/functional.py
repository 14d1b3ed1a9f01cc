"""The FastCLIP math on tensors: no collectives, no stored state, no hidden precision changes.

Every function works on a leading "side" dimension when given one (image anchors and text anchors are
computed together) and runs in float32, or float64 when its inputs are float64, even under autocast:
the exponentials below leave no room for bf16/fp16 rounding.

Per anchor i, with candidates j (the other members of the global batch) and temperature tau_i:
    d_ij = (<anchor_i, candidate_j> - p_i) / tau_i
The objective weighs each candidate with exp(d_ij) / (u_i + eps). Both moving-average
representations (moving_average.py) express that weight as exp(d_ij - shift_i) with
shift_i = log(u_i + eps) on the anchor's scale, so no exponential of d alone is ever formed.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator

import torch


def compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    """float64 stays float64; anything else (bf16, fp16, fp32) is computed in float32."""
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


@contextlib.contextmanager
def full_precision(device: torch.device) -> Iterator[None]:
    """A region where autocast does not lower matmuls to bf16/fp16."""
    with torch.autocast(device_type=device.type, enabled=False):
        yield


def exclusion_mask(
    n_anchors: int, n_candidates: int, anchor_start: int, candidate_start: int, device: torch.device
) -> torch.Tensor:
    """True where anchor and candidate are different members of the global batch.

    Identity is the POSITION in the gathered batch (anchor_start + i vs candidate_start + j), not the
    sample index: a sample drawn twice in one batch is its own negative, as in a dense batch.
    """
    anchors = torch.arange(anchor_start, anchor_start + n_anchors, device=device)
    candidates = torch.arange(candidate_start, candidate_start + n_candidates, device=device)
    return anchors[:, None] != candidates[None, :]


def pairwise_differences(
    anchors: torch.Tensor, candidates: torch.Tensor, positive: torch.Tensor, tau: torch.Tensor
) -> torch.Tensor:
    """d[..., i, j] = (<anchors[..., i], candidates[..., j]> - positive[i]) / tau[..., i].

    anchors (..., a, dim), candidates (..., o, dim), positive broadcastable to (..., a), tau (..., a).
    """
    dtype = compute_dtype(anchors)
    with full_precision(anchors.device):
        similarity = torch.matmul(anchors.to(dtype), candidates.to(dtype).transpose(-1, -2))
        return (similarity - positive.to(dtype).unsqueeze(-1)) / tau.to(dtype).unsqueeze(-1)


def masked(differences: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """d with -inf off the mask: exp gives 0 there, and no gradient flows to the excluded entries."""
    return differences.masked_fill(~mask, float("-inf"))


def log_estimator(differences: torch.Tensor, mask: torch.Tensor, batch_size: int) -> torch.Tensor:
    """log g_i = log(1/(m-1) * sum_{j != i} exp(d_ij)), detached, by log-sum-exp (finite at any tau).

    log(m - 1) is a Python number: a tensor built from it would be a copy from the host in every step."""
    return torch.logsumexp(masked(differences.detach(), mask), dim=-1) - math.log(batch_size - 1)


def candidate_weights(differences: torch.Tensor, shift: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """exp(d_ij - shift_i) on the mask, 0 elsewhere: with shift_i = log(u_i + eps), the weight
    exp(d_ij) / (u_i + eps) of candidate j, differentiable through d only."""
    return torch.exp(masked(differences, mask) - shift.detach().unsqueeze(-1))


def weighted_sum(differences: torch.Tensor, shift: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sum_{j in mask} exp(d_ij) / (u_i + eps): the objective's term for anchor i."""
    return candidate_weights(differences, shift, mask).sum(dim=-1)


def temperature_gradient(
    differences: torch.Tensor, mask: torch.Tensor, shift: torch.Tensor, rho: float, batch_size: int,
    clamp: float,
) -> torch.Tensor:
    """Per-anchor dF/dtau_i of tau_i * log(g_i) + rho * tau_i (v2), estimated with the updated u:

        G = -1/(m-1) * sum_{j != i} exp(d_ij) * d_ij / (u_i + eps) + log(u_i + eps) + rho

    clamped to [-clamp, clamp]; shift_i = log(u_i + eps) carries u and eps on the anchor's scale.
    """
    d = differences.detach()
    weights = candidate_weights(d, shift, mask)
    grad = -(weights * d.masked_fill(~mask, 0.0)).sum(dim=-1) / (batch_size - 1) + shift + rho
    return grad.clamp(-clamp, clamp)
