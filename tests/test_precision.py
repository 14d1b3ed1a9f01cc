"""Every open_clip precision name trains on the CPU with its meaning, and says which it was."""

from __future__ import annotations

import json

import pytest
import torch

from device_ops import DeviceOps
from fastclip.losses.openclip import OpenCLIPObjective
from fastclip.models import build_model
from fastclip.train.guard import SkippingStep
from fastclip.train.optim import build_optimizer
from fastclip.train.precision import PRECISIONS, PrecisionError, resolve_precision, slow_on_device
from training.main import main

CPU = torch.device("cpu")
TINY = ["--dataset-type", "synthetic", "--train-num-samples", "8", "--batch-size", "4", "--epochs", "1",
        "--workers", "0", "--model", "ViT-Tiny-32px", "--warmup", "1", "--log-every-n-steps", "1", "--device", "cpu"]


@pytest.mark.parametrize("name, autocast, weights, inputs, scaling", [
    ("fp32", None, "fp32", torch.float32, False),
    ("amp", torch.float16, "fp32", torch.float32, True),
    ("amp_bf16", torch.bfloat16, "fp32", torch.float32, False),
    ("amp_bfloat16", torch.bfloat16, "fp32", torch.float32, False),
    ("bf16", None, "bf16", torch.bfloat16, False),
    ("fp16", None, "fp16", torch.float16, True),
    ("pure_bf16", None, "pure_bf16", torch.bfloat16, False),
    ("pure_fp16", None, "pure_fp16", torch.float16, True),
])
def test_each_name_means_what_open_clip_train_means(name, autocast, weights, inputs, scaling):
    """open_clip_train's table, with loss scaling for float16 weights too (open_clip_train has none there)."""
    precision = resolve_precision(name, CPU)
    assert (precision.autocast_dtype, precision.model_dtype, precision.input_dtype, precision.loss_scaling) == \
        (autocast, weights, inputs, scaling)
    assert precision.describe().startswith(f"{name}: ")


def test_auto_is_float32_on_the_cpu_and_autocast_there_is_flagged_slow():
    assert resolve_precision("auto", CPU).name == "fp32"
    assert slow_on_device(resolve_precision("amp", CPU), CPU) is not None
    assert slow_on_device(resolve_precision("pure_bf16", CPU), CPU) is None
    with pytest.raises(PrecisionError, match="use one of"):
        resolve_precision("fp8", CPU)
    assert set(PRECISIONS) >= {"amp", "amp_bf16", "amp_bfloat16", "bf16", "fp16", "pure_bf16", "pure_fp16", "fp32"}


# the gradients each precision gives (open_clip's bf16/fp16 keep LayerNorm and the logit scale in float32)
GRADIENT_TYPES = {"fp32": {torch.float32}, "amp": {torch.float32}, "amp_bf16": {torch.float32},
                  "amp_bfloat16": {torch.float32}, "bf16": {torch.bfloat16, torch.float32},
                  "fp16": {torch.float16, torch.float32}, "pure_bf16": {torch.bfloat16}, "pure_fp16": {torch.float16}}


def tiny_step(name: str, fused: bool):
    """A tiny model at precision `name` with an AdamW (`fused`, as build_trainer makes it on a GPU) and its
    SkippingStep; `step(images)` runs forward and backward, then the SkippingStep's part with its ops watched."""
    precision = resolve_precision(name, CPU)
    model = build_model("ViT-Tiny-32px", CPU, precision=precision.model_dtype).model
    optimizer = build_optimizer(model, 1e-3, 0.1, (0.9, 0.98), 1e-6, fused=fused)
    stepper = SkippingStep(optimizer, CPU, precision.loss_scaling)
    objective = OpenCLIPObjective(local_loss=False, gather_with_grad=False, rank=0, world_size=1)
    texts = torch.randint(0, 49408, (4, 32))

    def step(images: torch.Tensor) -> DeviceOps:
        optimizer.zero_grad(set_to_none=True)
        with precision.autocast(CPU):
            out = model(images.to(precision.input_dtype), texts)
            loss = objective(out["image_features"], out["text_features"], out["logit_scale"], torch.arange(4))
        stepper.backward(loss["contrastive_loss"])
        with DeviceOps(CPU) as ops:
            stepper.step(optimizer, stepper.gradient_norm(list(model.parameters()), 1.0))
        return ops

    return model, stepper, step


