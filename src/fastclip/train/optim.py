"""open_clip's parameter groups, plus a separate group for a learnable global temperature, under AdamW
or any timm optimizer (`--opt timm/NAME`, as open_clip_train)."""

from __future__ import annotations

import torch

from ..rules import check_optimizer


def _is_excluded_from_decay(name: str, param: torch.Tensor) -> bool:
    return param.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name


def param_groups(model: torch.nn.Module, lr: float, weight_decay: float,
                 temperature_lr: float | None = None) -> list[dict]:
    """Groups: 'decay' (weights), 'no_decay' (gains, biases), and 'temperature' (logit_scale).

    With `temperature_lr` None the logit_scale sits in 'no_decay' and follows the model lr (OpenCLIP);
    otherwise it gets its own group with that lr (FastCLIP's --lr_tau). A frozen logit_scale
    (requires_grad False) is left out entirely, and so are empty groups.
    """
    groups: dict[str, list[torch.Tensor]] = {"decay": [], "no_decay": [], "temperature": []}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name.endswith("logit_scale") and temperature_lr is not None:
            groups["temperature"].append(param)
        elif _is_excluded_from_decay(name, param):
            groups["no_decay"].append(param)
        else:
            groups["decay"].append(param)
    result = [
        {"name": "decay", "params": groups["decay"], "weight_decay": weight_decay, "lr": lr},
        {"name": "no_decay", "params": groups["no_decay"], "weight_decay": 0.0, "lr": lr},
    ]
    if groups["temperature"]:
        result.append({"name": "temperature", "params": groups["temperature"], "weight_decay": 0.0,
                       "lr": temperature_lr})
    return [g for g in result if g["params"]]


def build_optimizer(
    model: torch.nn.Module,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float],
    eps: float,
    temperature_lr: float | None = None,
    fused: bool = False,
    opt: str = "adamw",
    momentum: float | None = None,
) -> torch.optim.Optimizer:
    """AdamW over `param_groups`. `fused` (GPUs): one kernel per step, and a grad scaler skips a
    non-finite step inside it, without a host synchronisation. `opt` 'timm/NAME' builds timm's optimizer
    NAME over the same groups (betas, eps and `momentum` where it takes them).
    """
    groups = param_groups(model, lr, weight_decay, temperature_lr)
    if opt.lower() == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused or None)
    check_optimizer(opt)
    from timm.optim import create_optimizer_v2

    extra = {} if momentum is None else {"momentum": momentum}
    return create_optimizer_v2(groups, opt[len("timm/"):], lr=lr, weight_decay=weight_decay, eps=eps,
                               betas=betas, **extra)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The bare model inside DDP and/or torch.compile wrappers."""
    model = getattr(model, "_orig_mod", model)
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


@torch.no_grad()
def clamp_logit_scale(model: torch.nn.Module, max_value: float) -> None:
    """Keep tau = exp(-logit_scale) in [1/exp(max_value), 1]: logit_scale in [0, max_value]."""
    unwrap(model).logit_scale.clamp_(0, max_value)
