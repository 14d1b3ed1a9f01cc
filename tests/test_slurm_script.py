"""scripts/train_preemptible.sh: the batch script that checkpoints and requeues itself.

Slurm is not here, so what these tests cover is the script's logic and the training's signal handling,
not slurm: a fake `srun` (one task with slurm's variables, passing SIGTERM/SIGUSR1 on to it as srun
does) and a fake `scontrol` (records its arguments) come first on PATH. The signals are sent by the
test the way slurm sends them (SIGUSR1 to the task for `--signal=USR1@120`; SIGTERM to the batch
shell, srun and the task on preemption); whether slurm really does so, and that `scontrol requeue`
restarts the job, is not tested. The runs are tiny synthetic FastCLIP-v3 runs on CPU.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from checkpoints import children, last_step
from conftest import free_port
from launch import ROOT, clean_env

SCRIPT = ROOT / "scripts" / "train_preemptible.sh"
TINY = ("--dataset-type synthetic --train-num-samples 96 --data_size 96 --model ViT-Tiny-32px --batch-size 16 "
        "--epochs 6 --workers 0 --warmup 2 --log-every-n-steps 1")  # 6 steps per epoch

# One task with slurm's variables; TERM/USR1 are passed on to it, as srun does. With SRUN_RECORD set it only
# writes its arguments there and exits with SRUN_EXIT.
FAKE_SRUN = f"""#!{sys.executable}
import json, os, signal, subprocess, sys
if "SRUN_RECORD" in os.environ:
    with open(os.environ["SRUN_RECORD"], "w") as record:
        json.dump(sys.argv[1:], record)
    sys.exit(int(os.environ.get("SRUN_EXIT", "0")))
task = subprocess.Popen(sys.argv[1:], env=dict(os.environ, SLURM_PROCID="0", SLURM_NTASKS="1", SLURM_LOCALID="0"))
for signum in (signal.SIGTERM, signal.SIGUSR1):
    signal.signal(signum, lambda signum, frame: task.send_signal(signum))
sys.exit(task.wait())
"""
FAKE_SCONTROL = '#!/bin/sh\necho "$*" >> "$SCONTROL_CALLS"\n'


@pytest.fixture
def job(tmp_path):
    """Runs a batch script as slurm would: the fakes on PATH, SLURM_JOB_ID=123, output appended to job.log."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = clean_env()
    env.update(PATH=os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent), env["PATH"]]),
               SLURM_JOB_ID="123", SCONTROL_CALLS=str(tmp_path / "scontrol.txt"), MASTER_PORT=str(free_port()),
               EXTRA_ARGS=f"{TINY} --logs-dir {tmp_path / 'logs'}")
    started = []

    def start(*argv: str, script: Path = SCRIPT, **extra_env: str) -> subprocess.Popen:
        with open(tmp_path / "job.log", "a") as output:  # as --open-mode=append
            started.append(subprocess.Popen(["bash", str(script), *argv], cwd=ROOT, env={**env, **extra_env},
                                            stdout=output, stderr=subprocess.STDOUT, start_new_session=True))
        return started[-1]

    yield start
    for process in started:  # a failed test leaves no shell, srun or task behind
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def scontrol_calls(tmp_path: Path) -> list[str]:
    path = tmp_path / "scontrol.txt"
    return path.read_text().splitlines() if path.exists() else []


def finish(process: subprocess.Popen, tmp_path: Path, timeout: float = 60) -> int:
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError("the job did not end:\n" + (tmp_path / "job.log").read_text()[-4000:]) from None


def training_process(shell: subprocess.Popen, run_dir: Path, steps: int = 2, timeout: float = 60) -> tuple[int, int]:
    """(srun, main.py) process ids once the run has logged `steps` steps."""
    deadline = time.monotonic() + timeout
    while last_step(run_dir) < steps:
        assert shell.poll() is None and time.monotonic() < deadline, f"no step {steps} (rc {shell.poll()})"
        time.sleep(0.05)
    (srun,) = children(shell.pid)
    (task,) = children(srun)
    assert "src/training/main.py" in Path(f"/proc/{task}/cmdline").read_text()
    return srun, task


@pytest.mark.parametrize("preemption", ["USR1 before the time limit", "TERM to the whole job"])
def test_a_stopped_job_checkpoints_requeues_and_the_requeued_job_finishes(preemption, job, tmp_path):
    run_dir = tmp_path / "logs" / "medium_v3"
    shell = job("v3")
    srun, task = training_process(shell, run_dir)
    if preemption.startswith("USR1"):  # --signal=USR1@120 without B: only the tasks get it
        os.kill(task, signal.SIGUSR1)
        name = "SIGUSR1"
    else:  # preemption: slurm signals the batch shell and every process of the steps
        for pid in (shell.pid, srun, task):
            os.kill(pid, signal.SIGTERM)
        name = "SIGTERM"
    assert finish(shell, tmp_path) == 75
    assert scontrol_calls(tmp_path) == ["requeue 123"]
    assert f"stopped by {name} at epoch" in (run_dir / "out.log").read_text()
    latest = run_dir / "checkpoints" / "epoch_latest.pt"
    assert latest.exists()
    job_log = (tmp_path / "job.log").read_text()
    assert "requeued job 123; it continues from the newest checkpoint" in job_log
    if name == "SIGTERM":
        assert "batch shell got SIGTERM" in job_log

    # slurm starts the requeued job: the same script, SLURM_RESTART_COUNT set
    assert finish(job("v3", SLURM_RESTART_COUNT="1"), tmp_path) == 0
    assert f"resumed from {latest} at epoch" in (run_dir / "out.log").read_text()
    assert (run_dir / "checkpoints" / "epoch_6.pt").exists()
    assert scontrol_calls(tmp_path) == ["requeue 123"]  # not called again


@pytest.mark.parametrize("code, requeued, restarts", [(0, False, "0"), (76, True, "3"), (75, False, "20"),
                                                      (77, False, "0"), (1, False, "0")])
def test_exit_codes_decide_the_requeue(code, requeued, restarts, job, tmp_path):
    """76 (a lost rank) requeues; 77 (NaN steps), errors and MAX_REQUEUES (20) reached do not."""
    shell = job("v3", SRUN_RECORD=str(tmp_path / "argv.json"), SRUN_EXIT=str(code), SLURM_RESTART_COUNT=restarts)
    assert finish(shell, tmp_path) == code
    assert scontrol_calls(tmp_path) == (["requeue 123"] if requeued else [])
    if code == 77:
        assert "resuming would repeat them" in (tmp_path / "job.log").read_text()


@pytest.mark.parametrize("version", ["openclip", "v0", "v1", "v2", "v3"])
def test_same_runs_as_train_cc3m_plus_a_mid_epoch_checkpoint_cadence(version, job, tmp_path):
    def argv(script: Path, **extra_env: str) -> list[str]:
        extra_env = {"EXTRA_ARGS": "", **extra_env}
        assert finish(job(version, script=script, SRUN_RECORD=str(tmp_path / "argv.json"), **extra_env),
                      tmp_path) == 0
        return json.loads((tmp_path / "argv.json").read_text())

    cc3m = argv(ROOT / "scripts" / "train_cc3m.sh")
    assert "--resume" in cc3m and cc3m[cc3m.index("--resume") + 1] == "latest"
    assert argv(SCRIPT) == cc3m + ["--save-every-minutes", "30"]
    assert argv(SCRIPT, SAVE_EVERY_MINUTES="5", EXTRA_ARGS="--epochs 2") == cc3m + [
        "--save-every-minutes", "5", "--epochs", "2"]
