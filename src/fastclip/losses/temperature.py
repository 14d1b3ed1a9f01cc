"""Temperature schemes of FastCLIP: where each anchor's tau comes from and how it learns.

A scheme names its per-sample fields (none for a global tau) and the moving-average representation it
is published with; `FastCLIPObjective` composes it without knowing which one it has. Adding a scheme is
adding a class here and a line in `fastclip.build_scheme`.
"""

from __future__ import annotations

from typing import Protocol

import torch

from . import functional as fn
from .moving_average import BoundedMovingAverage, Estimate, LogMovingAverage

TAU_MIN, TAU_MAX = 0.01, 1.0
TEMPERATURE_GRAD_CLAMP = 5.0


class TemperatureScheme(Protocol):
    fields: tuple[str, ...]  # per-sample fields of the scheme, one float per side each
    learns_model_temperature: bool  # does the model's logit_scale get a gradient
    moving_average: LogMovingAverage | BoundedMovingAverage

    def initial(self, temperature: float) -> dict[str, float]: ...

    def anchor_tau(self, old: dict[str, torch.Tensor], model_tau: torch.Tensor, b: int) -> torch.Tensor:
        """(2, b): the temperature of each local anchor in this step (with gradient where learnable)."""
        ...

    def step(
        self, old: dict[str, torch.Tensor], differences: torch.Tensor, mask: torch.Tensor, estimate: Estimate,
        batch_size: int, epoch: int,
    ) -> dict[str, torch.Tensor]:
        """New values of the scheme's per-sample fields for the local anchors."""
        ...

    def shared(self, tau: torch.Tensor) -> list[torch.Tensor]:
        """What term 2 needs of the local anchors' temperatures, (b, ...) tensors to all-gather."""
        ...

    def gathered_tau(self, shared: list[torch.Tensor], model_tau: torch.Tensor, m: int) -> torch.Tensor:
        """(2, m): the temperatures of the gathered anchors in term 2, from the gathered `shared`."""
        ...


class GlobalTemperature:
    """One tau for every anchor: the model's (learnable: v0, v3; constant at --temperature: v1)."""

    fields: tuple[str, ...] = ()

    def __init__(self, learnable: bool) -> None:
        self.learns_model_temperature = learnable
        self.moving_average = LogMovingAverage()

    def initial(self, temperature: float) -> dict[str, float]:
        return {}

    def _model_tau(self, model_tau: torch.Tensor) -> torch.Tensor:
        return model_tau if self.learns_model_temperature else model_tau.detach()

    def anchor_tau(self, old: dict[str, torch.Tensor], model_tau: torch.Tensor, b: int) -> torch.Tensor:
        return self._model_tau(model_tau).expand(2, b)

    def step(
        self, old: dict[str, torch.Tensor], differences: torch.Tensor, mask: torch.Tensor, estimate: Estimate,
        batch_size: int, epoch: int,
    ) -> dict[str, torch.Tensor]:
        return {}

    def shared(self, tau: torch.Tensor) -> list[torch.Tensor]:
        return []  # every rank has the model's tau

    def gathered_tau(self, shared: list[torch.Tensor], model_tau: torch.Tensor, m: int) -> torch.Tensor:
        return self._model_tau(model_tau).expand(2, m)


class IndividualTemperature:
    """v2: a tau per pair and side, stepped by its own Adam (moments m, v per sample) every visit.

    The bias correction counts epochs, not updates (1 - beta^(epoch+1)), and the betas are 0 during
    epoch 0: the reference's behaviour, under which its lr_tau was tuned.
    """

    fields = ("tau", "exp_avg", "exp_avg_sq")
    learns_model_temperature = False

    def __init__(self, lr: float, rho: float, beta1: float, beta2: float, eps: float) -> None:
        self.lr, self.rho, self.beta1, self.beta2, self.eps = lr, rho, beta1, beta2, eps
        self.moving_average = BoundedMovingAverage()

    def initial(self, temperature: float) -> dict[str, float]:
        return {"tau": temperature, "exp_avg": 0.0, "exp_avg_sq": 0.0}

    def anchor_tau(self, old: dict[str, torch.Tensor], model_tau: torch.Tensor, b: int) -> torch.Tensor:
        return old["tau"]

    def step(
        self, old: dict[str, torch.Tensor], differences: torch.Tensor, mask: torch.Tensor, estimate: Estimate,
        batch_size: int, epoch: int,
    ) -> dict[str, torch.Tensor]:
        grad = fn.temperature_gradient(differences, mask, estimate.shift, self.rho, batch_size, TEMPERATURE_GRAD_CLAMP)
        beta1, beta2 = (0.0, 0.0) if epoch == 0 else (self.beta1, self.beta2)
        exp_avg = beta1 * old["exp_avg"] + (1.0 - beta1) * grad
        exp_avg_sq = beta2 * old["exp_avg_sq"] + (1.0 - beta2) * grad.square()
        m_hat = exp_avg / (1.0 - beta1 ** (epoch + 1))
        v_hat = exp_avg_sq / (1.0 - beta2 ** (epoch + 1))
        tau = (old["tau"] - self.lr * m_hat / (v_hat.sqrt() + self.eps)).clamp(TAU_MIN, TAU_MAX)
        return {"tau": tau, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}

    def shared(self, tau: torch.Tensor) -> list[torch.Tensor]:
        return [tau.detach().T]  # each anchor's pre-update tau, as in term 1

    def gathered_tau(self, shared: list[torch.Tensor], model_tau: torch.Tensor, m: int) -> torch.Tensor:
        return shared[0].T


def tau_summary(taus: torch.Tensor) -> dict[str, float]:
    """Log values of a step's temperatures: the value of a global tau; for per-sample taus (v2) also
    min / median / max and the share at the TAU_MIN floor, which shows whether they have collapsed."""
    values = taus.detach().float().flatten()
    summary = {"tau": float(values.mean())}
    if values.numel() > 1:
        summary.update(tau_min=float(values.min()), tau_median=float(values.median()), tau_max=float(values.max()),
                       tau_at_floor=float((values <= TAU_MIN * (1 + 1e-6)).float().mean()))
    return summary
