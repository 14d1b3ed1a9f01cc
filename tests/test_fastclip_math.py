"""FastCLIP in one process: state layout, the bad-value rule, range, precision, resume, schedules.

The references below are written from docs/fastclip-algorithm.md with loops and Python floats, not
from fastclip.losses.
"""

from __future__ import annotations

import math

import pytest
import torch

from dense_state import dense_table, load_dense
from versions import VERSIONS

from fastclip.losses.fastclip import FastCLIPConfig, FastCLIPObjective, regime_warnings
from fastclip.train.schedules import TauLrSchedule, gamma_at_epoch

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


# ---- tests (the published update rules over several steps: test_reference_transcription.py) ----------


@pytest.mark.parametrize("version", VERSIONS)
def test_state_layout_is_the_references_width(version):
    """2 floats per pair for v0, v1, v3 (log u per side) and 10 for v2 (u, bound, tau, Adam m and v)."""
    obj = make_objective(version, dtype=torch.float32)
    assert obj.state.columns == (10 if version == "v2" else 2)
    assert obj.state.table.element_size() * obj.state.columns == (40 if version == "v2" else 8)


def test_bad_stored_u_is_replaced_by_g():
    """log u of nan, +inf, -inf (u = 0) or below log(1e-35) is a bad value: u becomes g."""
    obj = make_objective("v0")
    obj.on_epoch_start(5)
    col = {name: k for k, name in enumerate(obj.columns)}
    log_u = math.log(0.4)
    state = torch.full((N, len(obj.columns)), log_u, dtype=torch.float64)
    bad = {(3, "log_u1"): math.nan, (3, "log_u2"): math.inf, (7, "log_u1"): math.log(1e-36),
           (7, "log_u2"): -math.inf}
    for (s, name), value in bad.items():
        state[s, col[name]] = value
    load_dense(obj.state, state)
    e1, e2 = features(2)
    run(obj, e1, e2, 0.07, BATCH_1)
    after = dense_table(obj.state)
    for i, s in enumerate(BATCH_1):
        for side in (1, 2):
            p = float(e1[i] @ e2[i])
            sims = [float(e1[i] @ e2[j]) if side == 1 else float(e1[j] @ e2[i]) for j in range(6) if j != i]
            g = sum(math.exp((x - p) / 0.07) for x in sims) / 5
            expected = g if (s, f"log_u{side}") in bad else (1 - obj.gamma) * 0.4 + obj.gamma * g
            assert math.exp(after[s, col[f"log_u{side}"]].item()) == pytest.approx(expected, rel=1e-12)


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
        visited = dense_table(obj.state)[sorted(set(BATCH_1) | set(index))]  # never-visited: log u = -inf
        assert all(torch.isfinite(t).all() for t in [loss, *grads, visited])


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


def test_log_values_report_gamma_and_the_batchs_tau_spread():
    """v2: mean, min, median, max of the step's per-sample taus and the share at the 0.01 floor."""
    obj = make_objective("v2")
    obj.on_epoch_start(2)
    obj.state.table[BATCH_1[:2], obj.columns.index("tau1")] = 0.01  # two at the floor before the step
    run(obj, *features(0), 0.07, BATCH_1)
    taus = dense_table(obj.state)[BATCH_1][:, [obj.columns.index("tau1"), obj.columns.index("tau2")]].flatten()
    assert obj.log_values() == pytest.approx({
        "gamma": gamma_at_epoch(2, 0.3, "cosine", 4), "tau": taus.mean().item(), "tau_min": taus.min().item(),
        "tau_median": taus.median().item(), "tau_max": taus.max().item(),
        "tau_at_floor": (taus <= 0.01 + 1e-8).float().mean().item()})
    assert obj.log_values()["tau_min"] < obj.log_values()["tau_max"]


def test_log_values_of_a_global_tau_are_its_value():
    obj = make_objective("v3")
    run(obj, *features(0), 0.07, BATCH_1)
    assert obj.log_values() == pytest.approx({"gamma": 1.0, "tau": 0.07})


def _true_log_u(obj) -> torch.Tensor:
    """(N, 2) log u of both sides from the dense table, whichever way the version stores u."""
    table, col = dense_table(obj.state), {name: k for k, name in enumerate(obj.columns)}
    if "log_u1" in col:
        return table[:, [col["log_u1"], col["log_u2"]]]
    return torch.log(table[:, [col["u1"], col["u2"]]]) + table[:, [col["bound1"], col["bound2"]]]


