"""What `--precision` means on the device at hand."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Precision:
    name: str
    autocast_dtype: torch.dtype | None  # None: no autocast
    model_dtype: str  # open_clip's create_model precision: fp32, bf16 or fp16 (pure low precision)
    grad_scaler: bool  # fp16 autocast needs loss scaling

    def autocast(self, device: torch.device):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.autocast_dtype)


def resolve_precision(name: str, device: torch.device) -> Precision:
    """`auto` is float32 on CPU (CPU autocast is many times slower) and amp on GPU, bf16 where supported."""
    if name == "auto":
        if device.type != "cuda":
            name = "fp32"
        else:
            name = "amp_bf16" if torch.cuda.is_bf16_supported() else "amp"
    if name == "fp32":
        return Precision(name, None, "fp32", False)
    if name == "amp":
        if device.type == "cuda":
            return Precision(name, torch.float16, "fp32", True)
        return Precision(name, torch.bfloat16, "fp32", False)  # CPU autocast supports bf16 only
    if name in ("amp_bf16", "amp_bfloat16"):
        return Precision(name, torch.bfloat16, "fp32", False)
    if name in ("bf16", "fp16"):
        return Precision(name, None, name, False)
    raise ValueError(f"unknown precision {name!r}")
