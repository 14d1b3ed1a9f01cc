"""The examples run as a user runs them (`python examples/NAME.py`), and the DDP one trains exactly as the
training script does.

Equivalence: examples/ddp_torchrun.py and `torchrun -m training.main` with the paper's command (FastCLIP-v3,
OpenCLIP) scaled to the same data, seed, model, batch, epochs and optimizer settings, each on 2 gloo ranks:
both read the same shards through the project's loader (same order, augmentations and captions), start
from the same seeded open_clip initialisation and step AdamW over the same groups and schedules, so the
per-step losses and the final weights agree to float32 round-off (here: exactly). The v3 example runs as
two launches, stopped after epoch 0 and resumed from the user-side checkpoint, which must not change a bit.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import SEED_COMMANDS, scaled
from launch import ROOT, check, clean_env, start_torchrun
from fastclip.datasets.demo import build_demo

PAIRS, PER_SHARD, BATCH, EPOCHS = 256, 64, 16, 2  # 8 steps per epoch on 2 ranks
RECIPE = dict(seed="2024", lr="1e-3", wd="0.1", warmup="3", workers="0")  # the example's flags of the same names
TIMEOUT_S = 600


def run_example(name: str, *args: str, cwd: Path) -> dict:
    """`python examples/NAME ARGS` from `cwd`; its last stdout line, JSON."""
    env = {**clean_env(), "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run([sys.executable, str(ROOT / "examples" / name), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=TIMEOUT_S)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def main_command(loss: str, data, logs: Path) -> list[str]:
    """The paper's command for `loss`, on the example's data, model and recipe; a log line every step."""
    return scaled(SEED_COMMANDS["fastclip-v3" if loss == "v3" else "openclip"], train_data=data.train_shards,
                  train_num_samples=data.num_samples, data_size=data.data_size, model="ViT-Tiny-32px",
                  batch_size=BATCH, epochs=EPOCHS, gamma_decay_epochs=max(1, EPOCHS // 2), beta1=0.9, beta2=0.98,
                  eps=1e-6, log_every_n_steps=1, logs_dir=str(logs), name=loss, **RECIPE)


@pytest.mark.parametrize("loss", ["v3", "openclip"])
def test_ddp_example_trains_as_training_main(loss, fashion_mnist_dir, tmp_path):
    data = build_demo(tmp_path / "data", samples_per_shard=PER_SHARD, limit=PAIRS, source=fashion_mnist_dir)
    check([start_torchrun(main_command(loss, data, tmp_path / "logs"))])
    example = ["--loss", loss, "--data", str(tmp_path / "data"), "--pairs", str(PAIRS), "--samples-per-shard",
               str(PER_SHARD), "--batch-size", str(BATCH), "--epochs", str(EPOCHS), "--out", str(tmp_path / "example"),
               *[f"--{flag}={value}" for flag, value in RECIPE.items()]]
    if loss == "v3":  # epoch 0, the user's checkpoint, then a second launch that resumes from it
        run_example("ddp_torchrun.py", *example, "--stop-epochs", "1", cwd=tmp_path)
        example.append("--resume")
    ran = run_example("ddp_torchrun.py", *example, cwd=tmp_path)
    assert ran["ranks"] == 2

    rows = [json.loads(line) for line in (tmp_path / "logs" / loss / "metrics.jsonl").read_text().splitlines()]
    expected = [row["loss"] for row in rows if "loss" in row]
    got = [json.loads(line)["loss"] for line in (tmp_path / "example" / "losses.jsonl").read_text().splitlines()]
    assert len(got) == len(expected) == EPOCHS * PAIRS // (2 * BATCH)
    loss_diff = max(abs(a - b) for a, b in zip(got, expected))
    weights = torch.load(tmp_path / "example" / "model.pt", weights_only=True)["model"]
    reference = torch.load(tmp_path / "logs" / loss / "checkpoints" / f"epoch_{EPOCHS}.pt", weights_only=True)["state_dict"]
    assert weights.keys() == reference.keys()
    weight_diff = max((weights[k] - reference[k]).abs().max().item() for k in reference)
    print(f"{loss}: {len(got)} steps, per-step loss max |diff| {loss_diff:.2e}, final weights max |diff| {weight_diff:.2e}")
    assert loss_diff <= 1e-6 and weight_diff <= 1e-6


def test_single_process_example(fashion_mnist_dir, tmp_path):
    ran = run_example("single_process.py", "--pairs", "128", "--epochs", "2", "--out", str(tmp_path), cwd=tmp_path)
    assert ran["loss"] == "v3" and 0.0 <= ran["zeroshot_top1"] <= 1.0
    assert (tmp_path / "single_process_v3.pt").is_file()


def test_accelerate_example(fashion_mnist_dir, tmp_path):
    pytest.importorskip("accelerate", reason="pip install -e '.[examples]'")
    ran = run_example("accelerate_loop.py", "--pairs", "128", "--epochs", "2", "--out", str(tmp_path), cwd=tmp_path)
    assert ran["processes"] == 2 and (tmp_path / "checkpoint" / "fastclip_rank1.pt").is_file()
