"""One training epoch, the same for every objective: the loop never asks which loss it runs."""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Protocol

import torch

from .guard import NonFiniteGuard, SkippingStep
from ..run.log import LOGGER_NAME, MetricsSink, format_duration
from ..losses.base import Objective
from .optim import clamp_logit_scale, unwrap
from .precision import Precision
from .progress import Progress
from .schedules import LrSchedule, TauLrSchedule

MAX_LOGIT_SCALE = math.log(100.0)
PHASES = ("data", "forward", "objective", "backward", "optimizer")


@dataclass
class StepTimer:
    """Wall time per phase of a step; with `enabled` it synchronises CUDA so GPU time lands in its phase."""

    device: torch.device
    enabled: bool
    totals: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    _last: float = 0.0

    def start(self) -> None:
        self._last = time.perf_counter()

    def lap(self, phase: str) -> None:
        if not self.enabled:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.totals[phase] += now - self._last
        self._last = now

    def reset(self) -> dict[str, float]:
        totals, self.totals = dict(self.totals), defaultdict(float)
        return totals


def _groups(batches: Iterable[dict], size: int) -> Iterator[list[dict]]:
    """Consecutive lists of `size` batches; a shorter last list is dropped, as open_clip_train does."""
    iterator = iter(batches)
    while len(group := list(itertools.islice(iterator, size))) == size:
        yield group


class StepHook(Protocol):
    def after_step(self, progress: Progress) -> bool:
        """Called after every step; True ends the epoch there (the run stops)."""
        ...


