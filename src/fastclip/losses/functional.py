"""The FastCLIP math on tensors: no collectives, no stored state, no hidden precision changes.

Every function works on a leading "side" dimension when given one (image anchors and text anchors are
computed together) and runs in float32, or float64 when its inputs are float64, even under autocast:
the exponentials below leave no room for bf16/fp16 rounding.

Per anchor i, with candidates j (the other members of the global batch) and temperature tau_i:
    d_ij = (<anchor_i, candidate_j> - p_i) / tau_i
and a running bound c_i (never decreasing) so that exp(d_ij - c_i') <= 1 never overflows; the moving
average u_i is stored on the scale of its bound (u_true = u * exp(c)).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

BAD_U_BELOW = 1e-35
TAU_MIN, TAU_MAX = 0.01, 1.0
TEMPERATURE_GRAD_CLAMP = 5.0


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


def running_bound(bound: torch.Tensor, differences: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """c' = max(c, max_{j in mask} d_ij), detached: it only rescales, it is not differentiated."""
    row_max = differences.detach().masked_fill(~mask, float("-inf")).amax(dim=-1)
    return torch.maximum(bound.to(row_max.dtype), row_max)


def bounded_exp(differences: torch.Tensor, bound: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """exp(d_ij - c_i) on the mask, 0 elsewhere (the masked-out entries get no gradient either)."""
    shifted = differences - bound.unsqueeze(-1)
    return torch.exp(shifted.masked_fill(~mask, float("-inf")))


def estimator(exp_terms: torch.Tensor, batch_size: int) -> torch.Tensor:
    """g_i = 1/(m-1) * sum_{j != i} exp(d_ij - c_i'), summing the candidates present in `exp_terms`."""
    return exp_terms.sum(dim=-1) / (batch_size - 1)


def update_moving_average(
    u: torch.Tensor, g: torch.Tensor, bound: torch.Tensor, new_bound: torch.Tensor, gamma: float
) -> torch.Tensor:
    """u' = (1 - gamma) * u * exp(c - c') + gamma * g, detached.

    A stored u below 1e-35, inf or nan (a first visit included, u = 0) is replaced by g.
    """
    u, g = u.to(g.dtype), g.detach()
    bad = (u < BAD_U_BELOW) | ~torch.isfinite(u)
    moved = (1.0 - gamma) * u * torch.exp(bound.to(g.dtype) - new_bound) + gamma * g
    return torch.where(bad, g, moved)


def compositional_ratio(estimate: torch.Tensor, u: torch.Tensor, eps: float) -> torch.Tensor:
    """g / (eps + u) with g and u on the same bound: equal to the unscaled ratio up to eps."""
    return estimate / (eps + u)


def log_moving_average(u: torch.Tensor, bound: torch.Tensor, eps: float) -> torch.Tensor:
    """log of the unscaled u: log(eps + u) + c, finite however small u got."""
    return torch.log(eps + u) + bound


def temperature_gradient(
    differences: torch.Tensor,
    exp_terms: torch.Tensor,
    u: torch.Tensor,
    bound: torch.Tensor,
    rho: float,
    eps: float,
    batch_size: int,
) -> torch.Tensor:
    """Per-anchor dF/dtau_i of tau_i * log(g_i) + rho * tau_i, estimated with the updated u.

    G = -1/(m-1) * sum_j exp(d_ij - c') * d_ij / (u + eps) + log(u + eps) + c' + rho, clamped to
    [-5, 5]. `exp_terms` is 0 off the mask, so masked entries of `differences` drop out.
    """
    weighted = estimator(exp_terms.detach() * differences.detach(), batch_size)
    grad = -weighted / (u + eps) + log_moving_average(u, bound, eps) + rho
    return grad.clamp(-TEMPERATURE_GRAD_CLAMP, TEMPERATURE_GRAD_CLAMP)


def temperature_adam_step(
    tau: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    epoch: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One Adam step per temperature; returns (tau', m', v').

    The bias correction counts epochs, not updates (1 - beta^(epoch+1)): the reference's behaviour,
    under which its lr_tau was tuned. The result is clamped to [0.01, 1].
    """
    exp_avg = beta1 * exp_avg + (1.0 - beta1) * grad
    exp_avg_sq = beta2 * exp_avg_sq + (1.0 - beta2) * grad.square()
    m_hat = exp_avg / (1.0 - beta1 ** (epoch + 1))
    v_hat = exp_avg_sq / (1.0 - beta2 ** (epoch + 1))
    tau = (tau - lr * m_hat / (v_hat.sqrt() + eps)).clamp(TAU_MIN, TAU_MAX)
    return tau, exp_avg, exp_avg_sq