@pytest.mark.parametrize("version", VERSIONS)
def test_g_over_u_compares_the_revisited_anchors_g_with_their_u(version):
    """Step 2 (gamma 1, so u becomes g) revisits 5, 3, 7 of step 1: g_over_u is the mean over them and
    both sides of g / (u before the step), g_over_u_typical its geometric mean; first visits do not count."""
    obj = make_objective(version)
    run(obj, *features(0), 0.07, BATCH_1)
    assert "g_over_u" not in obj.log_values()  # nothing was visited before step 1
    before = _true_log_u(obj)
    run(obj, *features(1), 0.07, BATCH_2)
    revisited = [i for i in BATCH_2 if i in BATCH_1]
    log_ratios = (_true_log_u(obj)[revisited] - before[revisited]).flatten().tolist()
    values = obj.log_values()
    assert values["g_over_u"] == pytest.approx(sum(map(math.exp, log_ratios)) / 6, rel=1e-9)
    assert values["g_over_u_typical"] == pytest.approx(math.exp(sum(log_ratios) / 6), rel=1e-9)
    assert values["g_over_u_typical"] < values["g_over_u"]  # AM-GM: the ratios differ
    if version == "v0":  # g itself, from the definition
        e1, e2 = features(1)
        log_g = [math.log(sum(math.exp(((a[k] * b[j]).sum() - (a[k] * b[k]).sum()).item() / 0.07)
                              for j in range(6) if j != k) / 5)
                 for k in (BATCH_2.index(i) for i in revisited) for a, b in ((e1, e2), (e2, e1))]
        expected = math.exp(sum(log_g) / 6 - before[revisited].mean().item())
        assert values["g_over_u_typical"] == pytest.approx(expected, rel=1e-9)


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


def test_tau_lr_step_thresh_follows_tau_at_every_step():
    """1/3 of the base rate at every step whose tau is <= 0.03, back to the base rate above it; decided where
    tau is, compared as the host compares a float whatever tau's type."""
    schedule = TauLrSchedule("step_thresh", base_lr=2e-4, warmup_steps=10, total_steps=100)
    taus = [0.07, 0.0301, 0.03, 0.02, 0.05, 0.03, 0.031]
    expected = [2e-4, 2e-4, 2e-4 / 3, 2e-4 / 3, 2e-4, 2e-4 / 3, 2e-4]  # no warmup
    rates = [schedule(step, torch.tensor(tau, dtype=torch.float64)) for step, tau in enumerate(taus)]
    assert [float(rate) for rate in rates] == pytest.approx(expected, rel=1e-15)
    above = torch.tensor(0.03, dtype=torch.bfloat16)  # 0.030029...: compared in bfloat16, 0.03 would round to it
    below = torch.tensor(0.03, dtype=torch.float32)  # 0.0299999993
    assert (float(schedule(0, above)), float(schedule(0, below))) == pytest.approx((2e-4, 2e-4 / 3), rel=1e-15)


def test_runs_too_short_for_u_or_the_temperature_are_warned_about():
    v3 = FastCLIPConfig(data_size=10, multiply_tau=True, lr_tau=2e-4, gamma_decay_epochs=1)
    one_epoch = regime_warnings(v3, epochs=1, total_steps=450)
    assert len(one_epoch) == 2 and one_epoch[0].startswith("--epochs 1: gamma is 1 in epoch 0")
    assert "--lr_tau 0.0002 x 450 steps = 0.09: the temperature can change by a factor of about 1.09" in one_epoch[1]
    no_decay = regime_warnings(FastCLIPConfig(data_size=10, gamma_decay_epochs=8), epochs=8, total_steps=100_000)
    assert no_decay == ["--gamma_decay_epochs 8 >= --epochs 8: gamma never reaches --gamma 0.2 (last epoch: 0.23), so "
                        "each u averages few visits and FastCLIP stays close to the mini-batch loss; the default "
                        "decays over half the epochs"]
    long_run = FastCLIPConfig(data_size=3_000_000, gamma_decay_epochs=16)
    assert regime_warnings(long_run, epochs=32, total_steps=10_000) == []
    constant_tau = FastCLIPConfig(data_size=10, temperature_scheme="global_constant", gamma_decay_epochs=2)
    assert regime_warnings(constant_tau, epochs=4, total_steps=10) == []  # v1 learns no temperature


def test_a_long_memory_of_u_on_small_data_is_warned_about():
    """Up to 42,000 pairs for tens of epochs at gamma below 0.5: where the map found u's memory costing recall."""
    small = regime_warnings(FastCLIPConfig(data_size=2_000, gamma_decay_epochs=15), epochs=30, total_steps=10_000)
    assert len(small) == 1 and small[0].startswith("--data_size 2000 pairs x 30 epochs at --gamma 0.2: ")
    mapped = regime_warnings(FastCLIPConfig(data_size=41_660, gamma_decay_epochs=10), epochs=20, total_steps=10_000)
    assert len(mapped) == 1 and "41,660 pairs x 20 epochs" in mapped[0]  # the largest size the map found trailing
    for config, epochs in ((FastCLIPConfig(data_size=2_000, gamma=0.5, gamma_decay_epochs=15), 30),
                           (FastCLIPConfig(data_size=2_000, gamma=1.0, gamma_schedule="constant"), 30),
                           (FastCLIPConfig(data_size=2_000, gamma_decay_epochs=15, clamp_u_to_g=2.0), 30),
                           (FastCLIPConfig(data_size=2_000, gamma_decay_epochs=2), 4),
                           (FastCLIPConfig(data_size=50_000, gamma_decay_epochs=15), 30)):
        assert regime_warnings(config, epochs, total_steps=10_000) == []
