"""Non-finite steps: skipped on the device, counted on the device, read by the host a step late.

A step whose gradients hold NaN or inf never reaches the weights (`SkippingStep`), which also owns float16's
loss scaling (`LossScale`). The gradients are all-reduced before the check, so every rank skips the same
steps. The per-sample state of such a step is not stored either (see `ShardedState.store`). Counting
happens in device tensors; the host learns the count of consecutive bad steps through a non-blocking copy
that it reads once it has arrived, so no step waits for the GPU.
"""

from __future__ import annotations

from collections import deque

import torch


class LaggedValue:
    """The host's view of a device scalar, a few steps old at most, read without a GPU sync.

    On the CPU the value is read directly. On CUDA each `push` copies the scalar into one of a few
    pinned buffers without blocking and records an event; `value` takes the newest copy whose event
    has completed. When the GPU runs more than `SLOTS` steps behind, a push is dropped: a later one
    carries a newer value anyway.
    """

    SLOTS = 4

    def __init__(self, device: torch.device) -> None:
        self._cuda = device.type == "cuda"
        self._value = 0
        if self._cuda:
            self._buffers = [torch.zeros((), dtype=torch.int64, pin_memory=True) for _ in range(self.SLOTS)]
            self._events = [torch.cuda.Event() for _ in range(self.SLOTS)]
            self._in_flight: deque[int] = deque()
            self._free: deque[int] = deque(range(self.SLOTS))

    def push(self, tensor: torch.Tensor) -> None:
        if not self._cuda:
            self._value = int(tensor)
            return
        self._collect()
        if not self._free:
            return
        slot = self._free.popleft()
        self._buffers[slot].copy_(tensor, non_blocking=True)
        self._events[slot].record()
        self._in_flight.append(slot)

    def _collect(self) -> None:
        while self._in_flight and self._events[self._in_flight[0]].query():
            slot = self._in_flight.popleft()
            self._value = int(self._buffers[slot])
            self._free.append(slot)

    @property
    def value(self) -> int:
        if self._cuda:
            self._collect()
        return self._value


class NonFiniteGuard:
    """Counts non-finite steps (total and consecutive) from each step's gradient norm."""

    def __init__(self, device: torch.device, max_bad_steps: int) -> None:
        self.max_bad_steps = max_bad_steps
        self.consecutive = torch.zeros((), dtype=torch.int64, device=device)
        self.total = torch.zeros((), dtype=torch.int64, device=device)
        self._consecutive_on_host = LaggedValue(device)

    def record(self, grad_norm: torch.Tensor) -> None:
        """Count the step as bad when its gradient norm is not finite (no host synchronisation)."""
        bad = (~torch.isfinite(grad_norm)).to(torch.int64)
        self.consecutive.mul_(bad).add_(bad)  # +1 on a bad step, back to 0 on a good one
        self.total.add_(bad)
        self._consecutive_on_host.push(self.consecutive)

    @property
    def exceeded(self) -> bool:
        """True once the host has seen `max_bad_steps` consecutive non-finite steps."""
        return self._consecutive_on_host.value >= self.max_bad_steps

    def state_dict(self) -> dict:
        return {"total": int(self.total)}

    def load_state_dict(self, state: dict) -> None:
        self.total.fill_(int(state.get("total", 0)))


class LossScale:
    """Dynamic loss scaling for float16 computation: a device scalar the loss is multiplied by, halved after a
    step with non-finite gradients and doubled after `growth_interval` finite ones in a row (GradScaler's rule,
    through its kernel `torch._amp_update_scale_`); the host never reads it during training."""

    def __init__(self, device: torch.device, initial: float = 2.0**16, growth_interval: int = 2000) -> None:
        self.scale = torch.full((), initial, dtype=torch.float32, device=device)
        self.growth_tracker = torch.zeros((), dtype=torch.int32, device=device)
        self.growth_interval = growth_interval

    def update(self, found_inf: torch.Tensor) -> None:
        torch._amp_update_scale_(self.scale, self.growth_tracker, found_inf, 2.0, 0.5, self.growth_interval)

    def state_dict(self) -> dict:
        """GradScaler's keys, so that the checkpoints of earlier versions load."""
        return {"scale": float(self.scale), "_growth_tracker": int(self.growth_tracker)}

    def load_state_dict(self, state: dict) -> None:
        if state:
            self.scale.fill_(state["scale"])
            self.growth_tracker.fill_(state.get("_growth_tracker", 0))


