"""The training script end to end on real shards: in-process runs, resume, evaluation, checkpoints."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import open_clip
import pytest
import torch

from conftest import SEED_COMMANDS, scaled, tiny_run
from fastclip.models import build_model
from training.main import main


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def openclip_run(demo_data, tmp_path_factory):
    """The seed's OpenCLIP command, scaled down, trained for 2 epochs in this process."""
    logs = tmp_path_factory.mktemp("logs")
    argv = scaled(SEED_COMMANDS["openclip"], **tiny_run(demo_data, logs, "openclip"),
                  imagenet_val=demo_data.test_dir, zeroshot_frequency=1, val_data=demo_data.train_shards,
                  val_num_samples=1000, train_eval_num_samples=1000)
    metrics = main(argv)
    return logs / "openclip", metrics


def test_openclip_run_checkpoints_logs_and_evaluates(openclip_run):
    run_dir, metrics = openclip_run
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["epoch_1.pt", "epoch_2.pt"]
    results = read_jsonl(run_dir / "results.jsonl")
    assert [r["epoch"] for r in results] == [1, 2]
    assert results[-1]["imagenet-zeroshot-val-top1"] == metrics["imagenet-zeroshot-val-top1"]
    assert results[-1]["zeroshot-num-images"] == 1200 and results[-1]["zeroshot-num-classes"] == 10
    assert results[-1]["num_samples"] == 1000  # --val-data retrieval over the first --val-num-samples pairs
    assert 0 <= results[-1]["image_to_text_R@1"] <= results[-1]["image_to_text_R@10"] <= 1
    # --train-eval-num-samples reads the first training pairs as --val-data would: here the same shards
    for result in results:
        held_out = {k: v for k, v in result.items() if f"train_subset_{k}" in result}
        assert len(held_out) > 10 and "global_val_loss_ref" in held_out
        assert {k: result[f"train_subset_{k}"] for k in held_out} == held_out
    params = json.loads((run_dir / "params.json").read_text())
    assert params["gather_with_grad"] and params["batch_size"] == 32
    log = (run_dir / "out.log").read_text()
    assert "Train Epoch: 1" in log and "samples/s" in log and "ETA" in log
    assert "forward:" in log  # --profile: per-phase step times
    steps = read_jsonl(run_dir / "metrics.jsonl")
    assert steps[-1]["step"] == 2 * 38  # ceil(1200 / 32) steps per epoch


def test_checkpoint_loads_in_open_clip(openclip_run):
    run_dir, _ = openclip_run
    path = run_dir / "checkpoints" / "epoch_2.pt"
    model = build_model("ViT-Tiny-32px").model
    open_clip.load_checkpoint(model, str(path), weights_only=True)
    saved = torch.load(path, map_location="cpu", weights_only=True)
    assert saved["epoch"] == 2 and saved["step"] == 76
    for name, value in model.state_dict().items():
        assert torch.equal(value, saved["state_dict"][name]), name


def test_seed_evaluation_command_on_the_checkpoint(openclip_run, demo_data, tmp_path):
    """The seed's resume-and-evaluate command reproduces the training run's final zero-shot numbers."""
    run_dir, metrics = openclip_run
    argv = scaled(SEED_COMMANDS["eval-imagenet"], resume=run_dir / "checkpoints" / "epoch_2.pt",
                  imagenet_val=demo_data.test_dir, model="ViT-Tiny-32px", workers=0, logs=tmp_path)
    evaluated = main(argv)
    assert evaluated["imagenet-zeroshot-val-top1"] == pytest.approx(metrics["imagenet-zeroshot-val-top1"])
    (record,) = read_jsonl(tmp_path / "eval_medium_fastclipv3_epoch_37" / "results.jsonl")
    assert record["epoch"] == 2 and record["imagenet-zeroshot-val-top5"] == evaluated["imagenet-zeroshot-val-top5"]


def test_existing_run_without_resume_is_refused(openclip_run, demo_data):
    run_dir, _ = openclip_run
    argv = scaled(SEED_COMMANDS["openclip"], **tiny_run(demo_data, run_dir.parent, "openclip"))
    with pytest.raises(SystemExit, match="--resume latest"):
        main(argv)


@pytest.mark.parametrize("version", ["openclip", "fastclip-v3"])
def test_resume_continues_exactly(version, demo_data, tmp_path):
    """Stopping after epoch 1 and resuming with --resume latest ends with the uninterrupted run's weights."""
    base = dict(tiny_run(demo_data, tmp_path, "full", epochs=2, batch_size=64), train_num_samples=384)
    main(scaled(SEED_COMMANDS[version], **base))
    interrupted = dict(base, name="interrupted")
    main(scaled(SEED_COMMANDS[version], **interrupted, stop_epochs=1))
    first = torch.load(tmp_path / "interrupted/checkpoints/epoch_1.pt", weights_only=True)
    assert (first["epoch"], first["step"]) == (1, 6)
    main(scaled(SEED_COMMANDS[version], **interrupted, resume="latest"))
    full = torch.load(tmp_path / "full/checkpoints/epoch_2.pt", weights_only=True)
    resumed = torch.load(tmp_path / "interrupted/checkpoints/epoch_2.pt", weights_only=True)
    assert (resumed["epoch"], resumed["step"]) == (2, 12)
    for name, value in full["state_dict"].items():
        torch.testing.assert_close(resumed["state_dict"][name], value, rtol=1e-5, atol=1e-6, msg=name)
    moments = [s["exp_avg_sq"] for s in resumed["optimizer"]["state"].values()]
    expected = [s["exp_avg_sq"] for s in full["optimizer"]["state"].values()]
    for got, want in zip(moments, expected):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-9)
    log = (tmp_path / "interrupted" / "out.log").read_text()
    assert "at epoch 1, step 6 (0 into the epoch)" in log


def test_unavailable_report_backend_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as on a machine without it: importing it fails
    with pytest.raises(SystemExit, match="pip install"):
        main(["--dataset-type", "synthetic", "--train-num-samples", "32", "--batch-size", "16", "--epochs", "1",
              "--workers", "0", "--model", "ViT-Tiny-32px", "--logs", str(tmp_path), "--report-to", "wandb"])


def test_synthetic_data_trains(tmp_path):
    metrics = main(["--dataset-type", "synthetic", "--train-num-samples", "64", "--batch-size", "16",
                    "--epochs", "1", "--workers", "0", "--model", "ViT-Tiny-32px", "--logs", str(tmp_path),
                    "--name", "synthetic", "--warmup", "2"])
    assert metrics == {}
    assert (tmp_path / "synthetic" / "checkpoints" / "epoch_1.pt").is_file()
