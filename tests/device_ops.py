"""Every op a block of code dispatches, and each one that would make a GPU step wait or leave the device.

`DeviceOps` is a TorchDispatchMode: it sees each aten op with its arguments, on real tensors or on the
fake ones of FakeTensorMode (where a machine without a GPU has a `cuda` device). It flags:
- host reads: `.item()`, `float()`, `int()`, `bool()` of a tensor (`aten._local_scalar_dense`), which wait
  for the GPU to finish everything queued before them;
- copies between host and device, and any other tensor off the step's device (a CPU scalar tensor built
  with `torch.tensor(...)` is a copy from pageable memory, which blocks the host too);
- ops whose output shape depends on the data (`nonzero`, masked indexing, `unique`...), which read a count
  back from the GPU.
Each finding carries the project's source line that caused it. Under FakeTensorMode a host read returns a
stand-in value so that the rest of the step still runs and is checked; an op with a data-dependent shape
cannot go on, so it ends the block with the findings so far.
"""

from __future__ import annotations

import traceback
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import torch
from torch._subclasses.fake_tensor import DynamicOutputShapeException, FakeTensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

SRC = str(Path(__file__).resolve().parents[1] / "src")
aten = torch.ops.aten
HOST_READ = aten._local_scalar_dense.default
COPIES = (aten._to_copy.default, aten.copy_.default)
DATA_DEPENDENT_SHAPES = {aten.nonzero.default, aten.masked_select.default, aten._unique2.default,
                         aten.unique_dim.default, aten.unique_consecutive.default}


def _fused_adam_tensor_lr(args: tuple, kwargs: dict) -> None:
    """The fused Adam/AdamW kernel with a tensor learning rate, which has no fake implementation: its CUDA
    kernel reads the rate as a float32 on the parameters' device, so that is checked, and nothing is done."""
    lr, params = kwargs["lr"], args[0]
    if lr.dtype != torch.float32 or lr.device != params[0].device or lr.numel() != 1:
        raise AssertionError(f"fused Adam learning rate {lr.dtype} on {lr.device}: its CUDA kernel reads a float32 "
                             f"scalar on {params[0].device}")


# kernels FakeTensorMode cannot run, checked against what the real kernel requires instead
FAKE_STAND_INS: dict[Any, Callable[[tuple, dict], None]] = {
    aten._fused_adamw_.tensor_lr: _fused_adam_tensor_lr,
    aten._fused_adam_.tensor_lr: _fused_adam_tensor_lr,
}


def _source_line() -> str:
    """The innermost frame of the project's own code (src/) on the stack: where an op came from."""
    frames = [f for f in traceback.extract_stack() if f.filename.startswith(SRC)]
    if not frames:
        return "outside src/"
    frame = frames[-1]
    return f"{Path(frame.filename).relative_to(SRC)}:{frame.lineno}: {frame.line}"


def _stand_in_scalar(tensor: torch.Tensor) -> bool | int | float:
    if tensor.dtype == torch.bool:
        return False
    return 0.0 if tensor.is_floating_point() else 0


class DeviceOps(TorchDispatchMode):
    """Ops dispatched inside the block (`calls`: name -> count; `inputs`: each call's arguments) and the
    findings that would synchronise a step on `device` (`syncs`) or put a tensor elsewhere (`findings`)."""

    def __init__(self, device: torch.device) -> None:
        super().__init__()
        self.device = torch.device(device)
        self.calls: Counter[str] = Counter()
        self.inputs: list[tuple[Any, tuple, dict]] = []
        self.findings: list[str] = []
        self.syncs = 0

    def _find(self, what: str, sync: bool) -> None:
        self.findings.append(f"{what} at {_source_line()}")
        self.syncs += sync

    def _elsewhere(self, tensors: list[torch.Tensor]) -> list[torch.device]:
        return sorted({t.device for t in tensors if t.device != self.device}, key=str)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.calls[str(func)] += 1
        self.inputs.append((func, args, kwargs))
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        fake = any(isinstance(t, FakeTensor) for t in tensors)
        if func is HOST_READ:
            self._find(f"host read of a {tensors[0].dtype} on {tensors[0].device} (item/float/int/bool)", sync=True)
            if fake:
                return _stand_in_scalar(tensors[0])
        if func in DATA_DEPENDENT_SHAPES or (func is aten.index.Tensor and any(
                t.dtype == torch.bool for t in tensors[1:])):
            self._find(f"{func} (its output shape depends on the data)", sync=True)
        if fake and func in FAKE_STAND_INS:
            FAKE_STAND_INS[func](args, kwargs)
            return None
        try:
            out = func(*args, **kwargs)
        except DynamicOutputShapeException:
            self._find(f"{func} (its output shape depends on the data)", sync=True)
            raise AssertionError("a data-dependent op ended the step:\n" + "\n".join(self.findings)) from None
        elsewhere = self._elsewhere(tensors + [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)])
        if elsewhere and func in COPIES:
            self._find(f"{func} between {self.device} and {', '.join(map(str, elsewhere))}", sync=True)
        elif elsewhere and func is not HOST_READ:
            self._find(f"{func} with a tensor on {', '.join(map(str, elsewhere))}", sync=False)
        return out

    def report(self) -> str:
        return f"{self.syncs} synchronisations, {len(self.findings)} findings:\n" + "\n".join(self.findings)
