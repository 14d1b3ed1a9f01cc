"""A run stopped mid-epoch by a signal and resumed ends exactly where the uninterrupted run ends.

Real shards, real signals, K = 1 in this process and K = 2 on gloo processes (slurm's variables,
and torchrun with --max-restarts after a worker is killed). Compared at the end: model weights,
Adam moments and the per-sample state table, bit for bit.
"""

from __future__ import annotations

import os
import re
import signal

import pytest

from checkpoints import assert_same_training_state, children, last_step, signal_when
from conftest import SEED_COMMANDS, scaled, tiny_run
from fastclip.train.progress import PREEMPTED
from launch import check, finish, start_slurm, start_torchrun, wait_for_line
from training.main import main

STEPS_PER_EPOCH = 12  # 384 samples, batch 32 on one rank or 16 on each of two
STOP_AFTER = 15  # in epoch 1: the moving averages' gamma < 1 and v2's Adam moments are on


def arguments(version: str, demo, logs, name: str, batch_size: int, **extra) -> list[str]:
    overrides = dict(tiny_run(demo, logs, name, epochs=2, batch_size=batch_size), train_num_samples=384,
                     log_every_n_steps=1, **extra)
    return scaled(SEED_COMMANDS[version], **overrides)


@pytest.mark.parametrize("version", ["openclip", "fastclip-v3", "fastclip-v2"])
def test_one_process_stopped_by_signal_resumes_exactly(version, demo_data, tmp_path):
    main(arguments(version, demo_data, tmp_path, "full", 32))

    argv = arguments(version, demo_data, tmp_path, "cut", 32)
    signal_when(tmp_path / "cut", STOP_AFTER, signal.SIGUSR1)
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    assert stopped.value.code == PREEMPTED
    log = (tmp_path / "cut" / "out.log").read_text()
    assert "stopped by SIGUSR1 at epoch 1" in log and "continue with --resume latest" in log
    cut_step = last_step(tmp_path / "cut")
    assert STOP_AFTER <= cut_step < 2 * STEPS_PER_EPOCH

    main(scaled(argv, resume="latest"))
    log = (tmp_path / "cut" / "out.log").read_text()
    assert f"epoch_latest.pt at epoch 1, step {cut_step} ({cut_step - STEPS_PER_EPOCH} into the epoch)" in log
    assert_same_training_state(tmp_path / "cut/checkpoints/epoch_2.pt", tmp_path / "full/checkpoints/epoch_2.pt")


@pytest.fixture(scope="module")
def two_rank_runs(demo_data, tmp_path_factory):
    """Uninterrupted two-process runs (one worker per rank), one per version, trained once."""
    logs = tmp_path_factory.mktemp("two_rank")
    for version in ("openclip", "fastclip-v3", "fastclip-v2"):
        check(start_slurm(arguments(version, demo_data, logs, version, 16, workers=1)))
    return logs


@pytest.mark.parametrize("version", ["openclip", "fastclip-v3", "fastclip-v2"])
def test_two_processes_one_signalled_all_stop_and_resume_exactly(version, two_rank_runs, demo_data, tmp_path):
    """Slurm signals one task; both ranks agree, save one checkpoint and exit 75; the resume is exact."""
    argv = arguments(version, demo_data, tmp_path, "cut", 16, workers=1)
    ranks = start_slurm(argv, outputs=[tmp_path / "rank0.txt", tmp_path / "rank1.txt"])
    signal_when(tmp_path / "cut", STOP_AFTER, signal.SIGUSR1, pid=ranks[1].pid).join()
    assert finish(ranks) == [PREEMPTED, PREEMPTED]
    assert "stopped by a stop signal on another rank" in (tmp_path / "cut" / "out.log").read_text()

    check(start_slurm(scaled(argv, resume="latest")))
    assert_same_training_state(tmp_path / "cut/checkpoints/epoch_2.pt", two_rank_runs / version / "checkpoints/epoch_2.pt")


def test_torchrun_restarts_a_killed_worker_from_the_newest_checkpoint(two_rank_runs, demo_data, tmp_path):
    """`torchrun --max-restarts 1 --rdzv-backend c10d` (the default static rendezvous cannot restart: its
    new workers wait forever in init_process_group): a worker killed mid-epoch; the restarted group resumes from the
    last mid-epoch checkpoint and ends where the uninterrupted run ends."""
    argv = arguments("fastclip-v3", demo_data, tmp_path, "restarted", 16, workers=1, resume="latest",
                     save_every_n_steps=4)
    launcher = start_torchrun(argv, output=tmp_path / "torchrun.txt", launcher_flags=("--max-restarts=1", "--rdzv-backend=c10d"))
    wait_for_line(tmp_path / "restarted" / "out.log", r"saved .*epoch_latest\.pt \(epoch 1, step 16\)", process=launcher)
    workers = children(launcher.pid)
    assert len(workers) == 2
    os.kill(workers[1], signal.SIGKILL)  # no handler runs: as when a node dies
    assert finish([launcher]) == [0], (tmp_path / "torchrun.txt").read_text()[-3000:]
    log = (tmp_path / "restarted" / "out.log").read_text()
    assert re.search(r"epoch_latest\.pt at epoch 1, step (16|20) \((4|8) into the epoch\)", log)
    assert_same_training_state(tmp_path / "restarted/checkpoints/epoch_2.pt",
                               two_rank_runs / "fastclip-v3" / "checkpoints/epoch_2.pt")
