"""Every open_clip precision name trains on the CPU with its meaning, and says which it was."""

from __future__ import annotations

import json

import pytest
import torch

from fastclip.train.guard import SkippingStep
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
    ("fp16", None, "fp16", torch.float16, False),
    ("pure_bf16", None, "pure_bf16", torch.bfloat16, False),
    ("pure_fp16", None, "pure_fp16", torch.float16, False),
])
def test_each_name_means_what_open_clip_train_means(name, autocast, weights, inputs, scaling):
    precision = resolve_precision(name, CPU)
    assert (precision.autocast_dtype, precision.model_dtype, precision.input_dtype, precision.grad_scaler) == \
        (autocast, weights, inputs, scaling)
    assert precision.describe().startswith(f"{name}: ")


def test_auto_is_float32_on_the_cpu_and_autocast_there_is_flagged_slow():
    assert resolve_precision("auto", CPU).name == "fp32"
    assert slow_on_device(resolve_precision("amp", CPU), CPU) is not None
    assert slow_on_device(resolve_precision("pure_bf16", CPU), CPU) is None
    with pytest.raises(PrecisionError, match="use one of"):
        resolve_precision("fp8", CPU)
    assert set(PRECISIONS) >= {"amp", "amp_bf16", "amp_bfloat16", "bf16", "fp16", "pure_bf16", "pure_fp16", "fp32"}


def test_float16_weights_never_go_through_a_grad_scaler():
    """GradScaler refuses to unscale float16 gradients: fp16 weights step without one, on any device."""
    assert SkippingStep(CPU, loss_scaling=True, float16_weights=False).scaler is not None
    assert SkippingStep(CPU, loss_scaling=False, float16_weights=True).scaler is None
    assert resolve_precision("pure_fp16", CPU).float16_weights and resolve_precision("fp16", CPU).float16_weights
    assert not resolve_precision("pure_bf16", CPU).float16_weights


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
