"""FastCLIP in one process against brute force: naive Phi with autograd, and the spec's update rules.

The references below are written from docs/fastclip-algorithm.md with loops and Python floats, not
from fastclip.losses.functional.
"""

from __future__ import annotations

import math

import pytest
import torch

from dense_state import dense_table, load_dense

from fastclip.losses.fastclip import FastCLIPConfig, FastCLIPObjective
from fastclip.schedules import TauLrSchedule, gamma_at_epoch

VERSIONS = {
    "v0": dict(temperature_scheme="global_learnable"),
    "v1": dict(temperature_scheme="global_constant"),
    "v2": dict(temperature_scheme="individual_learnable"),
    "v3": dict(temperature_scheme="global_learnable", multiply_tau=True),
}
N, DIM = 12, 5
BATCH_1 = [3, 7, 1, 8, 0, 5]
BATCH_2 = [5, 2, 3, 11, 7, 4]  # revisits 5, 3, 7; first visits 2, 11, 4
SETTINGS = dict(
    data_size=N, gamma=0.3, gamma_schedule="cosine", gamma_decay_epochs=4, temperature=0.07,
    rho=6.5, lr_tau=0.01, beta1=0.9, beta2=0.98, eps=1e-8,
)


def make_objective(version: str, dtype=torch.float64, **overrides) -> FastCLIPObjective:
    return FastCLIPObjective(FastCLIPConfig(**{**SETTINGS, **VERSIONS[version], **overrides}), "cpu", dtype)


