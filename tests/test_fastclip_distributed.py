"""The central identity: K gloo ranks with local batch b == one process with batch K*b.

Same samples, same initial open_clip model (ViT-Tiny-32px, DDP without device_ids on CPU), same
per-sample state (a first step fills u, the compared second step has gamma < 1): every parameter
gradient, the logit_scale gradient and the per-sample state after the steps agree, for v0..v3 in
float64 and float32. Run with `pytest -s` to see the max relative differences.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from multiprocess import spawn

from dense_state import dense_table
from versions import VERSIONS
from fastclip.distributed import comm
from fastclip.losses.fastclip import FastCLIPConfig, FastCLIPObjective
from fastclip.models import build_model

TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-5}
MODEL = "ViT-Tiny-32px"
N, M = 16, 6  # data size; global batch (K=2: b=3, K=3: b=2)
BATCHES = ([3, 7, 1, 8, 0, 5], [5, 2, 3, 11, 7, 4])  # the second revisits 5, 3, 7
SETTINGS = dict(data_size=N, gamma=0.3, gamma_decay_epochs=4, temperature=0.07, rho=6.5, lr_tau=0.01, beta2=0.98)
# the paper's versions, and v3 with the opt-in normaliser clamp (a factor small enough to bite at step 2)
OBJECTIVES = {**VERSIONS, "v3 clamp_u_to_g": dict(VERSIONS["v3"], clamp_u_to_g=1.05)}




def two_steps(version: str, dtype: torch.dtype, inputs: dict) -> dict:
    """Epoch 0 step then epoch 1 step on this rank's share of each batch; gradients of both and the state."""
    world, rank = comm.world_size(), comm.rank()
    objective = FastCLIPObjective(FastCLIPConfig(**SETTINGS, **OBJECTIVES[version]), "cpu", dtype)
    model = build_model(MODEL).model
    model.load_state_dict(inputs["weights"])
    model.to(dtype).logit_scale.requires_grad_(objective.learns_model_temperature)
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model)
    b = M // world
    mine = slice(rank * b, (rank + 1) * b)
    grads = []
    for epoch, index in enumerate(BATCHES):
        objective.on_epoch_start(epoch)
        images, texts = inputs["images"][epoch][mine].to(dtype), inputs["texts"][epoch][mine]
        out = model(images, texts)
        comm.COUNTER.clear()
        losses = objective(out["image_features"], out["text_features"], out["logit_scale"], torch.tensor(index)[mine])
        sum(losses.values()).backward()
        if world > 1:  # features + index, the state read, the new values; none in backward
            assert comm.COUNTER["all_gather:calls"] == 2 and comm.COUNTER["reduce_scatter:calls"] == 1
            assert sum(v for k, v in comm.COUNTER.items() if k.endswith(":calls")) == 3
        named = model.module.named_parameters() if world > 1 else model.named_parameters()
        grads.append({name: p.grad.clone() for name, p in named if p.grad is not None})
        model.zero_grad(set_to_none=True)
    return {"grads": grads, "state": dense_table(objective.state)}


def run_all(inputs_path: Path, out_path: Path) -> dict:
    inputs = torch.load(inputs_path)
    results = {(v, dtype): two_steps(v, dtype, inputs) for v in OBJECTIVES for dtype in TOLERANCE}
    if comm.rank() == 0:
        torch.save(results, out_path)
    return results


def max_rel_diff(actual: torch.Tensor, expected: torch.Tensor, dim: int | None = None) -> float:
    """max |a - b| / max |b|; per column when dim=0 (the state's columns have different scales).

    Equal entries count as 0 (log u = -inf for a pair never visited); the scale ignores infinities."""
    diff = torch.where(actual == expected, 0.0, actual - expected).abs()
    scale = expected.nan_to_num(posinf=0.0, neginf=0.0).abs()
    if dim is None:
        return (diff.max() / scale.max().clamp_min(1e-30)).item()
    return (diff.amax(dim) / scale.amax(dim).clamp_min(1e-30)).max().item()


def model_grads(grads: dict[str, torch.Tensor]) -> torch.Tensor:
    """All model-parameter gradients but logit_scale's, as one vector."""
    return torch.cat([g.flatten() for name, g in grads.items() if name != "logit_scale"])


@pytest.fixture(scope="module")
def single_process(tmp_path_factory) -> tuple[Path, dict]:
    """Inputs on disk for the ranks, and the one-process results with the global batch."""
    torch.manual_seed(0)  # the model's initialisation
    gen = torch.Generator().manual_seed(0)
    inputs = {
        "weights": build_model(MODEL).model.state_dict(),
        "images": torch.randn(len(BATCHES), M, 3, 32, 32, generator=gen),
        "texts": torch.randint(1, 49408, (len(BATCHES), M, 32), generator=gen),
    }
    path = tmp_path_factory.mktemp("identity") / "inputs.pt"
    torch.save(inputs, path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # like the ranks; tiny ops only lose to thread contention on 2 cores
    try:
        return path, run_all(path, path.with_name("single.pt"))
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("world", [2, 3])
def test_k_ranks_equal_one_process_with_the_global_batch(world, single_process, tmp_path):
    """Model gradients: max |diff| / max |ref| over all parameters together (float32 rounding of
    a single small tensor such as ln_final.bias, summed in another order, reaches ~1e-5 of itself)."""
    inputs_path, expected = single_process
    spawn(world, run_all, inputs_path, tmp_path / "ranks.pt")
    actual = torch.load(tmp_path / "ranks.pt")
    for (version, dtype), ref in expected.items():
        got, tol = actual[(version, dtype)], TOLERANCE[dtype]
        for step, (g, r) in enumerate(zip(got["grads"], ref["grads"])):
            assert g.keys() == r.keys()
            assert ("logit_scale" in r) == (version.split()[0] in ("v0", "v3"))
            model_diff = max_rel_diff(model_grads(g), model_grads(r))
            tau_diff = max_rel_diff(g["logit_scale"], r["logit_scale"]) if "logit_scale" in r else 0.0
            print(f"K={world} {version} {str(dtype):14} step {step}: "
                  f"model grads {model_diff:.2e}, logit_scale grad {tau_diff:.2e}")
            assert model_diff <= tol and tau_diff <= tol
        state_diff = max_rel_diff(got["state"], ref["state"], dim=0)
        print(f"K={world} {version} {str(dtype):14} state {state_diff:.2e}")
        assert state_diff <= tol
