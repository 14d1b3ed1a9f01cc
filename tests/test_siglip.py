"""The SigLIP objective: open_clip's SigLipLoss against the formula, on K gloo ranks, and in training.

Distributed identity (b = local batch, n = K*b, L = open_clip's loss of the whole batch of n on one
process, L_r = rank r's loss): rank r scores its b images against all n texts and divides by b, so
sum_r L_r = (n / b) L = K L. Hence DDP's average of the parameter gradients, (1/K) sum_r dL_r/dtheta,
is dL/dtheta exactly; the mean of the ranks' losses is L; and a rank's feature gradients, which gather
every rank's loss through the neighbour exchange, are K times dL/d(its slice of the features).
"""

from __future__ import annotations

import math
from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F
from multiprocess import spawn

from fastclip.distributed import comm
from fastclip.losses.siglip import SIGLIP_MODEL_KWARGS, SigLIPObjective
from fastclip.models import register_model_configs

MODEL = "ViT-Tiny-32px"
N = 6  # global batch: 3 per rank at K=2, 2 per rank at K=3
TOLERANCE = 1e-10  # float64


def siglip_model(dtype: torch.dtype = torch.float64) -> torch.nn.Module:
    register_model_configs()
    model = open_clip.create_model_and_transforms(MODEL, output_dict=True, **SIGLIP_MODEL_KWARGS)[0]
    return model.to(dtype)


def batch(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, 32, 32, generator=gen, dtype=torch.float64)
    return images, torch.randint(1, 49408, (n, 32), generator=gen)


def brute_force(x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """-(1/n) sum_ij log sigmoid(z_ij (s <x_i, y_j> + b)), z = +1 for i == j and -1 otherwise, pair by pair."""
    n = x.shape[0]
    total = sum(F.logsigmoid((1 if i == j else -1) * (scale * torch.dot(x[i], y[j]) + bias))
                for i in range(n) for j in range(n))
    return -total.sum() / n


def test_loss_and_gradients_match_the_sigmoid_formula():
    torch.manual_seed(0)
    model = siglip_model()
    assert model.logit_scale.item() == pytest.approx(math.log(10)) and model.logit_bias.item() == -10
    with torch.no_grad():
        model.logit_bias.fill_(-2.0)  # positives and negatives both weigh in the gradients
        out = model(*batch(5, seed=1))
    keys = ("image_features", "text_features", "logit_scale", "logit_bias")
    leaves = [out[k].detach().requires_grad_() for k in keys]
    objective = SigLIPObjective(rank=0, world_size=1)
    losses = objective(*leaves[:3], torch.arange(5), leaves[3])
    assert list(losses) == ["contrastive_loss"]
    got = torch.autograd.grad(losses["contrastive_loss"], leaves)
    expected_loss = brute_force(*leaves)
    expected = torch.autograd.grad(expected_loss, leaves)
    torch.testing.assert_close(losses["contrastive_loss"], expected_loss, rtol=1e-12, atol=0)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-14)
    assert objective.log_values() == {"logit_bias": -2.0}


def test_a_model_without_logit_bias_is_refused():
    x = F.normalize(torch.randn(4, 8), dim=-1)
    with pytest.raises(ValueError, match="SIGLIP_MODEL_KWARGS"):
        SigLIPObjective(rank=0, world_size=1)(x, x, torch.tensor(10.0), torch.arange(4))


def step(inputs: dict) -> dict:
    """One forward/backward of this rank's share of the global batch: loss, parameter and feature gradients."""
    world, rank = comm.world_size(), comm.rank()
    model = siglip_model()
    model.load_state_dict(inputs["weights"])
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model)
    mine = slice(rank * N // world, (rank + 1) * N // world)
    out = model(inputs["images"][mine], inputs["texts"][mine])
    for key in ("image_features", "text_features"):
        out[key].retain_grad()
    loss = SigLIPObjective(rank, world)(out["image_features"], out["text_features"], out["logit_scale"],
                                        torch.arange(N)[mine], out["logit_bias"])["contrastive_loss"]
    loss.backward()
    named = model.module.named_parameters() if world > 1 else model.named_parameters()
    return {"loss": loss.detach(), "grads": {name: p.grad for name, p in named},
            "features": {k: out[k].grad for k in ("image_features", "text_features")}}


def ranks(inputs_path: Path, out_dir: Path) -> None:
    torch.save(step(torch.load(inputs_path)), out_dir / f"rank{comm.rank()}.pt")


@pytest.fixture(scope="module")
def global_batch(tmp_path_factory) -> tuple[Path, dict]:
    """Inputs on disk for the ranks, and one process's step over the whole batch."""
    torch.manual_seed(0)
    images, texts = batch(N, seed=2)
    inputs = {"weights": siglip_model().state_dict(), "images": images, "texts": texts}
    path = tmp_path_factory.mktemp("siglip") / "inputs.pt"
    torch.save(inputs, path)
    return path, step(inputs)


@pytest.mark.parametrize("world", [2, 3])  # K=2 takes open_clip's one-way exchange, K=3 its bidirectional one
def test_ddp_gradients_equal_the_global_batch_gradient(world, global_batch, tmp_path):
    inputs_path, expected = global_batch
    spawn(world, ranks, inputs_path, tmp_path)
    got = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    torch.testing.assert_close(sum(g["loss"] for g in got) / world, expected["loss"], rtol=TOLERANCE, atol=0)
    for name, ref in expected["grads"].items():  # DDP averaged these; logit_scale and logit_bias included
        for rank_result in got:
            torch.testing.assert_close(rank_result["grads"][name], ref, rtol=TOLERANCE,
                                       atol=TOLERANCE * ref.abs().max())
    for key, ref in expected["features"].items():
        per_rank = torch.cat([g["features"][key] for g in got])
        torch.testing.assert_close(per_rank, world * ref, rtol=TOLERANCE, atol=TOLERANCE * ref.abs().max())


def test_training_steps_lower_the_loss():
    torch.manual_seed(0)
    model = siglip_model(torch.float32)
    images, texts = batch(16, seed=3)
    images = images.float()
    objective = SigLIPObjective(rank=0, world_size=1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(8):
        out = model(images, texts)
        loss = objective(out["image_features"], out["text_features"], out["logit_scale"], torch.arange(16),
                         out["logit_bias"])["contrastive_loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