@dataclass
class Trainer:
    model: torch.nn.Module  # possibly DDP-wrapped
    objective: Objective
    optimizer: torch.optim.Optimizer
    lr_schedule: LrSchedule
    tau_schedule: TauLrSchedule
    precision: Precision
    device: torch.device
    world_size: int = 1
    grad_clip_norm: float | None = None
    log_every_n_steps: int = 100
    profile: bool = False
    metrics: MetricsSink | None = None
    max_bad_steps: int = 20
    accum_freq: int = 1
    logger: logging.Logger = field(default_factory=lambda: logging.getLogger(LOGGER_NAME))

    def __post_init__(self) -> None:
        self.stepper = SkippingStep(self.optimizer, self.device, self.precision.loss_scaling)
        self.guard = NonFiniteGuard(self.device, self.max_bad_steps)
        self.timer = StepTimer(self.device, self.profile)

    def temperature(self) -> torch.Tensor:
        """The model's tau, a device scalar (read by the host only on a log line)."""
        return 1.0 / unwrap(self.model).logit_scale.detach().exp()

    def set_learning_rates(self, step: int) -> None:
        lr = self.lr_schedule(step)
        tau = self.temperature() if self.tau_schedule.reads_temperature else None
        tau_lr = self.stepper.learning_rate(self.tau_schedule(step, tau))  # a device tensor for step_thresh
        for group in self.optimizer.param_groups:
            group["lr"] = tau_lr if group.get("name") == "temperature" else lr

    def train_step(self, batches: list[dict]) -> dict[str, torch.Tensor]:
        """One optimizer step over `batches` (`--accum-freq` of them, usually one)."""
        inputs = [self._to_device(batch) for batch in batches]
        self.timer.lap("data")
        self.optimizer.zero_grad(set_to_none=True)
        if len(inputs) == 1:
            losses = self.forward(*inputs[0])
            self.stepper.backward(losses["loss"])
        else:
            losses = self._accumulated_forward_backward(inputs)
        self.timer.lap("backward")
        self.guard.record(self.update())
        self.timer.lap("optimizer")
        return {k: v.detach() for k, v in losses.items()}

    def forward(self, images: torch.Tensor, texts: torch.Tensor, index: torch.Tensor) -> dict[str, torch.Tensor]:
        """The model and the objective on a batch already on the device (its per-sample state updated):
        a step's device work before backward."""
        with self.precision.autocast(self.device):
            out = self.model(images, texts)
            self.timer.lap("forward")
            losses = self._losses(out, out["image_features"], out["text_features"], index)
        self.timer.lap("objective")
        return losses

    def update(self) -> torch.Tensor:
        """A step's device work after backward: the gradient norm (clipped to --grad-clip-norm), the optimizer
        step, left out on the device when a gradient is not finite, the logit scale's clamp. Returns the norm."""
        parameters = [p for p in self.model.parameters() if p.grad is not None]
        grad_norm = self.stepper.gradient_norm(parameters, self.grad_clip_norm)
        self.stepper.step(self.optimizer, grad_norm)
        clamp_logit_scale(self.model, MAX_LOGIT_SCALE)
        return grad_norm

    def _to_device(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Images in the model's input type (bf16/fp16 weights take bf16/fp16 images), texts, indices."""
        images = batch["image"].to(self.device, dtype=self.precision.input_dtype, non_blocking=True)
        texts = batch["text"].to(self.device, non_blocking=True)
        return images, texts, batch["index"].to(self.device, non_blocking=True)

    def _losses(self, out: dict, image_features: torch.Tensor, text_features: torch.Tensor,
                index: torch.Tensor) -> dict[str, torch.Tensor]:
        losses = self.objective(image_features, text_features, out["logit_scale"], index, out.get("logit_bias"))
        return {"loss": sum(losses.values()), **losses}

    def _accumulated_forward_backward(self, inputs: list[tuple[torch.Tensor, ...]]) -> dict:
        """open_clip's gradient accumulation: the loss of the whole accumulated batch, its gradient
        computed one micro-batch at a time.

        A first pass without gradient embeds every micro-batch; then each micro-batch is embedded again
        with gradient, its features put in place of its cached ones, and the loss over all of them
        back-propagated. The sum of these backward passes is the gradient of the accumulated batch's
        loss: each micro-batch's features get theirs, and the logit scale (and bias), which every pass
        sees, only in the last (open_clip_train adds it once per micro-batch, N times too much). Under
        DDP the gradients are all-reduced once, in the last backward.
        """
        with torch.no_grad(), self.precision.autocast(self.device):
            cached = [self.model(images, texts) for images, texts, _ in inputs]
        index = torch.cat([i for _, _, i in inputs])
        features = {key: [out[key] for out in cached] for key in ("image_features", "text_features")}
        self.timer.lap("forward")
        for j, (images, texts, _) in enumerate(inputs):
            last = j == len(inputs) - 1
            with self._gradient_sync(last):
                with self.precision.autocast(self.device):
                    out = self.model(images, texts)
                    mixed = {k: torch.cat(parts[:j] + [out[k]] + parts[j + 1:]) for k, parts in features.items()}
                    if not last:  # the logit scale (and bias) get their gradient once, not once per micro-batch
                        out = {k: v.detach() if k not in mixed and torch.is_tensor(v) else v for k, v in out.items()}
                    losses = self._losses(out, mixed["image_features"], mixed["text_features"], index)
                self.stepper.backward(losses["loss"])
        self.timer.lap("objective")
        return losses

    def _gradient_sync(self, enabled: bool):
        """DDP's no_sync for all but the last micro-batch; nothing to do without DDP."""
        no_sync = getattr(self.model, "no_sync", None)
        return contextlib.nullcontext() if enabled or no_sync is None else no_sync()

    def train_epoch(self, loader: Iterable[dict], progress: Progress, steps_per_epoch: int, total_steps: int,
                    hook: StepHook | None = None) -> bool:
        """Train the rest of epoch `progress.epoch` (from `progress.step_in_epoch`), advancing `progress`.

        Returns False when `hook` ended the epoch early. The loader yields the epoch's remaining batches,
        `accum_freq` of them per step.
        """
        self.model.train()
        self.objective.on_epoch_start(progress.epoch)
        batch_size = None
        skipped = 0
        window_start = time.perf_counter()
        window_steps = 0
        self.timer.start()
        for batches in _groups(loader, self.accum_freq):
            if progress.step_in_epoch >= steps_per_epoch:
                break
            self.set_learning_rates(progress.global_step)
            losses = self.train_step(batches)
            batch_size = sum(batch["image"].shape[0] for batch in batches)
            skipped += sum(int(batch.get("skipped", 0)) for batch in batches)
            progress.step()
            window_steps += 1
            last = progress.step_in_epoch == steps_per_epoch
            if progress.step_in_epoch % self.log_every_n_steps == 0 or last:
                elapsed = time.perf_counter() - window_start
                self._log_progress(progress, steps_per_epoch, total_steps, batch_size, losses, elapsed,
                                   window_steps, skipped)
                window_start, window_steps = time.perf_counter(), 0
            if hook is not None and hook.after_step(progress):
                return False
            self.timer.start()
        return True

    def _log_progress(self, progress: Progress, steps_per_epoch: int, total_steps: int, batch_size: int,
                      losses: dict[str, torch.Tensor], elapsed: float, window_steps: int, skipped: int) -> None:
        step_time = elapsed / window_steps
        samples_per_s = batch_size * self.world_size / step_time
        values = {k: float(v) for k, v in losses.items()}
        objective_values = self.objective.log_values()
        values.update(objective_values)
        values.update({
            "epoch": progress.epoch,
            "lr": self.optimizer.param_groups[0]["lr"],
            "samples_per_second": samples_per_s,
            "samples_per_second_per_rank": samples_per_s / self.world_size,
            "skipped_samples": skipped,
            "non_finite_steps": int(self.guard.total),
        })
        if self.objective.learns_model_temperature:  # a frozen one is either unused or the objective's tau
            values["logit_scale"] = float(unwrap(self.model).logit_scale.detach().exp())
        phases = self.timer.reset()
        if phases:
            values.update({f"time_{k}": v / window_steps for k, v in phases.items()})
        step_in_epoch = progress.step_in_epoch
        seen = step_in_epoch * batch_size * self.world_size
        total = steps_per_epoch * batch_size * self.world_size
        eta = format_duration((total_steps - progress.global_step) * step_time)
        terms = " ".join(f"{k}: {values[k]:.5g}" for k in losses)
        extra = " ".join(f"{k}: {v:.4g}" for k, v in objective_values.items())
        scale = f"Logit Scale: {values['logit_scale']:.3f} " if "logit_scale" in values else ""
        timing = " ".join(f"{k}: {1000 * values['time_' + k]:.1f}ms" for k in PHASES if "time_" + k in values)
        self.logger.info(
            f"Train Epoch: {progress.epoch} [{seen:>{len(str(total))}}/{total} ({100 * step_in_epoch / steps_per_epoch:.0f}%)] "
            f"Step time: {step_time:.3f}s, {samples_per_s:.1f} samples/s, {samples_per_s / self.world_size:.1f}/s/rank "
            f"LR: {values['lr']:.6g} {scale}{terms} {extra} "
            f"Skipped: {skipped} Non-finite steps: {values['non_finite_steps']} ETA: {eta} {timing}".rstrip()
        )
        if self.metrics is not None:
            self.metrics.write(progress.global_step, values)
