"""The FastCLIP objective: v0..v3 are temperature schemes of one global contrastive loss.

One step on rank k of K (local batch b, global batch m = K*b), all in float32 (float64 for float64
features) whatever autocast says:
1. one all-gather of (image features, text features, sample index), without gradient;
2. one reduce-scatter reading the per-sample state of the local batch (`ShardedState.fetch`);
3. local anchors against the whole gathered batch: running bounds, estimators g, new u (and, for
   v2, the per-sample temperature step);
4. one all-gather of the batch's new per-sample values (plus the positives and, for v2, the
   pre-update temperatures that term 2 needs); each owner stores its rows;
5. term 1 (local anchors with gradient vs gathered candidates as constants) and term 2 (gathered
   anchors as constants vs local candidates with gradient): no collective runs in backward.

With DDP averaging over ranks, the gradient of L_k = (loss1_k + loss2_k) / 2 equals, for the
features, grad(Phi / 2) of the one-process surrogate Phi on the global batch. A global learnable
tau appears with gradient in both terms, so its gradient is dPhi/dtau (not half of it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from ..distributed import comm
from ..schedules import gamma_at_epoch
from ..state import ShardedState
from . import functional as fn

TEMPERATURE_SCHEMES = ("global_learnable", "global_constant", "individual_learnable")
GLOBAL_FIELDS = ("u", "bound")
INDIVIDUAL_FIELDS = ("u", "bound", "tau", "exp_avg", "exp_avg_sq")


@dataclass
class FastCLIPConfig:
    """Hyperparameters of the FastCLIP objective (defaults: the seed's FastCLIP-v3 command).

    `lr_tau`, `beta1`, `beta2` and `eps` drive v2's per-sample temperature step (lr_tau constant,
    the betas and eps those of the model's Adam); `multiply_tau` (v3) needs `global_learnable`.
    """

    data_size: int
    temperature_scheme: str = "global_learnable"
    gamma: float = 0.2
    gamma_schedule: str = "cosine"
    gamma_decay_epochs: int = 18
    temperature: float = 0.07
    rho: float = 6.5
    fastclip_eps: float = 1e-14
    multiply_tau: bool = False
    lr_tau: float = 2e-4
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8

    def __post_init__(self) -> None:
        if self.temperature_scheme not in TEMPERATURE_SCHEMES:
            raise ValueError(f"temperature_scheme {self.temperature_scheme!r}: use one of {TEMPERATURE_SCHEMES}")
        if self.multiply_tau and self.temperature_scheme != "global_learnable":
            raise ValueError("multiply_tau (FastCLIP-v3) needs temperature_scheme global_learnable")
        if self.data_size <= 0:
            raise ValueError(f"data_size must be positive, got {self.data_size}")


def _gather_batch(
    image: torch.Tensor, text: torch.Tensor, index: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """All-gather features and sample indices in one collective.

    The int64 indices travel bit for bit as 1 (float64) or 2 (float32) feature-typed columns: an
    index above 2^24 would not survive a float32 value conversion.
    """
    index_bits = index.to(device=image.device, dtype=torch.int64).reshape(-1, 1).contiguous().view(image.dtype)
    all_image, all_text, all_bits = comm.gather_to_all([image.detach(), text.detach(), index_bits])
    return all_image, all_text, all_bits.contiguous().view(torch.int64).reshape(-1)


def _split_fields(values: torch.Tensor, n_fields: int) -> torch.Tensor:
    """(b, 2F) state columns [f1_side1, f1_side2, f2_side1, ...] -> (F, 2, b)."""
    return values.reshape(values.shape[0], n_fields, 2).permute(1, 2, 0)


def _join_fields(fields: list[torch.Tensor]) -> torch.Tensor:
    """F tensors of shape (2, b) -> (b, 2F) state columns (inverse of `_split_fields`)."""
    stacked = torch.stack(fields)
    return stacked.permute(2, 0, 1).reshape(stacked.shape[2], -1)


class _LocalAnchors(NamedTuple):
    """Term 1 for the local batch, image and text sides stacked: shapes (2, b) or (2, b, m)."""

    loss: torch.Tensor
    diffs: torch.Tensor
    exp_terms: torch.Tensor
    u: torch.Tensor
    bound: torch.Tensor


def _term1(
    anchors: torch.Tensor,
    candidates: torch.Tensor,
    positive: torch.Tensor,
    tau: torch.Tensor,
    u: torch.Tensor,
    bound: torch.Tensor,
    start: int,
    gamma: float,
    eps: float,
) -> _LocalAnchors:
    """Local anchors (with gradient) against the whole gathered batch (constants): loss1_k, new u and bound.

    loss1_k = 1/b * sum_{i local} [g1_i / (eps + u1_i) + g2_i / (eps + u2_i)], u already updated.
    """
    b, m = anchors.shape[1], candidates.shape[1]
    mask = fn.exclusion_mask(b, m, start, 0, anchors.device)
    diffs = fn.pairwise_differences(anchors, candidates, positive, tau)
    new_bound = fn.running_bound(bound, diffs, mask)
    exp_terms = fn.bounded_exp(diffs, new_bound, mask)
    g = fn.estimator(exp_terms, m)
    new_u = fn.update_moving_average(u, g, bound, new_bound, gamma)
    loss = fn.compositional_ratio(g, new_u, eps).sum(dim=0).mean()
    return _LocalAnchors(loss, diffs, exp_terms, new_u, new_bound)


def _term2(
    anchors: torch.Tensor,
    candidates: torch.Tensor,
    positive: torch.Tensor,
    tau: torch.Tensor,
    u: torch.Tensor,
    bound: torch.Tensor,
    start: int,
    world: int,
    eps: float,
) -> torch.Tensor:
    """Gathered anchors (constants, with their gathered u, bound, positive, tau) against the local
    candidates (with gradient):
        loss2_k = K / (m (m-1)) * sum_{i in B} sum_{j local, j != i} exp(d_ij - c_i) / (eps + u_i)
    """
    m, b = anchors.shape[1], candidates.shape[1]
    mask = fn.exclusion_mask(m, b, 0, start, anchors.device)
    exp_terms = fn.bounded_exp(fn.pairwise_differences(anchors, candidates, positive, tau), bound, mask)
    ratio = fn.compositional_ratio(exp_terms.sum(dim=-1), u, eps)
    return ratio.sum(dim=0).mean() * world / (m - 1)


class FastCLIPObjective:
    """FastCLIP-v0..v3 behind the engine's `Objective` interface (see losses/base.py).

    Side 1 is the image anchor (candidates: texts), side 2 the text anchor (candidates: images); both
    run batched along a leading dimension of 2. Per-sample state columns: u1, u2, bound1, bound2 and
    for v2 also tau1, tau2, exp_avg1/2, exp_avg_sq1/2 (Adam moments m, v of the spec).

    Gradients in one process (K = 1): features get grad(Phi / 2), the global tau gets dPhi/dtau, as
    it enters both terms with gradient (v3 adds tau_bar and its penalty on top of that).
    """

    def __init__(self, config: FastCLIPConfig, device: torch.device | str, dtype: torch.dtype = torch.float32):
        self.config = config
        self.individual = config.temperature_scheme == "individual_learnable"
        self.learns_model_temperature = config.temperature_scheme == "global_learnable"
        self.fields = INDIVIDUAL_FIELDS if self.individual else GLOBAL_FIELDS
        self.columns = [f"{field}{side}" for field in self.fields for side in (1, 2)]
        initial = {"tau": config.temperature}
        self.state = ShardedState(
            config.data_size, [initial.get(field, 0.0) for field in self.fields for _ in (1, 2)], device, dtype
        )
        self._last_tau: torch.Tensor | None = None
        self.on_epoch_start(0)

    def on_epoch_start(self, epoch: int) -> None:
        self.epoch = epoch
        cfg = self.config
        self.gamma = gamma_at_epoch(epoch, cfg.gamma, cfg.gamma_schedule, cfg.gamma_decay_epochs)

    def __call__(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor,
        index: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        dtype = fn.compute_dtype(image_features)
        with fn.full_precision(image_features.device):
            return self._step(image_features.to(dtype), text_features.to(dtype), logit_scale.to(dtype), index)

    def _step(
        self, image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor, index: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        cfg, world = self.config, comm.world_size()
        all_image, all_text, all_index = _gather_batch(image, text, index)
        b, m = image.shape[0], all_image.shape[0]
        if m < 2:
            raise ValueError("FastCLIP needs a global batch of at least 2 pairs")
        start = comm.rank() * b
        old = _split_fields(self.state.fetch(all_index).to(image.dtype), len(self.fields))
        model_tau = logit_scale.reciprocal()
        if not self.learns_model_temperature:
            model_tau = model_tau.detach()
        tau = old[2] if self.individual else model_tau.expand(2, b)

        eps = cfg.fastclip_eps
        positive = (image * text).sum(dim=-1)
        local = _term1(
            torch.stack([image, text]), torch.stack([all_text, all_image]), positive, tau, old[0], old[1], start,
            self.gamma, eps,
        )
        new = [local.u, local.bound]
        if self.individual:
            new += self._temperature_step(old, local, m)
        extras = [positive.detach(), tau.detach().T] if self.individual else [positive.detach()]
        all_new, all_positive, *all_pre_update_tau = comm.gather_to_all([_join_fields(new), *extras])
        self.state.store(all_index, all_new)
        all_u, all_bound = _split_fields(all_new, len(self.fields))[:2]
        all_tau = all_pre_update_tau[0].T if self.individual else model_tau.expand(2, m)
        loss2 = _term2(
            torch.stack([all_image, all_text]), torch.stack([text, image]), all_positive, all_tau, all_u, all_bound,
            start, world, eps,
        )

        loss = (local.loss + loss2) / 2
        self._last_tau = (new[2] if self.individual else model_tau).detach().mean()
        if not cfg.multiply_tau:
            return {"fastclip_loss": loss}
        mean_log_u = fn.log_moving_average(local.u, local.bound, eps).sum(dim=0).mean() / 2
        return {"fastclip_loss": model_tau.detach() * loss, "tau_loss": model_tau * (cfg.rho + mean_log_u)}

    def _temperature_step(self, old: torch.Tensor, local: _LocalAnchors, batch_size: int) -> list[torch.Tensor]:
        """v2: new (tau, exp_avg, exp_avg_sq) of the local anchors; betas are 0 during epoch 0."""
        cfg = self.config
        grad = fn.temperature_gradient(
            local.diffs, local.exp_terms, local.u, local.bound, cfg.rho, cfg.fastclip_eps, batch_size
        )
        beta1, beta2 = (0.0, 0.0) if self.epoch == 0 else (cfg.beta1, cfg.beta2)
        tau, exp_avg, exp_avg_sq = fn.temperature_adam_step(
            old[2], grad, old[3], old[4], cfg.lr_tau, beta1, beta2, cfg.eps, self.epoch
        )
        return [tau, exp_avg, exp_avg_sq]

    def log_values(self) -> dict[str, float]:
        """gamma and the mean temperature of the last step (the model's tau, or the batch's v2 taus)."""
        tau = self.config.temperature if self._last_tau is None else self._last_tau.item()
        return {"gamma": self.gamma, "tau": tau}

    @property
    def per_sample(self) -> ShardedState:
        return self.state

    @property
    def per_sample_columns(self) -> list[str]:
        return list(self.columns)

    def state_dict(self) -> dict:
        """The column layout; the table itself is saved shard by shard (checkpoint/sharded.py)."""
        return {"columns": list(self.columns)}

    def load_state_dict(self, state: dict) -> None:
        if list(state["columns"]) != self.columns:
            raise ValueError(
                f"checkpoint per-sample columns {state['columns']} do not match {self.columns} "
                f"(temperature_scheme {self.config.temperature_scheme})"
            )
