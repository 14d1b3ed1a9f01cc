"""The public loss API (fastclip.FastCLIPLoss, ...): versions by name with the paper's settings, the
optimizer's groups and v3's temperature lr, state dicts that continue a run exactly and refuse another
run's state, per-rank shards read back on other numbers of gloo ranks, and FSDP2 training as DDP does."""

from __future__ import annotations

import copy
import io
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from multiprocess import spawn

from dense_state import dense_table
from fastclip import FastCLIPLoss, OpenCLIPLoss, create_loss
from fastclip.distributed import comm
from fastclip.models import build_model

N = 23  # data size, not a multiple of the ranks
DIM = 8


def features(seed: int, index: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(len(index), DIM, generator=g), dim=-1).requires_grad_()
    text = F.normalize(torch.randn(len(index), DIM, generator=g), dim=-1).requires_grad_()
    return image, text, torch.tensor(index)


def step(loss_fn, seed: int, index: list[int], logit_scale: torch.Tensor) -> tuple[float, list[torch.Tensor]]:
    image, text, idx = features(seed, index)
    loss = loss_fn(image, text, logit_scale, idx)
    loss.backward()
    return loss.item(), [image.grad, text.grad]


def saved(state: dict) -> dict:
    """`state` through torch.save and a weights_only torch.load, as a user's checkpoint file."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_versions_by_name_carry_the_papers_settings():
    v2, v3 = create_loss("v2", data_size=N), create_loss("FastCLIP-v3", data_size=N)
    assert (v2.name, v3.name) == ("FastCLIP-v2", "FastCLIP-v3")
    assert (v2.objective.config.temperature, v2.objective.config.rho, v2.objective.config.lr_tau) == (0.03, 7.0, 0.0133)
    assert v3.objective.config.multiply_tau and v3.objective.config.rho == 6.5
    assert v3.state_dict()["per_sample"]["rows"].shape == (N, 2) and v2.state_dict()["per_sample"]["rows"].shape == (N, 10)
    assert [create_loss(v, data_size=N).learns_temperature for v in ("v0", "v1", "v2", "v3")] == [True, False, False, True]
    assert "per_sample" not in create_loss("openclip", data_size=N, gamma=0.5).state_dict()  # FastCLIP's setting ignored
    with pytest.raises(TypeError):
        create_loss("openclip", gama=0.5)
    with pytest.raises(ValueError, match="data_size"):
        create_loss("v3")
    with pytest.raises(ValueError, match="v0, v1, v2, v3, openclip, siglip"):
        create_loss("v4", data_size=N)


@pytest.mark.parametrize("version", ["v2", "v3"])
def test_a_saved_state_continues_identically(version):
    """Two epochs of steps, state_dict through a file, a fresh loss loads it: the next step's loss, feature
    gradients and per-pair table are those of the loss that kept running."""
    scale = torch.tensor(1 / 0.07)
    running = FastCLIPLoss(N, version, gamma=0.3, gamma_decay_epochs=4, device="cpu")
    for epoch, (seed, index) in enumerate([(0, [3, 7, 1, 8, 0, 5]), (1, [5, 2, 3, 11, 7, 22])]):
        running.set_epoch(epoch)
        step(running, seed, index, scale)
    resumed = FastCLIPLoss(N, version, gamma=0.3, gamma_decay_epochs=4, device="cpu")
    resumed.load_state_dict(saved(running.state_dict()))
    assert resumed.epoch == 1 and resumed.objective.gamma == running.objective.gamma < 1
    expected, got = step(running, 2, [7, 3, 9, 5], scale), step(resumed, 2, [7, 3, 9, 5], scale)
    assert got[0] == expected[0]
    assert all(torch.equal(a, b) for a, b in zip(got[1], expected[1]))
    assert torch.equal(resumed.objective.state.table, running.objective.state.table)


def test_another_runs_state_is_refused_before_anything_changes():
    v3 = FastCLIPLoss(N, "v3", device="cpu")
    step(v3, 0, [1, 2, 3, 4], torch.tensor(1 / 0.07))
    state = v3.state_dict()
    cases = [(FastCLIPLoss(N, "v2"), "saved by the loss FastCLIP-v3; this loss is FastCLIP-v2"),
             (FastCLIPLoss(N + 1, "v3"), "data_size 23, this loss has data_size 24"),
             (OpenCLIPLoss(), "this loss is OpenCLIP")]
    for loss, message in cases:
        before = copy.deepcopy(loss.state_dict())
        with pytest.raises(ValueError, match=message):
            loss.load_state_dict(state)
        assert torch.equal(before.get("per_sample", {}).get("rows", torch.empty(0)),
                           loss.state_dict().get("per_sample", {}).get("rows", torch.empty(0)))
    other_columns = {**state, "per_sample": {**state["per_sample"], "columns": ["u1", "u2"]}}
    with pytest.raises(ValueError, match="another FastCLIP version"):
        FastCLIPLoss(N, "v3").load_state_dict(other_columns)
    half = math.ceil(N / 2)  # rank 1's shard of a 2-rank save, alone: rank 0 of 1 needs rank 0's too
    shard = {**state["per_sample"], "rank": 1, "world_size": 2, "rows": state["per_sample"]["rows"][:half]}
    with pytest.raises(ValueError, match=r"needs the per-sample shards of ranks \[0\] of the 2"):
        FastCLIPLoss(N, "v3").load_state_dict({**state, "per_sample": shard})


def test_the_index_is_checked():
    loss = FastCLIPLoss(N, "v3")
    image, text, _ = features(0, [0, 1, 2])
    scale = torch.tensor(1 / 0.07)
    with pytest.raises(ValueError, match="needs `index`"):
        loss(image, text, scale)
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        loss(image, text, scale, torch.arange(4))
    with pytest.raises(ValueError, match=r"outside \[0, data_size = 23\): 0..23"):
        loss(image, text, scale, torch.tensor([0, 23, 5]))
    assert OpenCLIPLoss()(image, text, scale).ndim == 0  # no index needed


def test_optimizer_groups_and_the_temperature_lr():
    model = build_model("ViT-Tiny-32px").model
    v3 = FastCLIPLoss(N, "v3")
    optimizer = torch.optim.AdamW(v3.param_groups(model, lr=1e-3, weight_decay=0.1))
    groups = {group["name"]: group for group in optimizer.param_groups}
    assert groups["temperature"]["params"] == [model.logit_scale] and groups["temperature"]["lr"] == 2e-4
    assert groups["decay"]["weight_decay"] == 0.1 and groups["no_decay"]["weight_decay"] == 0.0
    for group in optimizer.param_groups:
        group["lr"] = 5e-4  # a scheduler's
    v3.set_temperature_lr(optimizer)
    assert groups["temperature"]["lr"] == 2e-4 and groups["decay"]["lr"] == 5e-4
    with torch.no_grad():
        model.logit_scale.fill_(math.log(1 / 0.02))  # tau 0.02 <= 0.03: step_thresh takes a third
    v3.set_temperature_lr(optimizer)
    assert groups["temperature"]["lr"] == pytest.approx(2e-4 / 3)
    with pytest.raises(ValueError, match="loss.param_groups"):
        v3.set_temperature_lr(torch.optim.AdamW(model.parameters()))

    openclip_groups = OpenCLIPLoss().param_groups(model, lr=1e-3, weight_decay=0.1)
    assert [g["name"] for g in openclip_groups] == ["decay", "no_decay"]  # logit_scale follows the model's lr
    v1_groups = FastCLIPLoss(N, "v1").param_groups(model, lr=1e-3, weight_decay=0.1)
    assert not model.logit_scale.requires_grad  # frozen, so that DDP finds no unused parameter
    assert all(p is not model.logit_scale for group in v1_groups for p in group["params"])


def test_the_package_imports_without_torch():
    """`import fastclip` (the flag parser's package) loads the losses only on first use."""
    code = "import sys, fastclip; assert 'torch' not in sys.modules; fastclip.FastCLIPLoss; print('torch' in sys.modules)"
    src = str(Path(__file__).resolve().parents[1] / "src")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={"PYTHONPATH": src},
                         check=True)
    assert out.stdout.strip() == "True"


