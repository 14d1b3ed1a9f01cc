"""--accum-freq: N micro-batches per optimizer step give the gradient of one batch N times larger,
on one process and under DDP (2 gloo ranks, gradients all-reduced once per step)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from multiprocess import spawn

from fastclip.distributed import DistEnv, comm
from fastclip.models import ModelOptions, build_model
from fastclip.train.precision import resolve_precision
from fastclip.train.progress import StepPlan
from training.builders import build_objective, build_trainer
from training.config import Config
from training.main import main
from training.params import parse_args

MODEL = "ViT-Tiny-32px"
MICRO, ACCUM = 3, 2  # micro-batch size and micro-batches per step


def make_inputs(world: int, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    n = MICRO * ACCUM * world
    bundle = build_model(MODEL)
    texts = bundle.tokenizer([f"a photo of thing {i}" for i in range(n)])
    return {"images": torch.rand(n, 3, 32, 32), "texts": texts, "index": torch.arange(n),
            "weights": {k: v.clone() for k, v in bundle.model.state_dict().items()}}


def step_gradients(loss_flags: list[str], accum_freq: int, inputs: dict) -> dict[str, torch.Tensor]:
    """One optimizer step on this rank's share of the inputs; the gradients it applied."""
    rank, world = comm.rank(), comm.world_size()
    args = parse_args(["--dataset-type", "synthetic", "--train-num-samples", "64", "--model", MODEL,
                       "--accum-freq", str(accum_freq), "--batch-size", str(MICRO * ACCUM // accum_freq),
                       "--warmup", "1", *loss_flags])
    env = DistEnv(rank=rank, world_size=world)
    config = Config.from_args(args)
    bundle = build_model(MODEL, temperature=config.model.temperature,
                         options=ModelOptions.from_record(dataclasses.asdict(config.model)))
    bundle.model.load_state_dict(inputs["weights"], strict=False)  # SigLIP's logit_bias keeps its init
    trainer = build_trainer(config, env, bundle.model, build_objective(config, env),
                            resolve_precision("fp32", env.device), StepPlan.of_epoch(8, args.accum_freq, args.epochs))
    share = slice(rank * MICRO * ACCUM, (rank + 1) * MICRO * ACCUM)
    local = {k: inputs[k][share] for k in ("images", "texts", "index")}
    size = MICRO * ACCUM // accum_freq
    batches = [{"image": local["images"][i:i + size], "text": local["texts"][i:i + size],
                "index": local["index"][i:i + size]} for i in range(0, MICRO * ACCUM, size)]
    trainer.train_step(batches)
    return {name: p.grad.clone() for name, p in bundle.model.named_parameters() if p.grad is not None}


def assert_same_gradients(got: dict, want: dict) -> None:
    assert got.keys() == want.keys() and len(got) > 10
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("loss_flags", [[], ["--siglip"]], ids=["openclip", "siglip"])
def test_accumulated_step_has_the_large_batch_gradient(loss_flags):
    inputs = make_inputs(world=1)
    assert_same_gradients(step_gradients(loss_flags, ACCUM, inputs), step_gradients(loss_flags, 1, inputs))


def test_openclip_fixed_temperature_trains_the_same_loss_without_the_scale():
    """`--temperature_scheme global_constant` on OpenCLIP freezes the logit scale and nothing else: the other
    gradients are the learnable-temperature run's, bit for bit up to float rounding."""
    inputs = make_inputs(world=1)
    learnt = step_gradients([], 1, inputs)
    fixed = step_gradients(["--temperature_scheme", "global_constant"], 1, inputs)
    assert "logit_scale" in learnt and "logit_scale" not in fixed
    assert_same_gradients(fixed, {name: grad for name, grad in learnt.items() if name != "logit_scale"})


def _ranks_gradients(loss_flags: list[str], inputs: dict, out: str) -> None:
    accumulated = step_gradients(loss_flags, ACCUM, inputs)
    whole = step_gradients(loss_flags, 1, inputs)
    if comm.rank() == 0:
        torch.save({"accumulated": accumulated, "whole": whole}, out)


@pytest.mark.parametrize("loss_flags", [[], ["--siglip"]], ids=["openclip", "siglip"])
def test_accumulation_under_ddp_matches_the_unaccumulated_step(tmp_path, loss_flags):
    """2 ranks x 2 micro-batches of 3 == 2 ranks x one batch of 6: DDP syncs only in the last backward."""
    out = tmp_path / "grads.pt"
    spawn(2, _ranks_gradients, loss_flags, make_inputs(world=2), str(out))
    grads = torch.load(out, weights_only=True)
    assert_same_gradients(grads["accumulated"], grads["whole"])


def test_accum_freq_counts_optimizer_steps(tmp_path):
    """64 samples in batches of 8 with --accum-freq 2: 4 optimizer steps per epoch, each of 16 samples."""
    main(["--dataset-type", "synthetic", "--train-num-samples", "64", "--batch-size", "8", "--accum-freq", "2",
          "--epochs", "2", "--workers", "0", "--model", MODEL, "--warmup", "2", "--log-every-n-steps", "1",
          "--logs", str(tmp_path), "--name", "accum"])
    records = [json.loads(line) for line in (tmp_path / "accum" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 9))
    assert records[-1]["lr"] == pytest.approx(5e-4 * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * 5 / 6)).item()))
    log = (tmp_path / "accum" / "out.log").read_text()
    assert "[64/64 (100%)]" in log  # samples seen: steps x batch x accum-freq
