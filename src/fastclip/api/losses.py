"""The losses for a training loop of your own: FastCLIP-v0..v3, OpenCLIP and SigLIP under one call.

    loss = loss_fn(image_features, text_features, logit_scale, index)

on every rank, as open_clip's ClipLoss is called, plus the pairs' dataset indices (FastCLIP keeps a
moving average u per pair). A loss built after torch.distributed's default process group is set up
(by torchrun, srun, Accelerate, Lightning, mpirun; gloo or NCCL) computes over the global batch: it
gathers what it needs itself and returns this rank's part, whose gradient DDP's (or FSDP's) average
turns into the global batch's. Without a process group it is the one-process loss. (FSDP2's fully_shard
refuses 0-dim parameters: make open_clip's logit_scale a 1-element vector first, as tests/test_loss_api.py does.)

These classes are thin: the training script builds its objective through them (training/builders.py),
and the math lives in fastclip.losses. They are not nn.Modules: FastCLIP's per-sample state is sharded
over the ranks (pair i on rank i % K), so it must stay out of a model's state_dict, which DDP users
save from rank 0 alone; each rank saves its own `state_dict()` instead (api/state.py).
"""

from __future__ import annotations

import inspect
from typing import Mapping, Sequence

import torch

from ..distributed import comm
from ..losses.base import Objective
from ..losses.fastclip import FastCLIPConfig, FastCLIPObjective
from ..losses.openclip import OpenCLIPObjective
from ..losses.siglip import SIGLIP_MODEL_KWARGS, SigLIPObjective
from ..run.summary import version_name
from ..train.guard import takes_device_flags
from ..train.optim import param_groups, unwrap
from ..train.schedules import TauLrSchedule
from .state import load_shard_states, shard_state

# version -> (temperature_scheme, multiply_tau), the training script's flags (README, "Training")
VERSIONS = {"v0": ("global_learnable", False), "v1": ("global_constant", False),
            "v2": ("individual_learnable", False), "v3": ("global_learnable", True)}
# the paper's settings that differ by version; the others are FastCLIPConfig's defaults (the paper's)
PAPER_SETTINGS = {"v0": {}, "v1": {}, "v2": dict(temperature=0.03, rho=7.0, lr_tau=0.0133),
                  "v3": dict(rho=6.5, lr_tau=2e-4, lr_tau_scheduler="step_thresh")}
TEMPERATURE_LR_RULES = ("const", "step_thresh")


def _whole(param: torch.Tensor) -> torch.Tensor:
    """A parameter's value on every rank, also where FSDP2 shards it (a DTensor: every rank gathers it)."""
    param = param.detach()
    return param.full_tensor() if hasattr(param, "full_tensor") else param


def _default_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


