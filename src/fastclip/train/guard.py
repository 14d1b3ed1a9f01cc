"""Non-finite steps: skipped on the device, counted on the device, read by the host a step late.

A step whose gradients hold NaN or inf never reaches the weights (`SkippingStep`). The gradients are
all-reduced before the check, so every rank skips the same steps. The per-sample state of such a step is not stored either (see
`ShardedState.store`). Counting happens in device tensors; the host learns the count of consecutive
bad steps through a non-blocking copy that it reads once it has arrived, so no step waits for the GPU.
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


class SkippingStep:
    """The optimizer step, left out when the gradients are not finite; no host synchronisation on GPUs.

    On CUDA (and whenever fp16 needs loss scaling) the step goes through a `torch.amp.GradScaler`:
    its unscale finds non-finite gradients on the device and the fused AdamW skips itself on that flag.
    The scale stays at 1 unless fp16 loss scaling is on. On the CPU reading a flag costs nothing, so the
    step is simply not called, and no scaler pass over the gradients is spent. Float16 weights
    (`float16_weights`) have float16 gradients, which a GradScaler cannot unscale: their step is checked
    on the host, as on the CPU.
    """

    def __init__(self, device: torch.device, loss_scaling: bool, float16_weights: bool = False) -> None:
        self.loss_scaling = loss_scaling
        usable = not float16_weights and (loss_scaling or device.type == "cuda")
        self.scaler = torch.amp.GradScaler(device.type, init_scale=2.0**16 if loss_scaling else 1.0) \
            if usable else None

    def backward(self, loss: torch.Tensor) -> None:
        (loss if self.scaler is None else self.scaler.scale(loss)).backward()

    def unscale(self, optimizer: torch.optim.Optimizer) -> None:
        """Gradients at their true scale (before clipping or measuring them)."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer, grad_norm: torch.Tensor) -> None:
        if self.scaler is None:
            if bool(torch.isfinite(grad_norm)):
                optimizer.step()
            return
        self.scaler.step(optimizer)
        self.scaler.update(None if self.loss_scaling else 1.0)

    def state_dict(self) -> dict:
        return {} if self.scaler is None else self.scaler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)
