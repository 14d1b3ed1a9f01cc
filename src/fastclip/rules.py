"""Rules on settings that both the command line and the library enforce, each written once.

Torch-free, so that the flag parser applies them at once (a one-line error before anything loads) and the
library's constructors apply the same ones to callers that never saw a command line."""

from __future__ import annotations

from typing import Sequence

from .run.summary import version_name


def check_optimizer(opt: str) -> None:
    """--opt names AdamW or a timm optimizer."""
    if opt.lower() != "adamw" and not opt.lower().startswith("timm/"):
        raise ValueError(f"--opt {opt}: use adamw, or timm/NAME for a timm optimizer (e.g. timm/lamb, timm/sgd)")


def check_upsampling(factors: str | Sequence[float] | None, resampled: bool) -> None:
    """Upsampling factors weight shard draws, which only resampled shards make."""
    if factors is not None and not resampled:
        raise ValueError("--train-data-upsampling-factors needs --dataset-resampled: the factors weight shards "
                         "drawn with replacement: add --dataset-resampled")


def check_multiply_tau(multiply_tau: bool, temperature_scheme: str) -> None:
    """FastCLIP-v3's loss (--multiply_tau) learns the model's one global temperature."""
    if multiply_tau and temperature_scheme != "global_learnable":
        version = version_name(True, temperature_scheme, multiply_tau=False)
        raise ValueError(f"--multiply_tau (FastCLIP-v3) learns one global temperature: use --temperature_scheme "
                         f"global_learnable, or drop --multiply_tau for {version} (--temperature_scheme "
                         f"{temperature_scheme})")
