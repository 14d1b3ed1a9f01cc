"""FastCLIP-v0..v3 against a direct float64 transcription of the published update rules.

`Published` below keeps the reference's per-pair arrays in Python floats and applies the published
formulas literally, with no stabilisation (float64 holds exp(200) at tau = 0.01):
- v0, v1, v3: u <- (1 - gamma) u + gamma g on the true u; the weight is g / (u + eps) and v3's tau term
  is log(u);
- v2: u kept on the scale of a running bound c, weight g_c / (u_c + eps), its Adam step on tau;
and builds the model loss from those values with autograd (features get grad(Phi / 2), a global tau
dPhi/dtau). Several steps over epochs with gamma = 1 and gamma < 1, revisits (one while gamma = 1),
pairs whose u falls below 1e-35 (the bad-value rule), a tau going down to 0.01, eps large enough to
matter; on one process and on 2 gloo ranks, to 1e-9 relative. Planted bugs must be caught.
"""

from __future__ import annotations

import math

import pytest
import torch
from multiprocess import spawn

from dense_state import dense_table
from versions import VERSIONS
from fastclip.distributed import comm
from fastclip.losses import moving_average, temperature
from fastclip.losses.fastclip import FastCLIPConfig, FastCLIPObjective

N, M, DIM = 14, 6, 16
SETTINGS = dict(data_size=N, gamma=0.2, gamma_schedule="cosine", gamma_decay_epochs=3, temperature=0.05,
                rho=6.5, lr_tau=0.02, beta1=0.9, beta2=0.98, eps=1e-8)
# (epoch, model tau, batch indices, aligned pairs): revisits in every step after the first; the second
# step revisits at gamma = 1; aligned pairs at tau 0.01 push u below 1e-35.
STEPS = [
    (0, 0.05, [3, 7, 1, 8, 0, 5], False),
    (0, 0.03, [5, 2, 3, 11, 7, 4], False),
    (1, 0.02, [7, 13, 5, 1, 9, 2], False),
    (2, 0.01, [2, 5, 12, 3, 6, 7], True),
    (3, 0.01, [5, 12, 2, 10, 6, 3], False),
    (4, 0.015, [3, 5, 7, 12, 2, 0], True),
]
TOLERANCE = 1e-9
EPS_CASES = {"eps 1e-14": 1e-14, "eps 1e-6": 1e-6}