# ---- several gloo ranks -----------------------------------------------------------------------------

BATCHES = ([3, 7, 1, 8, 0, 5], [5, 2, 3, 11, 7, 22])  # global batches; the second revisits 3, 5, 7


def save_shards(folder: Path) -> None:
    """v2 (10 columns) after two steps on K ranks: every rank saves its state_dict(), rank 0 the dense table."""
    loss = FastCLIPLoss(N, "v2", gamma_decay_epochs=4, device="cpu")
    b = len(BATCHES[0]) // comm.world_size()
    mine = slice(comm.rank() * b, (comm.rank() + 1) * b)
    for epoch, index in enumerate(BATCHES):
        loss.set_epoch(epoch)
        image, text, idx = features(epoch, index)
        loss(image[mine], text[mine], torch.tensor(1 / 0.07), idx[mine])
    torch.save(loss.state_dict(), folder / f"rank{comm.rank()}.pt")
    dense = dense_table(loss.objective.state)
    if comm.rank() == 0:
        torch.save(dense, folder / "dense.pt")


def load_shards(folder: Path, saved_world: int) -> None:
    """Every rank loads the list of the old ranks' files (memory-mapped) and must hold the dense table's rows."""
    loss = FastCLIPLoss(N, "v2", gamma_decay_epochs=4, device="cpu")
    loss.load_state_dict([torch.load(folder / f"rank{k}.pt", mmap=True, weights_only=True) for k in range(saved_world)])
    assert loss.epoch == 1
    assert torch.equal(dense_table(loss.objective.state), torch.load(folder / "dense.pt"))


