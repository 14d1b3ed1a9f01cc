"""Learning-rate, temperature-learning-rate and inner-learning-rate (gamma) schedules.

Every schedule is a plain function of the global step (or epoch; step_thresh also of the temperature)
so that a resumed run recomputes exactly the value it would have had; none keeps state, so none is
checkpointed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def cosine_lr(base_lr: float, warmup_steps: int, total_steps: int, step: int) -> float:
    """Linear warmup to `base_lr`, then cosine decay to 0 at `total_steps` (open_clip's schedule)."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    decay_steps = max(total_steps - warmup_steps, 1)
    progress = min((step - warmup_steps) / decay_steps, 1.0)
    return 0.5 * (1.0 + math.cos(math.pi * progress)) * base_lr


def const_lr(base_lr: float, warmup_steps: int, total_steps: int, step: int) -> float:
    """Linear warmup, then constant."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    return base_lr


def const_cooldown_lr(
    base_lr: float, warmup_steps: int, total_steps: int, step: int, cooldown_steps: int, end_lr: float = 0.0,
    power: float = 1.0,
) -> float:
    """Linear warmup, constant, then a cooldown to `end_lr` over the last `cooldown_steps`: the distance to
    `end_lr` shrinks as (1 - t) ** `power` (linear at power 1), as open_clip's --lr-cooldown-power."""
    start_cooldown = total_steps - cooldown_steps
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if step < start_cooldown or cooldown_steps <= 0:
        return base_lr
    progress = min((step - start_cooldown) / cooldown_steps, 1.0)
    return end_lr + (base_lr - end_lr) * (1.0 - progress) ** power


@dataclass
class LrSchedule:
    """The model learning rate at a global step, by `--lr-scheduler` (cosine, const, const-cooldown), or
    'none' (`--skip-scheduler`): the base rate from the first step, no warmup, as open_clip_train."""

    kind: str
    base_lr: float
    warmup_steps: int
    total_steps: int
    cooldown_steps: int = 0
    end_lr: float = 0.0
    cooldown_power: float = 1.0

    def __call__(self, step: int) -> float:
        if self.kind == "none":
            return self.base_lr
        if self.kind == "cosine":
            return cosine_lr(self.base_lr, self.warmup_steps, self.total_steps, step)
        if self.kind == "const":
            return const_lr(self.base_lr, self.warmup_steps, self.total_steps, step)
        if self.kind == "const-cooldown":
            return const_cooldown_lr(
                self.base_lr, self.warmup_steps, self.total_steps, step, self.cooldown_steps, self.end_lr,
                self.cooldown_power,
            )
        raise ValueError(f"unknown lr scheduler {self.kind!r}: use cosine, const or const-cooldown")


@dataclass
class TauLrSchedule:
    """Learning rate of the global temperature (`--lr_tau_scheduler`).

    const: constant, no warmup. step_thresh: constant, multiplied by `factor` (1/3) at every step whose
    temperature is <= `threshold` (0.03): it returns to the base rate when tau rises above 0.03 again,
    as in the reference. cosine: like the model learning rate (warmup, cosine decay).
    """

    kind: str
    base_lr: float
    warmup_steps: int
    total_steps: int
    threshold: float = 0.03
    factor: float = 1.0 / 3.0

    @property
    def reads_temperature(self) -> bool:
        """Only step_thresh looks at tau."""
        return self.kind == "step_thresh"

    def __call__(self, step: int, tau: torch.Tensor | None = None) -> float | torch.Tensor:
        """The rate at `step`. step_thresh's is decided on tau's device, from the temperature `tau` before the
        step, and returned there as a float64 scalar tensor: reading tau on the host would make every step
        wait for the GPU. tau is compared in float64, as a Python float would be, whatever its own type."""
        if self.kind == "const":
            return self.base_lr
        if self.kind == "step_thresh":
            tau = tau.detach().double()
            lowered = torch.full_like(tau, self.base_lr * self.factor)
            return torch.where(tau <= self.threshold, lowered, self.base_lr)
        if self.kind == "cosine":
            return cosine_lr(self.base_lr, self.warmup_steps, self.total_steps, step)
        raise ValueError(f"unknown lr_tau scheduler {self.kind!r}: use const, step_thresh or cosine")


def gamma_at_epoch(epoch: int, gamma_min: float, kind: str, decay_epochs: int) -> float:
    """Inner learning rate of the moving averages u at `epoch` (0-based).

    Epoch 0 uses 1.0 (u is set to the mini-batch estimate on the first pass); from `decay_epochs` on
    it is `gamma_min`; in between `cosine` decays from 1 to gamma_min and `constant` is gamma_min.
    """
    if epoch == 0:
        return 1.0
    if epoch >= decay_epochs:
        return gamma_min
    if kind == "cosine":
        return gamma_min + (1.0 - gamma_min) * 0.5 * (1.0 + math.cos(math.pi * epoch / decay_epochs))
    if kind == "constant":
        return gamma_min
    raise ValueError(f"unknown gamma schedule {kind!r}: use cosine or constant")
