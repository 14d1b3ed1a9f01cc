"""How a pair's moving average u of its contrastive denominator is stored and updated.

Both representations compute the reference's quantities exactly in exact arithmetic:
    g_i = 1/(m-1) * sum_{j != i} exp(d_ij)
    u_i <- (1 - gamma) * u_i + gamma * g_i     (a stored u below 1e-35, inf or nan is replaced by g)
and hand the objective shift_i = log(u_i + eps), so that the weight exp(d_ij) / (u_i + eps) is formed as
exp(d_ij - shift_i), which never overflows.

- `LogMovingAverage` (v0, v1, v3): one float per side, log u. The update is a log-sum-exp, finite at
  tau = 0.01 where exp(d) overflows float32, and eps enters as in the reference: log(u + eps).
- `BoundedMovingAverage` (v2): u scaled by a running bound c (two floats per side), as the reference
  keeps it for individual temperatures; its formula is g_scaled / (u_scaled + eps), i.e. eps * e^c on
  the true scale, and that is the reference's v2.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from . import functional as fn

BAD_U_BELOW = 1e-35
LOG_BAD_U_BELOW = math.log(BAD_U_BELOW)


class Estimate(NamedTuple):
    """The result of one update for the local anchors, both sides stacked: each tensor (2, b)."""

    fields: dict[str, torch.Tensor]  # new per-sample values, by field name
    shift: torch.Tensor  # log(u + eps) on the anchor's scale: weight of candidate j is exp(d_ij - shift_i)
    log_g: torch.Tensor  # log of the mini-batch estimate g_i on the true scale


def holds_visits(log_u: torch.Tensor) -> torch.Tensor:
    """Where a stored log u is a value to keep: finite and not below log(1e-35) (elsewhere u <- g)."""
    return torch.isfinite(log_u) & (log_u >= LOG_BAD_U_BELOW)


def lag_values(log_u_before: torch.Tensor, log_g: torch.Tensor) -> dict[str, float]:
    """How one step's mini-batch g compares with u (as it was before the step) over the anchors whose u
    holds earlier visits: `g_over_u`, the mean ratio (1 while u keeps pace, as E[g(B)] = g; below 1 when
    the model has lowered g since u averaged it), and `g_over_u_typical`, the geometric mean (the typical
    batch's weight scale, lower when most batches miss the few negatives that carry g). Nothing before any
    pair is revisited. Log ratios are clamped at +-80 so that a ratio stays finite."""
    seen = holds_visits(log_u_before)
    count = int(seen.sum())
    if count == 0:
        return {}
    log_ratio = (log_g - log_u_before)[seen].clamp(-80.0, 80.0)
    return {"g_over_u": float(log_ratio.exp().sum()) / count, "g_over_u_typical": math.exp(float(log_ratio.sum()) / count)}


def _log(x: float) -> float:
    """log of a non-negative constant, -inf at 0 (eps = 0, gamma = 0 or 1 - gamma = 0)."""
    return math.log(x) if x > 0 else -math.inf


class LogMovingAverage:
    """u kept as log u: the reference's u, stored overflow-free in one float per side."""

    fields = ("log_u",)
    initial = {"log_u": -math.inf}  # u = 0: the first visit is a bad value, replaced by g

    def update(
        self, old: dict[str, torch.Tensor], differences: torch.Tensor, mask: torch.Tensor, gamma: float,
        batch_size: int, eps: float,
    ) -> Estimate:
        log_g = fn.log_estimator(differences, mask, batch_size)
        log_u = old["log_u"].to(log_g.dtype)
        moved = torch.logaddexp(log_u + _log(1.0 - gamma), log_g + _log(gamma))
        new = {"log_u": torch.where(holds_visits(log_u), moved, log_g)}
        return Estimate(new, self.shift(new, eps), log_g)

    @staticmethod
    def shift(fields: dict[str, torch.Tensor], eps: float) -> torch.Tensor:
        """log(u + eps)."""
        return torch.logaddexp(fields["log_u"], torch.full_like(fields["log_u"], _log(eps)))

    @staticmethod
    def log_u(fields: dict[str, torch.Tensor]) -> torch.Tensor:
        """log of the true u (v3's tau term)."""
        return fields["log_u"]


class BoundedMovingAverage:
    """u scaled by a running bound c (never decreasing): u_true = u * e^c, exp(d_ij - c) <= 1."""

    fields = ("u", "bound")
    initial = {"u": 0.0, "bound": 0.0}

    def update(
        self, old: dict[str, torch.Tensor], differences: torch.Tensor, mask: torch.Tensor, gamma: float,
        batch_size: int, eps: float,
    ) -> Estimate:
        d = fn.masked(differences.detach(), mask)
        bound = old["bound"].to(d.dtype)
        new_bound = torch.maximum(bound, d.amax(dim=-1))
        g = torch.exp(d - new_bound.unsqueeze(-1)).sum(dim=-1) / (batch_size - 1)
        u = old["u"].to(d.dtype)
        bad = (u < BAD_U_BELOW) | ~torch.isfinite(u)
        moved = (1.0 - gamma) * u * torch.exp(bound - new_bound) + gamma * g
        new = {"u": torch.where(bad, g, moved), "bound": new_bound}
        return Estimate(new, self.shift(new, eps), torch.log(g) + new_bound)

    @staticmethod
    def shift(fields: dict[str, torch.Tensor], eps: float) -> torch.Tensor:
        """c + log(u_c + eps): the reference's g_c / (u_c + eps) written as exp(d - shift)."""
        return fields["bound"] + torch.log(fields["u"] + eps)

    @staticmethod
    def log_u(fields: dict[str, torch.Tensor]) -> torch.Tensor:
        """log of the true u: log u_c + c."""
        return torch.log(fields["u"]) + fields["bound"]