def fsdp_and_ddp(folder: Path) -> None:
    """Two FastCLIP-v3 steps of one model under DDP and under FSDP2 (fully_shard): the same weights.
    fully_shard refuses 0-dim parameters, so open_clip's logit_scale becomes a 1-element vector."""
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    base = build_model("ViT-Tiny-32px").model
    base.logit_scale = torch.nn.Parameter(base.logit_scale.detach().reshape(1))
    initial = copy.deepcopy(base.state_dict())
    g = torch.Generator().manual_seed(1)
    images, texts = torch.randn(8, 3, 32, 32, generator=g), torch.randint(1, 49408, (8, 32), generator=g)
    mine = slice(comm.rank() * 4, comm.rank() * 4 + 4)
    weights = {}
    for name in ("ddp", "fsdp"):
        model = copy.deepcopy(base)
        wrapped = torch.nn.parallel.DistributedDataParallel(model) if name == "ddp" else fully_shard(model)
        loss_fn = FastCLIPLoss(16, "v3", gamma_decay_epochs=2, device="cpu")
        optimizer = torch.optim.AdamW(loss_fn.param_groups(model, lr=1e-3, weight_decay=0.1))  # after fully_shard
        for epoch, index in enumerate([[0, 1, 2, 3, 4, 5, 6, 7], [7, 6, 5, 4, 12, 13, 14, 15]]):
            loss_fn.set_epoch(epoch)
            out = wrapped(images[mine], texts[mine])
            loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"], torch.tensor(index)[mine])
            optimizer.zero_grad()
            loss.backward()
            loss_fn.set_temperature_lr(optimizer)
            optimizer.step()
        weights[name] = {k: getattr(v, "full_tensor", lambda v=v: v)().detach() for k, v in model.state_dict().items()}
    if comm.rank() == 0:
        torch.save({"initial": initial, **weights}, folder / "fsdp.pt")


def two_ranks(folder: Path) -> None:
    save_shards(folder)
    fsdp_and_ddp(folder)


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("two_ranks")
    spawn(2, two_ranks, folder)
    return folder


def test_shards_of_two_ranks_load_on_one_and_on_three(two_rank_run):
    load_shards(two_rank_run, saved_world=2)  # this process, no process group
    spawn(3, load_shards, two_rank_run, 2)


def test_fsdp_trains_as_ddp(two_rank_run):
    weights = torch.load(two_rank_run / "fsdp.pt")
    moved = max((weights["ddp"][k] - weights["initial"][k]).abs().max().item() for k in weights["initial"])
    differs = max((weights["ddp"][k] - weights["fsdp"][k]).abs().max().item() for k in weights["initial"])
    print(f"FSDP2 vs DDP after 2 steps: max |diff| {differs:.2e} (weights moved by up to {moved:.2e})")
    assert moved > 1e-4 and differs <= 1e-6