def features(seed: int, m: int = 6, dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    e1, e2 = (torch.nn.functional.normalize(torch.randn(m, DIM, generator=gen, dtype=dtype), dim=-1) for _ in range(2))
    return e1, e2


def run(obj, e1, e2, tau: float, index: list[int], autocast: bool = False):
    """One objective step (its forward under CPU bf16 autocast if asked, backward outside, like the
    engine); returns (total loss, dL/de1, dL/de2, dL/dtau or None)."""
    e1, e2 = e1.clone().requires_grad_(), e2.clone().requires_grad_()
    tau_leaf = torch.tensor(tau, dtype=e1.dtype, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        total = sum(obj(e1, e2, 1.0 / tau_leaf, torch.tensor(index)).values())
    total.backward()
    return total.detach(), e1.grad, e2.grad, tau_leaf.grad


def assert_rel(actual: torch.Tensor, expected: torch.Tensor, tol: float) -> None:
    scale = expected.abs().max().clamp_min(1e-300)
    assert (actual - expected).abs().max() <= tol * scale, f"{actual} != {expected}"


# ---- the spec, transcribed ------------------------------------------------------------------------


def anchor_differences(e1, e2, i: int, side: int, tau: float) -> list[float]:
    """d1_ij = (<e1_i, e2_j> - p_i) / tau1_i and d2_ij = (<e1_j, e2_i> - p_i) / tau2_i, j != i."""
    p = float(e1[i] @ e2[i])
    pairs = [(e1[i], e2[j]) if side == 1 else (e1[j], e2[i]) for j in range(len(e1)) if j != i]
    return [(float(a @ b) - p) / tau for a, b in pairs]


def spec_u_update(d: list[float], u: float, c: float, gamma: float) -> tuple[float, float, float]:
    """Steps 1-3 of the spec: (new bound, g, new u); a bad stored u is replaced by g."""
    c_new = max(c, max(d))
    g = sum(math.exp(x - c_new) for x in d) / len(d)
    bad = not math.isfinite(u) or u < 1e-35
    return c_new, g, g if bad else (1 - gamma) * u * math.exp(c - c_new) + gamma * g


def spec_tau_update(d, c_new, u_new, tau, m1, v1, cfg: FastCLIPConfig, epoch: int):
    """Steps 4-5 of the spec (v2): (new tau, new m, new v)."""
    eps = cfg.fastclip_eps
    grad = -sum(math.exp(x - c_new) * x for x in d) / len(d) / (u_new + eps) + math.log(u_new + eps) + c_new + cfg.rho
    grad = min(max(grad, -5.0), 5.0)
    beta1, beta2 = (0.0, 0.0) if epoch == 0 else (cfg.beta1, cfg.beta2)
    m1 = beta1 * m1 + (1 - beta1) * grad
    v1 = beta2 * v1 + (1 - beta2) * grad**2
    m_hat, v_hat = m1 / (1 - beta1 ** (epoch + 1)), v1 / (1 - beta2 ** (epoch + 1))
    return min(max(tau - cfg.lr_tau * m_hat / (math.sqrt(v_hat) + cfg.eps), 0.01), 1.0), m1, v1


def spec_state_after(obj, before: torch.Tensor, e1, e2, tau: float, index: list[int]) -> torch.Tensor:
    """The per-sample table after one step, one anchor and one side at a time."""
    col = {name: k for k, name in enumerate(obj.columns)}
    after = before.clone()
    for i, s in enumerate(index):
        for side in (1, 2):
            row = before[s].tolist()
            tau_i = row[col[f"tau{side}"]] if obj.individual else tau
            d = anchor_differences(e1, e2, i, side, tau_i)
            c_new, _, u_new = spec_u_update(d, row[col[f"u{side}"]], row[col[f"bound{side}"]], obj.gamma)
            after[s, col[f"u{side}"]], after[s, col[f"bound{side}"]] = u_new, c_new
            if obj.individual:
                m1, v1 = row[col[f"exp_avg{side}"]], row[col[f"exp_avg_sq{side}"]]
                new_tau, m1, v1 = spec_tau_update(d, c_new, u_new, tau_i, m1, v1, obj.config, obj.epoch)
                after[s, col[f"tau{side}"]], after[s, col[f"exp_avg{side}"]] = new_tau, m1
                after[s, col[f"exp_avg_sq{side}"]] = v1
    return after


def naive_loss(obj, e1, e2, tau: torch.Tensor, before: torch.Tensor, after: torch.Tensor, index: list[int]):
    """Phi on the global batch with autograd (v3: tau_bar * Phi + rho * tau + tau * mean log u / 2).

    u is the unscaled updated u = u_stored * exp(bound); v2 uses each anchor's pre-update tau.
    """
    col = {name: k for k, name in enumerate(obj.columns)}
    m, eps = len(index), obj.config.fastclip_eps
    phi, log_u = 0.0, 0.0
    for i, s in enumerate(index):
        p = e1[i] @ e2[i]
        for side in (1, 2):
            tau_i = before[s, col[f"tau{side}"]] if obj.individual else tau
            u = after[s, col[f"u{side}"]] * torch.exp(after[s, col[f"bound{side}"]])
            sims = [e1[i] @ e2[j] if side == 1 else e1[j] @ e2[i] for j in range(m) if j != i]
            g = sum(torch.exp((sim - p) / tau_i) for sim in sims) / (m - 1)
            phi = phi + g / (eps + u)
            log_u = log_u + torch.log(u)
    phi = phi / m
    if obj.config.multiply_tau:
        return tau.detach() * phi + obj.config.rho * tau + tau * log_u / m / 2
    return phi


def reference(obj, e1, e2, tau: float, index: list[int], before: torch.Tensor):
    """(state after, loss, dL/de1, dL/de2, dL/dtau) by the transcription and naive autograd.

    Features get half of the naive gradient (grad(Phi / 2)); tau gets all of it (dPhi/dtau).
    """
    after = spec_state_after(obj, before, e1, e2, tau, index)
    e1, e2 = e1.clone().requires_grad_(), e2.clone().requires_grad_()
    tau_leaf = torch.tensor(tau, dtype=e1.dtype, requires_grad=True)
    loss = naive_loss(obj, e1, e2, tau_leaf, before, after, index)
    loss.backward()
    tau_grad = tau_leaf.grad if obj.learns_model_temperature else None
    return after, loss.detach(), e1.grad / 2, e2.grad / 2, tau_grad


def check_step(obj, e1, e2, tau: float, index: list[int]) -> None:
    before = dense_table(obj.state)
    expected = reference(obj, e1, e2, tau, index, before)
    loss, g1, g2, g_tau = run(obj, e1, e2, tau, index)
    after = dense_table(obj.state)
    torch.testing.assert_close(after, expected[0], rtol=1e-9, atol=1e-12)
    assert_rel(loss, expected[1], 1e-9)
    assert_rel(g1, expected[2], 1e-6)
    assert_rel(g2, expected[3], 1e-6)
    if obj.learns_model_temperature:
        assert_rel(g_tau, expected[4], 1e-6)
    else:
        assert g_tau is None, "the model's logit_scale must get no gradient"
    print(f"loss {loss.item():.6g}, max |dL/de1 - ref| {(g1 - expected[2]).abs().max().item():.2e}")


# ---- tests ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
def test_two_steps_match_brute_force_and_spec_updates(version):
    obj = make_objective(version)
    check_step(obj, *features(0), tau=0.07, index=BATCH_1)  # epoch 0: gamma 1, u set to g
    obj.on_epoch_start(2)
    assert 0.3 < obj.gamma < 1.0
    check_step(obj, *features(1), tau=0.05, index=BATCH_2)  # nonzero state, gamma < 1


@pytest.mark.parametrize("version", VERSIONS)
def test_scaled_u_follows_the_unscaled_rule(version):
    """u_stored * exp(bound) follows u <- (1 - gamma) u + gamma g of the unscaled g (spec, GCL section)."""
    obj = make_objective(version)
    run(obj, *features(0), 0.07, BATCH_1)
    obj.on_epoch_start(3)
    before = dense_table(obj.state)
    e1, e2 = features(1)
    run(obj, e1, e2, 0.07, BATCH_2)
    after = dense_table(obj.state)
    col = {name: k for k, name in enumerate(obj.columns)}
    for i, s in enumerate(BATCH_2):
        if s not in BATCH_1:
            continue
        for side in (1, 2):
            tau = before[s, col[f"tau{side}"]].item() if obj.individual else 0.07
            g = sum(math.exp(x) for x in anchor_differences(e1, e2, i, side, tau)) / (len(BATCH_2) - 1)
            u_old = before[s, col[f"u{side}"]].item() * math.exp(before[s, col[f"bound{side}"]].item())
            u_new = after[s, col[f"u{side}"]].item() * math.exp(after[s, col[f"bound{side}"]].item())
            assert u_new == pytest.approx((1 - obj.gamma) * u_old + obj.gamma * g, rel=1e-10)


def test_bad_stored_u_is_replaced_by_g():
    obj = make_objective("v0")
    obj.on_epoch_start(5)
    col = {name: k for k, name in enumerate(obj.columns)}
    state = torch.full((N, len(obj.columns)), 0.4, dtype=torch.float64)
    bad = {(3, "u1"): math.nan, (3, "u2"): math.inf, (7, "u1"): 1e-40, (7, "u2"): -1.0}
    for (s, name), value in bad.items():
        state[s, col[name]] = value
    load_dense(obj.state, state)
    e1, e2 = features(2)
    run(obj, e1, e2, 0.07, BATCH_1)
    after = dense_table(obj.state)
    for i, s in enumerate(BATCH_1):
        for side in (1, 2):
            c_new, g, _ = spec_u_update(anchor_differences(e1, e2, i, side, 0.07), 0.4, 0.4, obj.gamma)
            expected = g if (s, f"u{side}") in bad else (1 - obj.gamma) * 0.4 * math.exp(0.4 - c_new) + obj.gamma * g
            assert after[s, col[f"u{side}"]].item() == pytest.approx(expected, rel=1e-12)


def adversarial_features(m: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    """Positives opposite (p = -1), half of the negatives aligned (+1): d = 2 / tau = 200 at tau 0.01."""
    axis = torch.zeros(DIM)
    axis[0] = 1.0
    signs = torch.tensor([1.0] * (m // 2) + [-1.0] * (m - m // 2))[:, None]
    noise = 1e-3 * torch.randn(2, m, DIM, generator=torch.Generator().manual_seed(0))
    e1 = torch.nn.functional.normalize(signs * axis + noise[0], dim=-1)
    e2 = torch.nn.functional.normalize(-signs * axis + noise[1], dim=-1)
    return e1, e2


@pytest.mark.parametrize("version", VERSIONS)
def test_tau_001_with_adversarial_features_stays_finite_in_float32(version):
    e1, e2 = adversarial_features()
    assert ((e1 @ e2.T - (e1 * e2).sum(1, keepdim=True)) / 0.01).max() > 88.8  # exp overflows float32
    obj = make_objective(version, dtype=torch.float32, temperature=0.01)
    for epoch, index in [(0, BATCH_1), (1, BATCH_2)]:
        obj.on_epoch_start(epoch)
        loss, g1, g2, g_tau = run(obj, e1, e2, 0.01, index)
        grads = [g1, g2] + ([g_tau] if obj.learns_model_temperature else [])
        assert all(torch.isfinite(t).all() for t in [loss, *grads, dense_table(obj.state)])


def test_math_runs_in_float32_under_autocast():
    e1, e2 = features(3, dtype=torch.float32)
    plain = run(make_objective("v0", dtype=torch.float32), e1, e2, 0.07, BATCH_1)
    autocast = run(make_objective("v0", dtype=torch.float32), e1, e2, 0.07, BATCH_1, autocast=True)
    assert autocast[0].dtype == torch.float32
    for a, b in zip(autocast, plain):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("version", ["v2", "v3"])
def test_resume_from_state_dict_is_exact(version):
    first = make_objective(version)
    run(first, *features(0), 0.07, BATCH_1)
    second = make_objective(version)
    second.load_state_dict(first.state_dict())
    load_dense(second.state, dense_table(first.state))
    for obj in (first, second):
        obj.on_epoch_start(1)
    results = [run(obj, *features(1), 0.07, BATCH_2)[:3] for obj in (first, second)]
    for a, b in zip(*results):
        assert torch.equal(a, b)
    assert torch.equal(dense_table(first.state), dense_table(second.state))
    with pytest.raises(ValueError, match="columns"):
        make_objective("v0" if version == "v2" else "v2").load_state_dict(first.state_dict())


def test_log_values_report_gamma_and_mean_tau():
    obj = make_objective("v2")
    obj.on_epoch_start(2)
    run(obj, *features(0), 0.07, BATCH_1)
    taus = dense_table(obj.state)[BATCH_1][:, [obj.columns.index("tau1"), obj.columns.index("tau2")]]
    assert obj.log_values() == pytest.approx({"gamma": gamma_at_epoch(2, 0.3, "cosine", 4), "tau": taus.mean().item()})


def test_config_rejects_multiply_tau_without_a_learnable_global_tau():
    with pytest.raises(ValueError, match="multiply_tau"):
        FastCLIPConfig(data_size=N, temperature_scheme="individual_learnable", multiply_tau=True)


# ---- schedules --------------------------------------------------------------------------------------


@pytest.mark.parametrize("decay_epochs", [4, 18])
def test_gamma_schedules(decay_epochs):
    gmin, half = 0.2, decay_epochs // 2
    cosine = [gamma_at_epoch(e, gmin, "cosine", decay_epochs) for e in (0, 1, half, decay_epochs, decay_epochs + 1)]
    cos1 = gmin + (1 - gmin) * 0.5 * (1 + math.cos(math.pi / decay_epochs))
    assert cosine == pytest.approx([1.0, cos1, gmin + (1 - gmin) / 2, gmin, gmin])
    constant = [gamma_at_epoch(e, gmin, "constant", decay_epochs) for e in (0, 1, half, decay_epochs, decay_epochs + 1)]
    assert constant == pytest.approx([1.0, gmin, gmin, gmin, gmin])


def test_tau_lr_step_thresh_drops_once_tau_reaches_003_and_stays():
    schedule = TauLrSchedule("step_thresh", base_lr=2e-4, warmup_steps=10, total_steps=100)
    assert schedule(0, tau=0.07) == pytest.approx(2e-4)  # no warmup
    assert schedule(1, tau=0.0301) == pytest.approx(2e-4)
    assert schedule(2, tau=0.03) == pytest.approx(2e-4 / 3)
    assert schedule(3, tau=0.05) == pytest.approx(2e-4 / 3)
    resumed = TauLrSchedule("step_thresh", base_lr=2e-4, warmup_steps=10, total_steps=100)
    resumed.load_state_dict(schedule.state_dict())
    assert resumed(4, tau=0.05) == pytest.approx(2e-4 / 3)
