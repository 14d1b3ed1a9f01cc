"""What a run does when something goes wrong: signals, bad checkpoints, a full disk, NaN, a hung rank,
a second run on the same folder. Each fault is real (signals, files, a tmpfs, a stopped process)."""

from __future__ import annotations

import math
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import open_clip
import pytest
import torch

from checkpoints import assert_same_training_state, last_step, per_sample_table, signal_when
from fastclip.checkpoint import files
from fastclip.models import build_model
from fastclip.train.progress import NON_FINITE, PEER_LOST, PREEMPTED
from launch import check, finish, start_slurm, wait_for_line
from training.main import main

SAMPLES, BATCH = 96, 16  # 6 steps per epoch


def synthetic(logs: Path, name: str, *extra: str, epochs: int = 3) -> list[str]:
    """A tiny FastCLIP-v3 run on synthetic pairs."""
    return ["--dataset-type", "synthetic", "--train-num-samples", str(SAMPLES), "--data_size", str(SAMPLES),
            "--batch-size", str(BATCH), "--epochs", str(epochs), "--workers", "0", "--model", "ViT-Tiny-32px",
            "--logs", str(logs), "--name", name, "--warmup", "2", "--log-every-n-steps", "1",
            "--fastclip", "--multiply_tau", "--lr_tau_scheduler", "step_thresh", *extra]


def log_of(run_dir: Path) -> str:
    return (run_dir / "out.log").read_text()


# ----------------------------------------------------------------------------------------- signals


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_stop_signal_saves_a_loadable_checkpoint_and_exits_75(signum, tmp_path):
    signal_when(tmp_path / "run", 8, signum)
    before = signal.getsignal(signum)  # SIG_IGN for SIGINT when pytest runs in the background
    with pytest.raises(SystemExit) as stopped:
        main(synthetic(tmp_path, "run", epochs=20))
    assert stopped.value.code == PREEMPTED
    step = last_step(tmp_path / "run")
    epoch = (step - 1) // 6  # epochs complete; the stop came after step `step`
    assert f"stopped by {signal.Signals(signum).name} at epoch {epoch}, step {step}" in log_of(tmp_path / "run")
    saved = torch.load(tmp_path / "run/checkpoints/epoch_latest.pt", weights_only=True)
    assert (saved["epoch"], saved["step"], saved["step_in_epoch"]) == (epoch, step, step - 6 * epoch)
    open_clip.load_checkpoint(build_model("ViT-Tiny-32px").model, str(tmp_path / "run/checkpoints/epoch_latest.pt"))
    assert signal.getsignal(signum) == before  # handlers restored


def test_timed_checkpoints_follow_rank_0s_clock_on_every_rank(tmp_path):
    """--save-every-minutes: rank 0's clock asks, both ranks save at the same step (a disagreement
    would leave one rank waiting in the save's collectives until --dist-timeout)."""
    argv = synthetic(tmp_path, "run", "--save-every-minutes", "0.002", "--dist-timeout", "0.5",
                     "--train-num-samples", "320", "--data_size", "320", epochs=1)  # 10 steps on 2 ranks
    check(start_slurm(argv))
    timed = re.findall(r"saved \S+epoch_latest\.pt \(epoch 0, step (\d+)\)", log_of(tmp_path / "run"))
    assert timed and all(0 < int(step) <= 10 for step in timed)


# ------------------------------------------------------------------------------------ bad checkpoints


@pytest.fixture(scope="module")
def two_epochs(tmp_path_factory) -> Path:
    """A run stopped after 2 of 3 epochs: epoch_1.pt and epoch_2.pt."""
    logs = tmp_path_factory.mktemp("two_epochs")
    main(synthetic(logs, "run") + ["--stop_epochs", "2"])
    return logs / "run"


def _truncate(path: Path) -> Path:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


def _empty(path: Path) -> Path:
    path.write_bytes(b"")
    return path


def _random_bytes(path: Path) -> Path:
    path.write_bytes(os.urandom(4096))
    return path


def _nan_weights(path: Path) -> Path:
    checkpoint = torch.load(path, weights_only=True)
    next(iter(checkpoint["state_dict"].values())).fill_(float("nan"))
    torch.save(checkpoint, path)
    return path


def _lost_state_file(path: Path) -> Path:
    folder = files.per_sample_dir(path, files.peek(path))
    (shard,) = folder.glob("rank*.bin")
    shard.unlink()
    return shard


def _flipped_state_byte(path: Path) -> Path:
    (shard,) = files.per_sample_dir(path, files.peek(path)).glob("rank*.bin")
    data = bytearray(shard.read_bytes())
    data[5] ^= 0xFF
    shard.write_bytes(bytes(data))
    return shard


DAMAGE = {"truncated": _truncate, "empty": _empty, "random bytes": _random_bytes, "NaN weights": _nan_weights,
          "state file missing": _lost_state_file, "state file corrupt": _flipped_state_byte}


