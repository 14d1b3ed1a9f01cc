"""What `--precision` means on the device at hand: open_clip_train's names, each with one meaning.

| name | weights | inputs | autocast | loss scaling |
|---|---|---|---|---|
| fp32 | float32 | float32 | none | no |
| amp | float32 | float32 | float16 | yes |
| amp_bf16, amp_bfloat16 | float32 | float32 | bfloat16 | no |
| bf16 | open_clip's low-precision weights (LayerNorm, logit scale in float32) | bfloat16 | none | no |
| fp16 | open_clip's low-precision weights (LayerNorm, logit scale in float32) | float16 | none | yes |
| pure_bf16, pure_fp16 | every parameter in that type | that type | none | pure_fp16 only |

This is open_clip_train's table, on the CPU too (`amp` there is float16 autocast, as the name says, and
slow: the start-up log says so), with one change: float16 weights are trained with loss scaling, which
open_clip_train leaves out because torch's GradScaler refuses float16 gradients; here the optimizer step
scales (`guard.SkippingStep`), so small float16 gradients do not flush to zero. `auto` is float32 on the
CPU and amp (bf16 where supported) on a GPU. The objectives compute their sums in float32 whatever the
precision (`losses.functional`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

PRECISIONS = ("auto", "fp32", "amp", "amp_bf16", "amp_bfloat16", "bf16", "fp16", "pure_bf16", "pure_fp16")
_LOW = {"bf16": torch.bfloat16, "fp16": torch.float16}
_TYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


class PrecisionError(ValueError):
    """A precision the device at hand cannot run; the message says what to pick instead."""


@dataclass(frozen=True)
class Precision:
    name: str
    autocast_dtype: torch.dtype | None  # None: no autocast
    model_dtype: str  # open_clip's create_model precision: fp32, bf16, fp16, pure_bf16 or pure_fp16
    loss_scaling: bool  # float16 computation (autocast or weights) needs it

    @property
    def input_dtype(self) -> torch.dtype:
        """The type images are cast to before the model (the type of its low-precision weights)."""
        return _LOW[self.model_dtype.removeprefix("pure_")] if self.model_dtype != "fp32" else torch.float32

    def autocast(self, device: torch.device):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.autocast_dtype)

    def describe(self) -> str:
        """One line for the log and params.json: what this precision does on this run."""
        if self.model_dtype == "fp32":
            weights = "float32 weights"
        elif self.model_dtype.startswith("pure_"):
            weights = f"all weights {_TYPE_NAMES[self.input_dtype]}"
        else:
            weights = f"{_TYPE_NAMES[self.input_dtype]} weights (LayerNorm and logit scale float32)"
        compute = f"{_TYPE_NAMES[self.autocast_dtype]} autocast" if self.autocast_dtype else "no autocast"
        scaling = "loss scaling" if self.loss_scaling else "no loss scaling"
        return f"{self.name}: {weights}, {_TYPE_NAMES[self.input_dtype]} inputs, {compute}, {scaling}"


def resolve_precision(name: str, device: torch.device) -> Precision:
    """The Precision `name` stands for on `device`; PrecisionError where the device cannot run it."""
    if name == "auto":
        if device.type != "cuda":
            name = "fp32"
        else:
            name = "amp_bf16" if torch.cuda.is_bf16_supported() else "amp"
    if "bf16" in name and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise PrecisionError(f"--precision {name}: this GPU has no bfloat16 support; use amp (float16 autocast "
                             "with loss scaling) or fp32")
    if name == "fp32":
        return Precision(name, None, "fp32", False)
    if name == "amp":
        return Precision(name, torch.float16, "fp32", True)
    if name in ("amp_bf16", "amp_bfloat16"):
        return Precision(name, torch.bfloat16, "fp32", False)
    if name in ("bf16", "fp16", "pure_bf16", "pure_fp16"):
        return Precision(name, None, name, name.endswith("fp16"))
    raise PrecisionError(f"unknown precision {name!r}: use one of {', '.join(PRECISIONS)}")


def slow_on_device(precision: Precision, device: torch.device) -> str | None:
    """Why `precision` will be slow on `device`, for a start-up warning; None when it is not."""
    if device.type == "cpu" and precision.autocast_dtype is not None:
        return (f"--precision {precision.name} runs {_TYPE_NAMES[precision.autocast_dtype]} autocast on the CPU, "
                "many times slower than fp32 there (the CPU default): use --precision fp32 unless you mean it")
    return None