class ContrastiveLoss:
    """What every loss here offers: the call, the epoch hook, the optimizer's groups and the state."""

    def __init__(self, objective: Objective, name: str, temperature_lr: TauLrSchedule | None = None) -> None:
        self.objective = objective  # the training engine's interface (fastclip.losses.base.Objective)
        self.name = name  # "FastCLIP-v3", "OpenCLIP", "SigLIP": recorded in the state
        self.epoch = 0
        self._temperature_lr = temperature_lr
        self._world_size = comm.world_size()

    @property
    def learns_temperature(self) -> bool:
        """Whether the model's logit_scale gets a gradient (v0, v3, OpenCLIP, SigLIP by default)."""
        return self.objective.learns_model_temperature

    def __call__(self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                 index: torch.Tensor | None = None, *, logit_bias: torch.Tensor | None = None,
                 output_dict: bool = False) -> torch.Tensor | dict[str, torch.Tensor]:
        """This rank's loss for its local batch: features (b, d) as the model returns them (normalised),
        `logit_scale` the model's (exp of its parameter, 1 / tau), `index` the pairs' dataset indices (b,),
        int64 in [0, data_size), the same pair always the same index (FastCLIP only), `logit_bias` the
        model's (SigLIP only). The sum of the loss's terms, or with `output_dict` the terms by name.

        Every rank calls it once per step, in the same order: it runs collectives."""
        if comm.world_size() != self._world_size:
            raise RuntimeError(f"{self.name}'s loss was built for {self._world_size} process(es) and runs in "
                               f"{comm.world_size()}: build it after torch.distributed.init_process_group")
        if self.objective.per_sample is not None:
            self._check_index(index, image_features.shape[0])
        terms = self.objective(image_features, text_features, logit_scale, index, logit_bias)
        return terms if output_dict else sum(terms.values())

    def _check_index(self, index: torch.Tensor | None, batch: int) -> None:
        """A missing or misshapen index always; its range where that costs nothing (on the CPU)."""
        if index is None or tuple(index.shape) != (batch,):
            raise ValueError(f"{self.name} needs `index`: the dataset indices of the batch's {batch} pairs, shape "
                             f"({batch},), got {None if index is None else tuple(index.shape)}")
        size = self.objective.per_sample.data_size
        if index.device.type == "cpu" and batch and not (0 <= int(index.min()) and int(index.max()) < size):
            raise ValueError(f"index holds values outside [0, data_size = {size}): {int(index.min())}.."
                             f"{int(index.max())}; data_size must exceed the largest index")

    def set_epoch(self, epoch: int) -> None:
        """Call at the start of every epoch (0-based), as DistributedSampler.set_epoch: FastCLIP's gamma
        (1 in epoch 0, then decaying) and v2's per-pair Adam count epochs."""
        self.epoch = epoch
        self.objective.on_epoch_start(epoch)

    def log_values(self) -> dict[str, float]:
        """Scalars of the last call worth logging (FastCLIP: gamma, tau, g_over_u); they read the device,
        so call it only when you log."""
        return self.objective.log_values()

    def param_groups(self, model: torch.nn.Module, lr: float, weight_decay: float) -> list[dict]:
        """open_clip_train's parameter groups for your optimizer (no weight decay on gains, biases and the
        temperature) with the temperature where this loss wants it: a group named 'temperature' at
        lr_tau (v0 with lr_tau, v3), else with the model's lr. Where the loss does not learn the
        temperature (v1, v2, OpenCLIP with learn_temperature=False), logit_scale is frozen: do this
        before wrapping the model in DDP, which would otherwise find an unused parameter."""
        bare = unwrap(model)
        if not self.learns_temperature:
            bare.logit_scale.requires_grad_(False)
        base = None if self._temperature_lr is None else self._temperature_lr.base_lr
        return param_groups(bare, lr, weight_decay, base)

    def set_temperature_lr(self, optimizer: torch.optim.Optimizer) -> None:
        """Every step, after your lr scheduler and before optimizer.step(): the 'temperature' group's lr
        under lr_tau's rule (v3's step_thresh: lr_tau, a third of it while tau <= 0.03, decided on tau's
        device; a fused optimizer reads it there, others get a float, read on the host). Nothing to do
        where the temperature follows the model's lr or is not learnt."""
        rule = self._temperature_lr
        if rule is None:
            return
        groups = [group for group in optimizer.param_groups if group.get("name") == "temperature"]
        if not groups:
            raise ValueError(f"{self.name} learns the temperature at its own lr: build the optimizer from "
                             "loss.param_groups(model, lr, weight_decay)")
        for group in groups:
            tau = 1.0 / _whole(group["params"][0]).detach().exp() if rule.reads_temperature else None
            lr = rule(0, tau)  # its rules are per step, not over a number of steps
            if torch.is_tensor(lr):  # a device scalar: fused optimizers read it there, the others take a float
                lr = lr.float() if takes_device_flags(optimizer) else float(lr)
            group["lr"] = lr

    def state_dict(self) -> dict:
        """The loss's state for your checkpoint: the epoch and, for FastCLIP, this rank's shard of the
        per-sample table (n / K pairs' values). Under several ranks every rank saves its own (e.g.
        torch.save(..., f"ckpt_rank{rank}.pt")); one process's state holds the whole table."""
        state = {"loss": self.name, "epoch": self.epoch}
        if self.objective.per_sample is not None:
            state["per_sample"] = shard_state(self.objective.per_sample, self.objective.per_sample_columns)
        return state

    def load_state_dict(self, state: Mapping | Sequence[Mapping]) -> None:
        """Restore a `state_dict()`: this rank's own, one process's, or after a change in the number of
        ranks a list of every old rank's (each rank takes the rows it now owns). A state of another loss,
        FastCLIP version or data size is refused before anything changes."""
        states = [state] if isinstance(state, Mapping) else list(state)
        if not states:
            raise ValueError("no state to load")
        names = {s.get("loss") for s in states}
        if names != {self.name}:
            raise ValueError(f"the state was saved by the loss {' and '.join(sorted(map(str, names)))}; this loss is "
                             f"{self.name}")
        if self.objective.per_sample is not None:
            load_shard_states(self.objective.per_sample, self.objective.per_sample_columns,
                              [s["per_sample"] for s in states])
        self.set_epoch(int(states[0]["epoch"]))