@pytest.mark.parametrize("damage", DAMAGE)
def test_resume_latest_falls_back_to_the_newest_good_checkpoint(damage, two_epochs, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(two_epochs, run_dir)
    bad = DAMAGE[damage](run_dir / "checkpoints" / "epoch_2.pt")
    main(synthetic(tmp_path, "run", "--resume", "latest"))
    log = log_of(run_dir)
    assert f"--resume latest: skipping a bad checkpoint: {bad}" in log
    assert f"resumed from {run_dir / 'checkpoints' / 'epoch_1.pt'} at epoch 1" in log
    assert torch.load(run_dir / "checkpoints" / "epoch_3.pt", weights_only=True)["step"] == 18


@pytest.mark.parametrize("damage", ["truncated", "random bytes", "state file corrupt"])
def test_explicit_bad_resume_is_a_one_line_error(damage, two_epochs, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(two_epochs, run_dir)
    path = run_dir / "checkpoints" / "epoch_2.pt"
    bad = DAMAGE[damage](path)
    with pytest.raises(SystemExit) as error:
        main(synthetic(tmp_path, "run", "--resume", str(path)))
    message = str(error.value.code)
    assert message.startswith(f"error: {bad}") and "\n" not in message


def test_leftovers_of_an_interrupted_save_are_removed_at_start(two_epochs, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(two_epochs, run_dir)
    checkpoint_dir = run_dir / "checkpoints"
    tmp_file = checkpoint_dir / "epoch_3.pt.tmp-otherhost-4242"
    tmp_file.write_bytes(b"half a checkpoint")
    orphan = checkpoint_dir / "epoch_3.per_sample.12-deadbeef"
    orphan.mkdir()
    main(synthetic(tmp_path, "run", "--resume", "latest"))
    assert not tmp_file.exists() and not orphan.exists()
    assert "removed 2 leftovers of interrupted saves" in log_of(run_dir)
    assert sorted(p.name for p in checkpoint_dir.glob("*.pt")) == ["epoch_1.pt", "epoch_2.pt", "epoch_3.pt"]


def test_an_unreadable_checkpoints_state_survives_start_up_until_a_good_save_supersedes_it(two_epochs, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(two_epochs, run_dir)
    checkpoint_dir = run_dir / "checkpoints"
    newest = checkpoint_dir / "epoch_2.pt"
    (state,) = files.state_dirs(checkpoint_dir, "epoch_2")
    _truncate(newest)  # unreadable now: it may only be a file still being copied back
    orphan = checkpoint_dir / "epoch_3.per_sample.12-deadbeef"  # no epoch_3.pt names it: an interrupted save
    orphan.mkdir()
    assert files.remove_leftovers(checkpoint_dir) == [orphan]
    assert state.is_dir()
    main(synthetic(tmp_path, "run", "--resume", "latest"))  # resumes from epoch 1, saves epoch 2 and 3 anew
    assert not state.exists()  # superseded by the new epoch_2.pt's folder
    assert files.per_sample_dir(newest, files.peek(newest)).is_dir()


def test_checkpoint_with_the_table_inside_resumes_as_the_per_rank_files_do(two_epochs, tmp_path):
    """Checkpoints of earlier releases kept the dense per-sample table in the .pt: they still resume."""
    for name in ("files", "inside"):
        shutil.copytree(two_epochs, tmp_path / name)
    path = tmp_path / "inside" / "checkpoints" / "epoch_2.pt"
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["objective"]["per_sample"] = per_sample_table(path)
    shutil.rmtree(files.per_sample_dir(path, checkpoint))
    checkpoint["per_sample_dir"] = None
    torch.save(checkpoint, path)
    for name in ("files", "inside"):
        main(synthetic(tmp_path, name, "--resume", "latest"))
    assert f"resumed from {path} at epoch 2" in log_of(tmp_path / "inside")
    assert_same_training_state(tmp_path / "inside/checkpoints/epoch_3.pt", tmp_path / "files/checkpoints/epoch_3.pt")


@pytest.fixture
def small_disk(tmp_path):
    """A 64 MiB file system of its own (tmpfs): room for one tiny-model checkpoint and a half."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount_point)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip()}): the full-disk test needs root")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_full_disk_is_a_one_line_error_and_keeps_the_previous_checkpoint(small_disk):
    with pytest.raises(SystemExit) as error:
        main(synthetic(small_disk, "run", "--delete-previous-checkpoint"))
    message = str(error.value.code)
    checkpoint_dir = small_disk / "run" / "checkpoints"
    assert message.startswith(f"error: no space left on the device while writing {checkpoint_dir / 'epoch_2.pt'}")
    assert "the previous checkpoint is intact" in message and "\n" not in message
    assert sorted(p.name for p in checkpoint_dir.iterdir() if p.suffix == ".pt" or "tmp" in p.name) == ["epoch_1.pt"]
    assert len(list(checkpoint_dir.glob("epoch_2.per_sample.*"))) == 0
    assert files.load(checkpoint_dir / "epoch_1.pt")["epoch"] == 1


# ---------------------------------------------------------------------------------------- NaN / inf


def test_non_finite_steps_are_skipped_and_stop_the_run_with_77(tmp_path):
    """--lr 1e3 drives the loss to NaN within a few steps: no NaN reaches a weight or a checkpoint."""
    argv = synthetic(tmp_path, "run", "--lr", "1e3", "--save-every-n-steps", "1", "--max-bad-steps", "3")
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    assert stopped.value.code == NON_FINITE
    log = log_of(tmp_path / "run")
    assert "3 consecutive steps had NaN or inf gradients and were skipped" in log
    latest = tmp_path / "run" / "checkpoints" / "epoch_latest.pt"
    checkpoint = files.load(latest)  # verifies that every weight is finite
    log_u = per_sample_table(latest)  # v3: log u; -inf for a pair never visited (u = 0), never NaN or +inf
    assert (torch.isfinite(log_u) | (log_u == -math.inf)).all() and torch.isfinite(log_u).any()
    assert checkpoint["guard"]["total"] >= 1


def test_a_non_finite_step_changes_nothing(tmp_path):
    """A batch of NaN images: weights, Adam moments and per-sample state stay as they were."""
    from training.builders import build_objective, build_trainer
    from training.config import Config
    from training.params import parse_args

    from fastclip.distributed import DistEnv
    from fastclip.train.precision import resolve_precision
    from fastclip.train.progress import StepPlan

    config = Config.from_args(parse_args(synthetic(tmp_path, "unit")))
    env = DistEnv()
    precision = resolve_precision("fp32", env.device)
    bundle = build_model(config.model.model, env.device, config.model.temperature)
    objective = build_objective(config, env)
    trainer = build_trainer(config, env, bundle.model, objective, precision,
                            StepPlan.of_epoch(6, 1, config.optim.epochs))
    images = torch.rand(BATCH, 3, 32, 32)
    batch = {"image": images, "text": bundle.tokenizer(["a photo"] * BATCH), "index": torch.arange(BATCH)}
    trainer.train_step([batch])
    before = {k: v.clone() for k, v in bundle.model.state_dict().items()}
    moments = [s["exp_avg"].clone() for s in trainer.optimizer.state.values()]
    table = objective.state.table.clone()
    trainer.train_step([dict(batch, image=torch.full_like(images, float("nan")))])
    for name, value in bundle.model.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert all(torch.equal(s["exp_avg"], m) for s, m in zip(trainer.optimizer.state.values(), moments))
    assert torch.equal(objective.state.table, table)
    assert (int(trainer.guard.total), int(trainer.guard.consecutive)) == (1, 1)
    trainer.train_step([batch])
    assert (int(trainer.guard.total), int(trainer.guard.consecutive)) == (1, 0)
    assert not torch.equal(bundle.model.state_dict()["logit_scale"], before["logit_scale"])


# ---------------------------------------------------------------------------------------- hung rank


def test_a_stopped_rank_makes_the_others_exit_within_the_timeout_and_the_run_resumes(tmp_path):
    """SIGSTOP on one of two ranks: the other exits with 76 within --dist-timeout; the run then resumes
    its mid-epoch checkpoint on one process."""
    argv = synthetic(tmp_path, "run", "--dist-timeout", "0.1", "--save-every-n-steps", "4", "--resume", "latest",
                     "--train-num-samples", "960", "--data_size", "960")  # 30 steps per epoch on 2 ranks
    ranks = start_slurm(argv, outputs=[tmp_path / "rank0.txt", tmp_path / "rank1.txt"])
    wait_for_line(tmp_path / "run" / "out.log", r"saved .*epoch_latest\.pt \(epoch 0, step 4\)", process=ranks[0])
    ranks[1].send_signal(signal.SIGSTOP)
    stopped_at = time.monotonic()
    try:
        assert finish([ranks[0]], timeout=60) == [PEER_LOST]
        waited = time.monotonic() - stopped_at
    finally:
        ranks[1].kill()
        ranks[1].wait()
    assert waited < 6 + 20, waited  # --dist-timeout 0.1 min, plus the time to exit
    assert "lost contact with another rank" in log_of(tmp_path / "run")
    check(start_slurm(argv, ntasks=1))  # the rest on one process: per-sample state 2 -> 1, a fresh data order
    log = log_of(tmp_path / "run")
    assert "the checkpoint was written by 2 ranks and this run has 1" in log
    saved = torch.load(tmp_path / "run/checkpoints/epoch_3.pt", weights_only=True)
    assert saved["world_size"] == 1 and saved["epoch"] == 3


# --------------------------------------------------------------------------------------- run folder


def test_second_run_on_a_busy_folder_stops_and_a_dead_holder_is_taken_over(tmp_path):
    argv = synthetic(tmp_path, "run", "--resume", "latest", epochs=50)
    (first,) = start_slurm(argv, ntasks=1, outputs=[tmp_path / "first.txt"])
    try:
        wait_for_line(tmp_path / "run" / "out.log", r"Train Epoch", process=first)
        with pytest.raises(SystemExit) as busy:
            main(argv)
        message = str(busy.value.code)
        assert message.startswith(f"error: {tmp_path / 'run'} is in use by another run (pid {first.pid} on ")
    finally:
        first.kill()
        first.wait()
    main(synthetic(tmp_path, "run", "--resume", "latest", "--stop_epochs", "1"))
    assert f"took over the lock of pid {first.pid}" in log_of(tmp_path / "run")