@pytest.mark.parametrize("name", GRADIENT_TYPES)
def test_a_gpu_run_skips_in_the_optimizer_kernel_at_every_precision(name):
    """The step after backward as a GPU run takes it, on the CPU's kernels with real gradients. The fused AdamW
    build_trainer picks on a GPU takes every precision's gradients, bfloat16 ones too, with the found-inf flag
    and (float16 computation) the loss scale; none reaches GradScaler's unscale kernel, whose CUDA version takes
    float32, float64 and float16 only (bf16 and pure_bf16 stopped at the first step), and nothing is read on
    the host. A NaN step leaves every weight as it was and halves the loss scale."""
    model, stepper, step = tiny_step(name, fused=True)
    images = torch.rand(4, 3, 32, 32)
    ops = step(images)
    assert stepper.on_device and ops.syncs == 0, ops.report()
    kernels = [(args, kwargs) for func, args, kwargs in ops.inputs if func is torch.ops.aten._fused_adamw_.default]
    assert {grad.dtype for args, _ in kernels for grad in args[1]} == GRADIENT_TYPES[name]
    assert all(kwargs.get("found_inf") is not None for _, kwargs in kernels)
    assert {kwargs.get("grad_scale") is not None for _, kwargs in kernels} == {resolve_precision(name, CPU).loss_scaling}
    assert ops.calls["aten._amp_foreach_non_finite_check_and_unscale_.default"] == 0
    weights = [p.detach().clone() for p in model.parameters()]
    scale = stepper.state_dict().get("scale")
    step(torch.full_like(images, float("nan")))
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights))
    assert stepper.state_dict().get("scale") == (None if scale is None else scale / 2)


def test_other_optimizers_skip_on_the_host():
    """The CPU's default AdamW takes no flag: the host reads it (free there) and leaves the step out, and a
    float16 gradient is unscaled in place before its norm is measured."""
    model, stepper, step = tiny_step("pure_fp16", fused=False)
    images = torch.rand(4, 3, 32, 32)
    assert not stepper.on_device and step(images).syncs == 1
    weights, scale = [p.detach().clone() for p in model.parameters()], stepper.state_dict()["scale"]
    step(torch.full_like(images, float("nan")))
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights))
    assert stepper.state_dict()["scale"] == scale / 2


@pytest.mark.parametrize("precision, fastclip", [
    ("amp", False), ("bf16", False), ("fp16", False), ("pure_bf16", True), ("pure_fp16", False),
])
def test_training_runs_and_records_its_precision(tmp_path, precision, fastclip):
    """The first step used to fail with 'Input type (FloatTensor) and weight type (BFloat16)'."""
    extra = ["--fastclip", "--data_size", "8", "--temperature_scheme", "individual_learnable"] if fastclip else []
    main([*TINY, *extra, "--precision", precision, "--logs", str(tmp_path), "--name", "run"])
    run = tmp_path / "run"
    params = json.loads((run / "params.json").read_text())
    assert params["precision"] == precision
    assert params["precision_effective"] == resolve_precision(precision, CPU).describe()
    assert f"precision {params['precision_effective']}" in (run / "out.log").read_text()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    checkpoint = torch.load(run / "checkpoints" / "epoch_1.pt", weights_only=True)
    assert checkpoint["config"]["precision_effective"] == params["precision_effective"]
    weights = {v.dtype for v in checkpoint["state_dict"].values() if v.is_floating_point()}
    low = resolve_precision(precision, CPU).input_dtype
    expected = {"amp": {torch.float32}, "pure_bf16": {low}, "pure_fp16": {low}}.get(precision, {low, torch.float32})
    assert weights == expected  # bf16/fp16: open_clip keeps LayerNorm and the logit scale in float32
    if precision == "amp":  # float16 autocast with loss scaling: the scaler's state is saved
        assert checkpoint["scaler"]["scale"] > 1


def test_fastclip_state_stays_float32_with_pure_bf16_weights(tmp_path):
    from fastclip.losses.fastclip import FastCLIPConfig, FastCLIPObjective

    objective = FastCLIPObjective(FastCLIPConfig(temperature_scheme="global_learnable", data_size=8, gamma=0.2,
                                                 gamma_schedule="cosine", gamma_decay_epochs=1, temperature=0.07,
                                                 rho=6.5, fastclip_eps=1e-14, multiply_tau=True, lr_tau=1e-3,
                                                 beta1=0.9, beta2=0.98, eps=1e-6), CPU)
    features = torch.nn.functional.normalize(torch.randn(2, 4, 16), dim=-1).to(torch.bfloat16).requires_grad_()
    losses = objective(features[0], features[1], torch.tensor(14.0, dtype=torch.bfloat16), torch.arange(4))
    assert all(v.dtype == torch.float32 for v in losses.values())
    assert objective.per_sample.table.dtype == torch.float32
    sum(losses.values()).backward()
    assert features.grad.dtype == torch.bfloat16 and torch.isfinite(features.grad).all()