def gradient_norm(gradients: list[torch.Tensor]) -> torch.Tensor:
    """The total 2-norm, accumulated and returned in float32: a float16 norm overflows at 65504, which a
    scaled float16 gradient reaches in its first step."""
    norms = torch._foreach_norm(gradients, 2.0, dtype=torch.float32)
    return torch.linalg.vector_norm(torch.stack(norms))


def takes_device_flags(optimizer: torch.optim.Optimizer) -> bool:
    """Whether the optimizer's step reads a found-inf flag, a gradient scale and tensor learning rates on the
    device (torch's fused Adam/AdamW, which the builder picks on GPUs), so that its kernel skips itself."""
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False))


class SkippingStep:
    """The optimizer step, left out when the gradients are not finite; on GPUs with no host read.

    With an optimizer that takes device flags (`takes_device_flags`) the flag is computed on the device from
    the gradient norm, and its kernel skips the step on it and divides the gradients by the loss scale, in
    float32: any gradient type, no pass over the gradients of its own, no host read. No GradScaler is used:
    its unscale kernel on CUDA takes float32, float64 and float16 gradients only (bfloat16 weights stopped at
    the first step, pytorch/pytorch#127176) and its `unscale_` refuses float16 ones. With other optimizers
    (the CPU's default AdamW, timm's) a loss-scaled gradient is unscaled in place and the host reads the
    flag and leaves the step out: one read per step, which costs nothing on the CPU.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, device: torch.device, loss_scaling: bool) -> None:
        self.on_device = takes_device_flags(optimizer)
        self.loss_scale = LossScale(device) if loss_scaling else None

    def backward(self, loss: torch.Tensor) -> None:
        (loss if self.loss_scale is None else loss * self.loss_scale.scale).backward()

    def gradient_norm(self, parameters: list[torch.nn.Parameter], max_norm: float | None) -> torch.Tensor:
        """The gradients' total norm at their true scale, a float32 device scalar; with `max_norm`, the
        gradients are clipped to it."""
        gradients = [p.grad for p in parameters if p.grad is not None]
        if self.loss_scale is not None and not self.on_device:
            torch._foreach_mul_(gradients, self.loss_scale.scale.double().reciprocal().float())
        norm = gradient_norm(gradients)
        if self.loss_scale is not None and self.on_device:  # the optimizer's kernel divides them by the scale
            norm = norm / self.loss_scale.scale
        if max_norm is not None:
            torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, norm)
        return norm

    def step(self, optimizer: torch.optim.Optimizer, grad_norm: torch.Tensor) -> None:
        found_inf = (~torch.isfinite(grad_norm)).float()
        if self.on_device:
            optimizer.grad_scale = None if self.loss_scale is None else self.loss_scale.scale
            optimizer.found_inf = found_inf
            try:
                optimizer.step()
            finally:
                del optimizer.grad_scale, optimizer.found_inf
        elif not bool(found_inf):
            optimizer.step()
        if self.loss_scale is not None:
            self.loss_scale.update(found_inf)

    def learning_rate(self, value: float | torch.Tensor) -> float | torch.Tensor:
        """A learning rate as the optimizer takes it: a device tensor (float32, the fused kernels' type) where
        its step reads it on the device; elsewhere a float, read on the host."""
        if not torch.is_tensor(value):
            return value
        return value.float() if self.on_device else float(value)

    def state_dict(self) -> dict:
        return {} if self.loss_scale is None else self.loss_scale.state_dict()

    def load_state_dict(self, state: dict) -> None:
        if self.loss_scale is not None:
            self.loss_scale.load_state_dict(state)