def step_features(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    e1 = torch.randn(M, DIM, generator=gen, dtype=torch.float64)
    noise = torch.randn(M, DIM, generator=gen, dtype=torch.float64)
    if STEPS[step][3]:  # aligned: near-orthogonal pairs with p ~ 1, so d ~ -(p - s) / tau ~ -90 at 0.01
        e1 = torch.eye(M, DIM, dtype=torch.float64) + 0.02 * e1
    e1 = torch.nn.functional.normalize(e1, dim=-1)
    e2 = torch.nn.functional.normalize(e1 + (0.02 if STEPS[step][3] else 2.0) * noise, dim=-1)
    return e1, e2


class Published:
    """The per-pair arrays of the reference (index -> value, per side 1/2) and its update rules."""

    def __init__(self, version: str, eps: float) -> None:
        self.cfg = FastCLIPConfig(**SETTINGS, **VERSIONS[version], fastclip_eps=eps)
        self.individual = version == "v2"
        self.u = {side: [0.0] * N for side in (1, 2)}
        self.bound = {side: [0.0] * N for side in (1, 2)}
        self.tau = {side: [self.cfg.temperature] * N for side in (1, 2)}
        self.m = {side: [0.0] * N for side in (1, 2)}
        self.v = {side: [0.0] * N for side in (1, 2)}

    @staticmethod
    def differences(e1, e2, i: int, side: int, tau: float) -> list[float]:
        p = float(e1[i] @ e2[i])
        sims = [float(e1[i] @ e2[j]) if side == 1 else float(e1[j] @ e2[i]) for j in range(len(e1)) if j != i]
        return [(s - p) / tau for s in sims]

    def gamma(self, epoch: int) -> float:
        cfg = self.cfg
        if epoch == 0:
            return 1.0
        if epoch >= cfg.gamma_decay_epochs:
            return cfg.gamma
        return cfg.gamma + (1 - cfg.gamma) * 0.5 * (1 + math.cos(math.pi * epoch / cfg.gamma_decay_epochs))

    def step(self, e1, e2, index: list[int], model_tau: float, epoch: int) -> dict:
        """Update the arrays; return the loss and its gradients (features, model tau) by autograd."""
        gamma, m = self.gamma(epoch), len(index)
        pre_tau = {side: [self.tau[side][s] for s in index] for side in (1, 2)}
        shift_of = {}  # (i, side) -> (c used in the weight, u used in the weight)
        for i, s in enumerate(index):
            for side in (1, 2):
                tau = pre_tau[side][i] if self.individual else model_tau
                d = self.differences(e1, e2, i, side, tau)
                u = self.u[side][s]
                bad = not math.isfinite(u) or u < 1e-35
                if self.individual:
                    c, c_new = self.bound[side][s], max(self.bound[side][s], max(d))
                    g = sum(math.exp(x - c_new) for x in d) / (m - 1)
                    u_new = g if bad else (1 - gamma) * u * math.exp(c - c_new) + gamma * g
                    self._adam(s, side, i, d, c_new, u_new, pre_tau[side][i], epoch)
                    self.bound[side][s] = c_new
                else:
                    c_new = 0.0
                    g = sum(math.exp(x) for x in d) / (m - 1)
                    u_new = g if bad else (1 - gamma) * u + gamma * g
                self.u[side][s] = u_new
                shift_of[i, side] = (c_new, u_new)
        return self._loss(e1, e2, index, model_tau, pre_tau, shift_of)

    def _adam(self, s, side, i, d, c_new, u_new, tau, epoch) -> None:
        cfg, m1 = self.cfg, len(d)
        grad = (-sum(math.exp(x - c_new) * x for x in d) / m1 / (u_new + cfg.fastclip_eps)
                + math.log(u_new + cfg.fastclip_eps) + c_new + cfg.rho)
        grad = min(max(grad, -5.0), 5.0)
        beta1, beta2 = (0.0, 0.0) if epoch == 0 else (cfg.beta1, cfg.beta2)
        self.m[side][s] = beta1 * self.m[side][s] + (1 - beta1) * grad
        self.v[side][s] = beta2 * self.v[side][s] + (1 - beta2) * grad**2
        m_hat = self.m[side][s] / (1 - beta1 ** (epoch + 1))
        v_hat = self.v[side][s] / (1 - beta2 ** (epoch + 1))
        self.tau[side][s] = min(max(tau - cfg.lr_tau * m_hat / (math.sqrt(v_hat) + cfg.eps), 0.01), 1.0)

    def _loss(self, e1, e2, index, model_tau, pre_tau, shift_of) -> dict:
        cfg, m = self.cfg, len(index)
        e1, e2 = e1.clone().requires_grad_(), e2.clone().requires_grad_()
        tau_leaf = torch.tensor(model_tau, dtype=torch.float64, requires_grad=True)
        phi, log_u = 0.0, 0.0
        for i in range(m):
            p = e1[i] @ e2[i]
            for side in (1, 2):
                tau = pre_tau[side][i] if self.individual else tau_leaf
                c, u = shift_of[i, side]
                sims = [e1[i] @ e2[j] if side == 1 else e1[j] @ e2[i] for j in range(m) if j != i]
                g = sum(torch.exp((sim - p) / tau - c) for sim in sims) / (m - 1)
                phi = phi + g / (u + cfg.fastclip_eps)
                log_u = log_u + math.log(u) + c
        phi = phi / m
        total = tau_leaf.detach() * phi + cfg.rho * tau_leaf + tau_leaf * log_u / m / 2 if cfg.multiply_tau else phi
        total.backward()
        learns_tau = cfg.temperature_scheme == "global_learnable"
        return {"loss": total.detach(), "e1": e1.grad / 2, "e2": e2.grad / 2,
                "tau": tau_leaf.grad if learns_tau else None}

    def table(self, columns: list[str]) -> dict[str, list[float]]:
        """The arrays under the objective's column names (v0/v1/v3: log of the true u)."""
        values = {}
        for side in (1, 2):
            values[f"log_u{side}"] = [math.log(u) if u > 0 else -math.inf for u in self.u[side]]
            values[f"u{side}"], values[f"bound{side}"] = self.u[side], self.bound[side]
            values[f"tau{side}"], values[f"exp_avg{side}"], values[f"exp_avg_sq{side}"] = (
                self.tau[side], self.m[side], self.v[side])
        return {name: values[name] for name in columns}


def run_objective(version: str, eps: float) -> list[dict]:
    """Every step on this rank's share of the batch: loss (mean over ranks), gradients of the whole
    batch as DDP would average them, and the dense state after the step."""
    world, rank = comm.world_size(), comm.rank()
    objective = FastCLIPObjective(FastCLIPConfig(**SETTINGS, **VERSIONS[version], fastclip_eps=eps), "cpu",
                                  torch.float64)
    b = M // world
    mine = slice(rank * b, (rank + 1) * b)
    results = []
    for step, (epoch, model_tau, index, _) in enumerate(STEPS):
        objective.on_epoch_start(epoch)
        e1, e2 = (t[mine].clone().requires_grad_() for t in step_features(step))
        tau_leaf = torch.tensor(model_tau, dtype=torch.float64, requires_grad=True)
        total = sum(objective(e1, e2, 1.0 / tau_leaf, torch.tensor(index[mine])).values())
        total.backward()
        grads = [comm.all_gather_no_grad(g / world) for g in (e1.grad, e2.grad)]
        tau_grad = None if tau_leaf.grad is None else comm.all_reduce_sum(tau_leaf.grad.reshape(1)) / world
        results.append({"loss": comm.all_reduce_sum(total.detach().reshape(1)) / world, "e1": grads[0],
                        "e2": grads[1], "tau": tau_grad, "state": dense_table(objective.state)})
    return results, objective.columns


def compare(version: str, eps: float, results: list[dict], columns: list[str]) -> None:
    published = Published(version, eps)
    for step, ((epoch, model_tau, index, _), got) in enumerate(zip(STEPS, results)):
        want = published.step(*step_features(step), index, model_tau, epoch)
        for key in ("loss", "e1", "e2", "tau"):
            if want[key] is None:
                assert got[key] is None, f"step {step}: the model's tau must get no gradient"
                continue
            scale = want[key].abs().max().item()
            error = (got[key].reshape(want[key].shape) - want[key]).abs().max().item()
            assert error <= TOLERANCE * scale, f"step {step} {key}: {error:.3e} vs scale {scale:.3e}"
        visited = sorted({s for _, _, batch, _ in STEPS[: step + 1] for s in batch})
        for k, (name, values) in enumerate(published.table(columns).items()):
            for s in visited:
                ours, ref = got["state"][s, k].item(), values[s]
                assert abs(ours - ref) <= TOLERANCE * max(1.0, abs(ref)), f"step {step} {name}[{s}]: {ours} != {ref}"


def bad_rule_fired() -> bool:
    """The scenario reaches the bad-value rule: some revisited true u is below 1e-35 (v0)."""
    published = Published("v0", 1e-14)
    low = False
    for step, (epoch, model_tau, index, _) in enumerate(STEPS):
        low = low or any(published.u[side][s] < 1e-35 and s in STEPS[step - 1][2]
                         for side in (1, 2) for s in index if step)
        published.step(*step_features(step), index, model_tau, epoch)
    return low


def test_the_scenario_reaches_the_cases_that_matter():
    assert bad_rule_fired()
    published, smallest = Published("v0", 1e-14), math.inf
    for step, (epoch, model_tau, index, _) in enumerate(STEPS):
        published.step(*step_features(step), index, model_tau, epoch)
        smallest = min([smallest] + [published.u[side][s] for side in (1, 2) for s in index])
    assert smallest < 1e-14, "eps must matter against some updated u"


@pytest.mark.parametrize("eps", EPS_CASES.values(), ids=EPS_CASES.keys())
@pytest.mark.parametrize("version", VERSIONS)
def test_one_process_follows_the_published_rules(version, eps):
    compare(version, eps, *run_objective(version, eps))


def _ranks(out: str) -> None:
    results = {(v, eps): run_objective(v, eps) for v in VERSIONS for eps in EPS_CASES.values()}
    if comm.rank() == 0:
        torch.save(results, out)


def test_two_gloo_ranks_follow_the_published_rules(tmp_path):
    spawn(2, _ranks, str(tmp_path / "ranks.pt"))
    for (version, eps), (results, columns) in torch.load(tmp_path / "ranks.pt").items():
        compare(version, eps, results, columns)


# ---- planted bugs: each must make the comparison fail -------------------------------------------------


ORIGINAL_UPDATE = moving_average.LogMovingAverage.update


def _eps_scaled_by_bound(self, old, differences, mask, gamma, batch_size, eps):
    """The former stabilisation: eps added to u on the scale of a bound c = max(0, max_j d), i.e.
    g / (u + eps * e^c)."""
    estimate = ORIGINAL_UPDATE(self, old, differences, mask, gamma, batch_size, eps)
    bound = differences.detach().masked_fill(~mask, -math.inf).amax(dim=-1).clamp_min(0.0)
    return estimate._replace(shift=torch.logaddexp(estimate.fields["log_u"], math.log(eps) + bound))


def _no_bad_value_rule(monkeypatch):
    monkeypatch.setattr(moving_average, "LOG_BAD_U_BELOW", -math.inf)
    monkeypatch.setattr(moving_average, "BAD_U_BELOW", 0.0)


def _post_update_tau_in_term2(monkeypatch):
    original = FastCLIPObjective.__call__

    def call(self, *args):
        self.scheme.gathered_tau = lambda shared, model_tau, m: shared[0].T + 1e-3
        return original(self, *args)

    monkeypatch.setattr(FastCLIPObjective, "__call__", call)


def _tau_step_nudged(monkeypatch):
    original = temperature.IndividualTemperature.step

    def step(self, old, differences, mask, estimate, batch_size, epoch):
        new = original(self, old, differences, mask, estimate, batch_size, epoch)
        return {**new, "tau": new["tau"] * (1 + 1e-6)}

    monkeypatch.setattr(temperature.IndividualTemperature, "step", step)


def _gamma_on_the_wrong_side(monkeypatch):
    original = FastCLIPObjective.on_epoch_start

    def on_epoch_start(self, epoch):
        original(self, epoch)
        self.gamma = 1.0 - self.gamma if 0.0 < self.gamma < 1.0 else self.gamma

    monkeypatch.setattr(FastCLIPObjective, "on_epoch_start", on_epoch_start)


PLANTED = {
    "eps scaled by the bound (v3)": ("v3", lambda mp: mp.setattr(moving_average.LogMovingAverage, "update",
                                                                  _eps_scaled_by_bound)),
    "no bad-value rule (v0)": ("v0", _no_bad_value_rule),
    "term 2 with another tau (v2)": ("v2", _post_update_tau_in_term2),
    "tau step off by 1e-6 (v2)": ("v2", _tau_step_nudged),
    "1 - gamma for gamma (v1)": ("v1", _gamma_on_the_wrong_side),
}


@pytest.mark.parametrize("bug", PLANTED)
def test_a_planted_bug_is_caught(bug, monkeypatch):
    version, plant = PLANTED[bug]
    plant(monkeypatch)
    with pytest.raises(AssertionError):  # eps 1e-6: eps * e^c differs from eps by more than 1e-9 relative
        compare(version, 1e-6, *run_objective(version, 1e-6))
