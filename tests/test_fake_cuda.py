"""The GPU step without a GPU: every objective at every precision on a fake CUDA device.

FakeTensorMode gives this machine a `cuda` device whose tensors carry shapes, types and devices but no
data. The model (a real open_clip model from the project's configs, moved there), the objective and the
trainer are built as the training script builds them for `--device cuda`; then two steps run with every
dispatched op watched (tests/device_ops.py): the learning rates (v3's seed command decides step_thresh
from the temperature), the model forward and the objective with its per-sample state (fetch and
store), and, with gradients of the weights' types put in place of backward's, the gradient norm, the
optimizer step with its non-finite skip and loss scale, and the logit scale's clamp. None of it may read
a tensor on the host, copy between host and device, hold a tensor off the GPU or run an op whose output
shape depends on the data: each of those would make the host wait for the GPU in every step.

Not run here: backward (the autograd engine needs a real device), the copy of the batch to the device
(`Trainer._to_device`, non-blocking from pinned memory), the non-finite counter's copy to the host
(`guard.LaggedValue`, non-blocking, read once its CUDA event has completed), DDP's gradient all-reduce
(one rank), and log lines, which read values on the host by design every --log-every-n-steps.
"""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from conftest import SEED_COMMANDS, scaled
from device_ops import DeviceOps
from fastclip.distributed import DistEnv
from fastclip.train.engine import Trainer
from fastclip.train.precision import PRECISIONS, resolve_precision
from fastclip.train.progress import StepPlan
from training.builders import build_model_of, build_objective, build_trainer
from training.config import Config
from training.params import parse_args

CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)
BATCH, DATA_SIZE = 8, 64
SIGLIP = [w for w in SEED_COMMANDS["openclip"] if w not in ("--local-loss", "--gather-with-grad")] + ["--siglip"]
OBJECTIVES = {
    "OpenCLIP": SEED_COMMANDS["openclip"],
    "SigLIP": SIGLIP,
    **{f"FastCLIP-{v}": SEED_COMMANDS[f"fastclip-{v}"] for v in ("v0", "v1", "v2", "v3")},
}
aten = torch.ops.aten
FUSED_ADAMW = (aten._fused_adamw_.default, aten._fused_adamw_.tensor_lr)


def config_of(objective: str, precision: str) -> Config:
    """The seed command of `objective` on a tiny model, synthetic data and `--device cuda`, without --profile
    (per-phase times synchronise the GPU after each phase by design)."""
    argv = scaled(OBJECTIVES[objective], model="ViT-Tiny-32px", batch_size=BATCH, data_size=DATA_SIZE,
                  dataset_type="synthetic", train_num_samples=DATA_SIZE, precision=precision, device="cuda",
                  workers=0, warmup=1)
    at = argv.index("--train-data")
    return Config.from_args(parse_args([w for w in argv[:at] + argv[at + 2:] if w != "--profile"]))


def fake_cuda_trainer(objective: str, precision_name: str, fake: FakeTensorMode) -> Trainer:
    """The trainer `--device cuda` builds, on `fake`'s cuda: a real model built here, then moved there."""
    config = config_of(objective, precision_name)
    precision = resolve_precision(precision_name, CUDA)
    model = build_model_of(config, CPU, precision).model
    env = DistEnv(device=CUDA)
    with fake:
        model = model.to(CUDA)
        objective = build_objective(config, env)
        return build_trainer(config, env, model, objective, precision, StepPlan.of_epoch(100, 1, 1))


def watched_steps(objective: str, precision: str, steps: int = 2) -> tuple[DeviceOps, Trainer]:
    """`steps` device steps of the trainer on fake CUDA (all but backward), their ops watched."""
    overwrite = torch.__future__.get_overwrite_module_params_on_conversion()
    torch.__future__.set_overwrite_module_params_on_conversion(True)  # module.to() makes fake parameters
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    try:
        trainer = fake_cuda_trainer(objective, precision, fake)
        with fake:
            images = torch.randn(BATCH, 3, 32, 32, device=CUDA, dtype=trainer.precision.input_dtype)
            texts = torch.randint(0, 49408, (BATCH, 32), device=CUDA)
            index = torch.arange(BATCH, device=CUDA)
            parameters = [p for p in trainer.model.parameters() if p.requires_grad]
            with DeviceOps(CUDA) as ops:
                for step in range(steps):
                    trainer.set_learning_rates(step)
                    trainer.forward(images, texts, (index + step * BATCH // 2) % DATA_SIZE)  # the 2nd revisits
                    for p in parameters:
                        p.grad = torch.zeros_like(p)  # what backward leaves: the weight's type
                    trainer.update()
    finally:
        torch.__future__.set_overwrite_module_params_on_conversion(overwrite)
    return ops, trainer


def check_step(objective: str, precision: str) -> None:
    ops, trainer = watched_steps(objective, precision)
    assert ops.syncs == 0 and not ops.findings, ops.report()
    matmuls = [args for func, args, _ in ops.inputs if func in (aten.mm.default, aten.addmm.default)]
    compute = trainer.precision.autocast_dtype or trainer.precision.input_dtype
    assert matmuls and {args[-1].dtype for args in matmuls} >= {compute}  # autocast engaged, weights' type
    # the optimizer step is the fused kernel, which skips itself on a found-inf flag and divides by the loss
    # scale (float16 computation) on the device; GradScaler's unscale kernel never runs, as its CUDA version
    # takes float32, float64 and float16 gradients only (bf16 and pure_bf16 stopped at the first step)
    assert trainer.stepper.on_device
    steps = [kwargs for func, _, kwargs in ops.inputs if func in FUSED_ADAMW]
    assert len(steps) >= 2 * len(trainer.optimizer.param_groups)
    assert all(kwargs.get("found_inf") is not None for kwargs in steps)
    assert {kwargs.get("grad_scale") is not None for kwargs in steps} == {trainer.precision.loss_scaling}
    assert ops.calls["aten._amp_foreach_non_finite_check_and_unscale_.default"] == 0


@pytest.fixture
def bf16_gpu(monkeypatch):
    """The fake device answers torch's two probes of the GPU as a bfloat16-capable one does: torch.autocast
    asks them (and turns itself off without a GPU) and so does --precision's bf16 check; nothing else does."""
    monkeypatch.setattr(torch.cuda.amp.common, "amp_definitely_not_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)


# every objective at the GPU default (auto: amp_bf16), and the seed's v3 command at every precision name
FAST = [(objective, "auto") for objective in OBJECTIVES] + [("FastCLIP-v3", p) for p in PRECISIONS if p != "auto"]


@pytest.mark.parametrize("objective, precision", FAST)
def test_a_gpu_step_never_waits_for_the_gpu(objective, precision, bf16_gpu):
    check_step(objective, precision)


@pytest.mark.parametrize("objective, precision",
                         [(o, p) for o in OBJECTIVES for p in PRECISIONS if (o, p) not in FAST])
def test_nor_at_any_other_objective_and_precision(objective, precision, bf16_gpu):
    check_step(objective, precision)