class FastCLIPLoss(ContrastiveLoss):
    """FastCLIP-v0..v3 (`version`) with the paper's settings by default; each keyword is the training
    script's flag of the same name.

    `data_size`: more than the largest pair index. `gamma`, `gamma_schedule`, `gamma_decay_epochs`: u's
    inner learning rate (1 in epoch 0, then down to gamma: `set_epoch`). `temperature`: where v2's
    per-pair temperatures start (0.03); v0, v1 and v3 use the model's logit_scale, which open_clip starts
    at 1 / 0.07. `rho`: v2/v3's temperature constraint. `lr_tau`: v2's per-pair temperature lr, or the
    lr of the model's temperature (v3: 2e-4; v0: None, the model's lr) with `lr_tau_scheduler` const or
    step_thresh (v3's: `set_temperature_lr`). `beta1`, `beta2`, `eps`: v2's per-pair Adam.
    `clamp_u_to_g` (opt-in, not the paper's; None: off): u clamped to within this factor (>= 1) of the step's
    mini-batch estimate when it divides the anchor's weights (fastclip.losses.normaliser).
    `device`: where the per-sample table lives, the features' device (default: the current CUDA device, so
    call torch.cuda.set_device(local_rank) first, else the CPU).
    """

    def __init__(self, data_size: int, version: str = "v3", *, gamma: float = 0.2, gamma_schedule: str = "cosine",
                 gamma_decay_epochs: int = 18, temperature: float | None = None, rho: float | None = None,
                 fastclip_eps: float = 1e-14, lr_tau: float | None = None, lr_tau_scheduler: str | None = None,
                 beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8, clamp_u_to_g: float | None = None,
                 device: torch.device | str | None = None) -> None:
        if version not in VERSIONS:
            raise ValueError(f"version {version!r}: use one of {', '.join(VERSIONS)}")
        scheme, multiply_tau = VERSIONS[version]
        given = dict(temperature=temperature, rho=rho, lr_tau=lr_tau, lr_tau_scheduler=lr_tau_scheduler)
        settings = {**PAPER_SETTINGS[version], **{k: v for k, v in given.items() if v is not None}}
        rule = settings.pop("lr_tau_scheduler", None)
        config = FastCLIPConfig(data_size=data_size, temperature_scheme=scheme, multiply_tau=multiply_tau, gamma=gamma,
                                gamma_schedule=gamma_schedule, gamma_decay_epochs=gamma_decay_epochs,
                                fastclip_eps=fastclip_eps, beta1=beta1, beta2=beta2, eps=eps,
                                clamp_u_to_g=clamp_u_to_g, **settings)
        objective = FastCLIPObjective(config, _default_device() if device is None else device)
        super().__init__(objective, version_name(True, scheme, multiply_tau),
                         _temperature_rule(objective, rule, settings.get("lr_tau")))


def _temperature_rule(objective: FastCLIPObjective, rule: str | None, lr_tau: float | None) -> TauLrSchedule | None:
    """How the model's temperature's lr moves: only where the model's temperature is learnt at its own lr."""
    if rule not in (None, *TEMPERATURE_LR_RULES):
        raise ValueError(f"lr_tau_scheduler {rule!r}: use one of {TEMPERATURE_LR_RULES} (for a schedule like the "
                         "model's, leave lr_tau out and the temperature follows the model's lr)")
    if not objective.learns_model_temperature:
        if rule not in (None, "const"):
            raise ValueError(f"lr_tau_scheduler {rule!r} needs a learnt global temperature (v0, v3)")
        return None
    return None if lr_tau is None else TauLrSchedule(rule or "const", lr_tau, 0, 0)


class OpenCLIPLoss(ContrastiveLoss):
    """The mini-batch contrastive loss over the global batch (open_clip's ClipLoss), as the paper's
    baseline runs it (`local_loss`, `gather_with_grad`); `learn_temperature=False` keeps the model's
    temperature fixed (the baseline that differs from FastCLIP-v1 in u alone). `index` is not needed."""

    def __init__(self, *, local_loss: bool = True, gather_with_grad: bool = True, learn_temperature: bool = True) -> None:
        super().__init__(OpenCLIPObjective(local_loss, gather_with_grad, comm.rank(), comm.world_size(),
                                           learn_temperature=learn_temperature), "OpenCLIP")


class SigLIPLoss(ContrastiveLoss):
    """open_clip's pairwise sigmoid loss; it needs the model's `logit_bias` (create the model with
    `SigLIPLoss.MODEL_KWARGS`: tau 0.1 and a bias starting at -10). `index` is not needed."""

    MODEL_KWARGS = SIGLIP_MODEL_KWARGS

    def __init__(self, *, dist_impl: str | None = None) -> None:
        super().__init__(SigLIPObjective(comm.rank(), comm.world_size(), dist_impl), "SigLIP")


def _parameters(cls: type) -> set[str]:
    return set(inspect.signature(cls.__init__).parameters) - {"self"}


def create_loss(name: str, data_size: int | None = None, **kwargs) -> ContrastiveLoss:
    """A loss by name: 'v0'..'v3' (or 'fastclip-v3', ...; these need `data_size`), 'openclip', 'siglip'.
    `kwargs` go to its class; FastCLIP's settings are ignored by the other losses, as the training
    script's flags are, so that one call serves every name. Any other unknown keyword is an error."""
    key = name.lower().removeprefix("fastclip-")
    if key in ("openclip", "siglip"):
        cls = OpenCLIPLoss if key == "openclip" else SigLIPLoss
        ignored = _parameters(FastCLIPLoss) - _parameters(cls)
        return cls(**{k: v for k, v in kwargs.items() if k not in ignored})
    if key not in VERSIONS:
        raise ValueError(f"loss {name!r}: use one of {', '.join(VERSIONS)}, openclip, siglip")
    if data_size is None:
        raise ValueError(f"{name} keeps a moving average per pair: give data_size (more than the largest index)")
    return FastCLIPLoss(data_size, key, **kwargs)
