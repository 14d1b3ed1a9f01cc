"""The FastCLIP objective: v0..v3 are temperature schemes of one global contrastive loss.

One step on rank k of K (local batch b, global batch m = K*b), all in float32 (float64 for float64
features) whatever autocast says:
1. one all-gather of (image features, text features, sample index), without gradient;
2. one reduce-scatter reading the per-sample state of the local batch (`ShardedState.fetch`);
3. local anchors against the whole gathered batch: estimators g, new u (moving_average.py) and the
   temperature scheme's per-sample step, if any (temperature.py);
4. one all-gather of the batch's new per-sample values plus what term 2 needs (the positives and,
   for v2, the pre-update temperatures); each owner stores its rows;
5. term 1 (local anchors with gradient vs gathered candidates as constants) and term 2 (gathered
   anchors as constants vs local candidates with gradient): no collective runs in backward.

With DDP averaging over ranks, the gradient of L_k = (loss1_k + loss2_k) / 2 equals, for the
features, grad(Phi / 2) of the one-process surrogate Phi on the global batch. A global learnable
tau appears with gradient in both terms, so its gradient is dPhi/dtau (not half of it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..distributed import comm
from ..rules import check_multiply_tau
from ..train.schedules import gamma_at_epoch
from .moving_average import lag_values
from .normaliser import build_normaliser
from .state import ShardedState
from . import functional as fn
from .temperature import GlobalTemperature, IndividualTemperature, TemperatureScheme, tau_summary

TEMPERATURE_SCHEMES = ("global_learnable", "global_constant", "individual_learnable")


@dataclass
class FastCLIPConfig:
    """Hyperparameters of the FastCLIP objective (defaults: the seed's FastCLIP-v3 command), each named like
    the training script's flag that sets it.

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
    clamp_u_to_g: float | None = None  # opt-in, not the paper's: see normaliser.py

    def __post_init__(self) -> None:
        if self.temperature_scheme not in TEMPERATURE_SCHEMES:
            raise ValueError(f"temperature_scheme {self.temperature_scheme!r}: use one of {TEMPERATURE_SCHEMES}")
        check_multiply_tau(self.multiply_tau, self.temperature_scheme)
        if self.data_size <= 0:
            raise ValueError(f"data_size must be positive, got {self.data_size}")


# pairs: up to the regime map's largest size (41,660) the paper's gamma trailed OpenCLIP (bench/scale.py)
SMALL_DATA = 42_000
MANY_EPOCHS = 10


def regime_warnings(config: FastCLIPConfig, epochs: int, total_steps: int) -> list[str]:
    """Start-up warnings for runs where FastCLIP's settings are known to do little or to cost.

    FastCLIP departs from the mini-batch loss only once each pair's u has averaged many visits: gamma is 1
    in epoch 0 and decays to --gamma over --gamma_decay_epochs. A learnt global temperature is the model's
    log-scale under Adam, which moves it by about --lr_tau per step at most. On a few thousand pairs over
    many epochs a few memorised hard negatives carry each g, and a long memory of u cost recall."""
    warnings = []
    if config.data_size <= SMALL_DATA and epochs >= MANY_EPOCHS and config.gamma < 0.5 and config.clamp_u_to_g is None:
        warnings.append(f"--data_size {config.data_size} pairs x {epochs} epochs at --gamma {config.gamma:g}: at 2,000 "
                        "to 41,660 pairs x 20 epochs FastCLIP-v3 at --gamma 0.2 trailed OpenCLIP by 2 to 8.8 pp held-out "
                        "R@10 (the regime map: 3 seeds up to 20,000 pairs, 2 at 41,660), and at 20,000 pairs --gamma 0.5 "
                        "tied it (2 seeds); on 2,000 pairs x 30 epochs it tied OpenCLIP at --gamma 0.5 or with "
                        "--clamp_u_to_g 2 and led slightly at --gamma 1 --gamma_schedule constant (README: Which version, "
                        "which flags)")
    if epochs <= 1:
        warnings.append(f"--epochs {epochs}: gamma is 1 in epoch 0, so every u is its mini-batch estimate and "
                        "FastCLIP trains like the mini-batch loss; u averages visits from epoch 1 on")
    elif config.gamma_schedule == "cosine" and config.gamma_decay_epochs >= epochs:
        last = gamma_at_epoch(epochs - 1, config.gamma, config.gamma_schedule, config.gamma_decay_epochs)
        warnings.append(f"--gamma_decay_epochs {config.gamma_decay_epochs} >= --epochs {epochs}: gamma never reaches "
                        f"--gamma {config.gamma} (last epoch: {last:.2f}), so each u averages few visits and FastCLIP "
                        "stays close to the mini-batch loss; the default decays over half the epochs")
    reach = config.lr_tau * total_steps
    if config.temperature_scheme == "global_learnable" and reach < 1.0:
        warnings.append(f"--lr_tau {config.lr_tau:g} x {total_steps} steps = {reach:.2g}: the temperature can change "
                        f"by a factor of about {math.exp(reach):.2f} at most and stays near --temperature "
                        f"{config.temperature:g} (the paper's --lr_tau 2e-4 was set for runs of ~100k steps)")
    return warnings


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


def _split_fields(values: torch.Tensor, names: list[str]) -> dict[str, torch.Tensor]:
    """(b, 2F) state columns [f1_side1, f1_side2, f2_side1, ...] -> {name: (2, b)}."""
    split = values.reshape(values.shape[0], len(names), 2).permute(1, 2, 0)
    return dict(zip(names, split))


def _join_fields(fields: dict[str, torch.Tensor], names: list[str]) -> torch.Tensor:
    """{name: (2, b)} -> (b, 2F) state columns (inverse of `_split_fields`)."""
    stacked = torch.stack([fields[name] for name in names])
    return stacked.permute(2, 0, 1).reshape(stacked.shape[2], -1)


def build_scheme(config: FastCLIPConfig) -> TemperatureScheme:
    """The temperature scheme of `config` (table in docs/algorithm.md: v0..v3 -> flags -> classes)."""
    if config.temperature_scheme == "individual_learnable":
        return IndividualTemperature(config.lr_tau, config.rho, config.beta1, config.beta2, config.eps)
    return GlobalTemperature(learnable=config.temperature_scheme == "global_learnable")


class FastCLIPObjective:
    """FastCLIP-v0..v3 behind the engine's `Objective` interface (see losses/base.py).

    Side 1 is the image anchor (candidates: texts), side 2 the text anchor (candidates: images); both
    run batched along a leading dimension of 2. Per-sample state columns: the moving average's fields
    then the temperature scheme's, each for side 1 and 2 (v0/v1/v3: log_u1, log_u2; v2: u, bound,
    tau, exp_avg, exp_avg_sq).

    Gradients in one process (K = 1): features get grad(Phi / 2), the global tau gets dPhi/dtau, as
    it enters both terms with gradient (v3 adds tau_bar and its penalty on top of that).
    """

    def __init__(self, config: FastCLIPConfig, device: torch.device | str, dtype: torch.dtype = torch.float32):
        self.config = config
        self.scheme = build_scheme(config)
        self.average = self.scheme.moving_average
        self.normaliser = build_normaliser(config.clamp_u_to_g)
        self.learns_model_temperature = self.scheme.learns_model_temperature
        self.fields = list(self.average.fields) + list(self.scheme.fields)
        self.columns = [f"{field}{side}" for field in self.fields for side in (1, 2)]
        initial = {**self.average.initial, **self.scheme.initial(config.temperature)}
        per_column = [initial[field] for field in self.fields for _ in (1, 2)]
        self.state = ShardedState(config.data_size, per_column, device, dtype)
        self._last_tau: torch.Tensor | None = None
        self._lag_inputs: tuple[torch.Tensor, torch.Tensor] | None = None  # (log u before, log g) of the last step
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
        logit_bias: torch.Tensor | None = None,
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
        old = _split_fields(self.state.fetch(all_index).to(image.dtype), self.fields)
        model_tau = logit_scale.reciprocal()
        tau = self.scheme.anchor_tau(old, model_tau, b)

        # term 1: local anchors (with gradient) against the whole gathered batch (constants)
        positive = (image * text).sum(dim=-1)
        mask = fn.exclusion_mask(b, m, start, 0, image.device)
        diffs = fn.pairwise_differences(torch.stack([image, text]), torch.stack([all_text, all_image]), positive, tau)
        estimate = self.average.update(old, diffs, mask, self.gamma, m, cfg.fastclip_eps)
        self._lag_inputs = (self.average.log_u(old), estimate.log_g)  # read only when a line is logged
        new = {**estimate.fields, **self.scheme.step(old, diffs, mask, estimate, m, self.epoch)}
        shift = self.normaliser.local(estimate.shift, estimate.log_g)
        loss1 = fn.weighted_sum(diffs, shift, mask).sum(dim=0).mean() / (m - 1)

        # one all-gather: new per-sample values (stored by their owners) and what term 2 needs
        normaliser_shared = self.normaliser.shared(estimate.log_g)
        shared = [_join_fields(new, self.fields), positive.detach(), *normaliser_shared, *self.scheme.shared(tau)]
        all_new, all_positive, *all_shared = comm.gather_to_all(shared)
        self.state.store(all_index, all_new)
        all_normaliser_shared, all_shared = all_shared[:len(normaliser_shared)], all_shared[len(normaliser_shared):]

        # term 2: gathered anchors (constants) against the local candidates (with gradient)
        all_shift = self.normaliser.gathered(
            self.average.shift(_split_fields(all_new, self.fields), cfg.fastclip_eps), all_normaliser_shared)
        mask2 = fn.exclusion_mask(m, b, 0, start, image.device)
        diffs2 = fn.pairwise_differences(
            torch.stack([all_image, all_text]), torch.stack([text, image]), all_positive,
            self.scheme.gathered_tau(all_shared, model_tau, m),
        )
        loss2 = fn.weighted_sum(diffs2, all_shift, mask2).sum(dim=0).mean() * world / (m - 1)

        loss = (loss1 + loss2) / 2
        self._last_tau = _split_fields(all_new, self.fields).get("tau", model_tau).detach()  # v2's, or the global one
        if not cfg.multiply_tau:
            return {"fastclip_loss": loss}
        mean_log_u = self.average.log_u(estimate.fields).sum(dim=0).mean() / 2
        return {"fastclip_loss": model_tau.detach() * loss, "tau_loss": model_tau * (cfg.rho + mean_log_u)}

    def log_values(self) -> dict[str, float]:
        """gamma and the temperature of the last step: the model's tau, or for v2 the mean, min, median
        and max of the global batch's per-sample taus and the share of them at the 0.01 floor; and how the
        last step's local anchors that were visited before compare their mini-batch g with their u
        (moving_average.lag_values: `g_over_u`, `g_over_u_typical`)."""
        taus = torch.tensor(self.config.temperature) if self._last_tau is None else self._last_tau
        values = {"gamma": self.gamma, **tau_summary(taus)}
        return values if self._lag_inputs is None else {**values, **lag_values(*self._lag_inputs)}

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
