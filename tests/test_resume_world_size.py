"""Resuming on another number of ranks keeps the schedule: progress is epochs plus a fraction of one,
and the step count is recomputed for the new steps per epoch (README, "Coming from open_clip_train")."""

from __future__ import annotations

import json

import pytest

from fastclip.checkpoint.checkpointer import rescale, saved_steps_per_epoch
from fastclip.train.progress import StepPlan, batches_per_epoch
from fastclip.train.progress import Progress
from fastclip.train.schedules import LrSchedule
from launch import check, start_torchrun
from training.main import main

SAMPLES, BATCH, EPOCHS, WARMUP, LR = 64, 8, 2, 1, 5e-4  # 8 steps per epoch on 1 rank, 4 on 2


def argv(logs, name: str, stop_epochs: int, resume: bool = False) -> list[str]:
    return ["--dataset-type", "synthetic", "--train-num-samples", str(SAMPLES), "--batch-size", str(BATCH),
            "--epochs", str(EPOCHS), "--stop_epochs", str(stop_epochs), "--workers", "0", "--model", "ViT-Tiny-32px",
            "--warmup", str(WARMUP), "--lr", str(LR), "--log-every-n-steps", "1", "--logs-dir", str(logs),
            "--name", name, *(["--resume", "latest"] if resume else [])]


def final_lr(logs, name: str) -> tuple[int, float]:
    last = json.loads((logs / name / "metrics.jsonl").read_text().splitlines()[-1])
    return last["step"], last["lr"]


def uninterrupted_final_lr(steps_per_epoch: int) -> float:
    """The learning rate of an uninterrupted run's last step, from the schedule the runs use."""
    total = steps_per_epoch * EPOCHS
    return LrSchedule("cosine", LR, WARMUP, total)(total - 1)


@pytest.mark.parametrize("progress, saved, now, expected", [
    (Progress(1, 0, 8), 8, 4, Progress(1, 0, 4)),  # an epoch boundary stays one
    (Progress(1, 3, 11), 8, 4, Progress(1, 2, 6)),  # 3/8 of an epoch -> round(1.5) = 2 of 4
    (Progress(0, 7, 7), 8, 4, Progress(1, 0, 4)),  # 7/8 rounds up to the whole epoch
    (Progress(2, 1, 9), 4, 8, Progress(2, 2, 18)),
    (Progress(2, 5, 21), 8, 8, Progress(2, 5, 21)),
])
def test_rescale_keeps_the_point_of_training(progress, saved, now, expected):
    assert rescale(progress, saved, now) == expected


def test_steps_per_epoch_of_older_checkpoints():
    assert saved_steps_per_epoch({"steps_per_epoch": 5, "epoch": 0, "step": 0}) == 5
    assert saved_steps_per_epoch({"epoch": 2, "step": 19, "step_in_epoch": 3}) == 8
    assert saved_steps_per_epoch({"epoch": 0, "step": 3, "step_in_epoch": 3, "world_size": 2,
                                  "config": {"train_num_samples": 64, "batch_size": 8}}) == 4
    # --accum-freq 2: one optimizer step per 2 of the ceil(100 / 16) = 7 batches, the last one dropped
    assert saved_steps_per_epoch({"epoch": 0, "step": 1, "step_in_epoch": 1, "world_size": 2,
                                  "config": {"train_num_samples": 100, "batch_size": 8, "accum_freq": 2}}) == 3
    assert saved_steps_per_epoch({"epoch": 0, "step": 3, "step_in_epoch": 3}) is None


def test_one_step_plan_for_every_count():
    plan = StepPlan.of_samples(100, batch_size=8, world_size=2, accum_freq=2, epochs=5)
    assert (batches_per_epoch(100, 8, 2), plan.steps_per_epoch, plan.total_steps) == (7, 3, 15)
    assert StepPlan.of_epoch(7, accum_freq=1, epochs=5) == StepPlan(7, 5)


def test_two_ranks_resumed_on_one_end_like_an_uninterrupted_one_rank_run(tmp_path):
    check([start_torchrun(argv(tmp_path, "moved", stop_epochs=1), nproc=2)])
    main(argv(tmp_path, "moved", stop_epochs=EPOCHS, resume=True))
    main(argv(tmp_path, "straight", stop_epochs=EPOCHS))
    assert final_lr(tmp_path, "moved") == final_lr(tmp_path, "straight")
    assert final_lr(tmp_path, "straight") == (16, pytest.approx(uninterrupted_final_lr(8)))
    log = (tmp_path / "moved" / "out.log").read_text()
    assert "written with 4 steps per epoch (2 ranks), this run has 8" in log


def test_one_rank_resumed_on_two_ends_like_an_uninterrupted_two_rank_run(tmp_path):
    main(argv(tmp_path, "moved", stop_epochs=1))
    check([start_torchrun(argv(tmp_path, "moved", stop_epochs=EPOCHS, resume=True), nproc=2)])
    step, lr = final_lr(tmp_path, "moved")
    assert (step, lr) == (8, pytest.approx(uninterrupted_final_lr(4)))
    assert lr > 0  # the cosine did not run past its end
