"""`--clamp_u_to_g C`: FastCLIP's normaliser u clamped to within a factor C of the step's mini-batch g.

The reference below is written from docs/algorithm.md's formulas with float64 autograd, not from
fastclip.losses: with u updated for this step and g its mini-batch estimate (both detached),
    n_i = clamp(u_i + eps, g_i / C, g_i * C),   Phi = 1/m * sum_i [g1_i / n1_i + g2_i / n2_i],
and one process's loss is Phi with gradient grad(Phi / 2) for the features (term 1 + term 2, halved).
"""

from __future__ import annotations

import math

import pytest
import torch

from dense_state import dense_table
from test_fastclip_math import BATCH_1, BATCH_2, features, make_objective, run

from fastclip.distributed.env import DistEnv
from fastclip.losses.fastclip import FastCLIPConfig
from fastclip.losses.normaliser import ClampedToBatch

TAU, EPOCH = 0.07, 5  # v1: a constant tau; epoch 5: gamma at its floor


def reference(e1, e2, log_u_before: torch.Tensor, gamma: float, eps: float, factor: float | None):
    """(Phi, dPhi/2 / de1, dPhi/2 / de2, log(u + eps) - log g per anchor and side) of one step."""
    e1, e2 = e1.clone().requires_grad_(), e2.clone().requires_grad_()
    m = e1.shape[0]
    phi, gaps = 0.0, []
    for i in range(m):
        for side, (anchor, candidates) in enumerate(((e1[i], e2), (e2[i], e1))):
            positive = e1[i] @ e2[i]
            g = sum(torch.exp((anchor @ candidates[j] - positive) / TAU) for j in range(m) if j != i) / (m - 1)
            old = log_u_before[i, side].item()
            u = g.item() if not math.isfinite(old) or old < math.log(1e-35) else (1 - gamma) * math.exp(old) + gamma * g.item()
            normaliser = u + eps
            if factor is not None:
                normaliser = min(max(normaliser, g.item() / factor), g.item() * factor)
            gaps.append(abs(math.log(u + eps) - math.log(g.item())))
            phi = phi + g / normaliser / m
    (phi / 2).backward()
    return phi.detach(), e1.grad, e2.grad, gaps


@pytest.mark.parametrize("factor", [None, 1.5, 1.0])
def test_the_step_is_phi_with_the_clamped_normaliser(factor):
    obj = make_objective("v1", clamp_u_to_g=factor)
    run(obj, *features(1), TAU, BATCH_1)  # first visits: u <- g
    obj.on_epoch_start(EPOCH)
    log_u_before = dense_table(obj.state)[BATCH_2]
    e1, e2 = features(2)
    loss, grad1, grad2, _ = run(obj, e1, e2, TAU, BATCH_2)
    phi, ref1, ref2, gaps = reference(e1, e2, log_u_before, obj.gamma, obj.config.fastclip_eps, factor)
    assert torch.allclose(loss, phi, rtol=1e-10)
    assert torch.allclose(grad1, ref1, rtol=1e-9, atol=1e-12) and torch.allclose(grad2, ref2, rtol=1e-9, atol=1e-12)
    if factor is not None:  # the clamp changed some anchors' normaliser, so the comparison says something
        assert any(gap > math.log(factor) + 1e-6 for gap in gaps)


def test_c_1_weighs_as_the_mini_batch_and_a_huge_c_as_the_paper():
    """C = 1: n_i = g_i, the weights of the mini-batch normalisation (as u <- g with gamma 1); C -> inf: the
    paper's step exactly."""
    def second_step(**overrides):
        obj = make_objective("v1", **overrides)
        run(obj, *features(1), TAU, BATCH_1)
        obj.on_epoch_start(EPOCH)
        return run(obj, *features(2), TAU, BATCH_2)

    paper, huge = second_step(), second_step(clamp_u_to_g=1e300)
    assert all(torch.equal(a, b) for a, b in zip(paper[:3], huge[:3]))
    one, fresh = second_step(clamp_u_to_g=1.0), second_step(gamma=1.0, gamma_schedule="constant")
    assert all(torch.allclose(a, b, rtol=1e-12) for a, b in zip(one[:3], fresh[:3]))


def test_u_and_its_update_are_the_papers():
    """The clamp changes the weights, never the stored u."""
    tables = []
    for factor in (None, 1.0):
        obj = make_objective("v3", clamp_u_to_g=factor)
        run(obj, *features(1), TAU, BATCH_1)
        obj.on_epoch_start(EPOCH)
        run(obj, *features(2), TAU, BATCH_2)
        tables.append(dense_table(obj.state))
    assert torch.equal(*tables)


def test_the_flag_reaches_the_objective_through_the_script_and_the_public_api():
    from training.builders import build_objective
    from training.config import Config
    from training.params import parse_args

    from fastclip import FastCLIPLoss

    config = Config.from_args(parse_args(["--dataset-type", "synthetic", "--train-num-samples", "8", "--data_size",
                                          "8", "--fastclip", "--clamp_u_to_g", "2"]))
    assert isinstance(build_objective(config, DistEnv()).normaliser, ClampedToBatch)
    assert isinstance(FastCLIPLoss(8, clamp_u_to_g=2.0, device="cpu").objective.normaliser, ClampedToBatch)


def test_a_factor_below_one_is_refused():
    with pytest.raises(ValueError, match="at least 1"):
        ClampedToBatch(0.5)
    assert FastCLIPConfig(data_size=4, clamp_u_to_g=2.0).clamp_u_to_g == 2.0
