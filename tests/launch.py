"""Launch the training script as the seed does, on real processes: torchrun, or slurm's variables."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

from conftest import free_port

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 300


def clean_env() -> dict[str, str]:
    """This environment without any launcher's variables, one thread per process."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "MASTER_", "RANK", "LOCAL_RANK", "WORLD_SIZE", "TORCHELASTIC"))}
    env["OMP_NUM_THREADS"] = "1"
    return env


def start_torchrun(argv: list[str], nproc: int = 2, output: Path | None = None,
                   launcher_flags: tuple[str, ...] = ()) -> subprocess.Popen:
    """`cd src && torchrun --nproc_per_node=N -m training.main ...` (as `python -m torch.distributed.run`)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           f"--rdzv_endpoint=127.0.0.1:{free_port()}", *launcher_flags, "-m", "training.main", *argv]
    return _popen(cmd, ROOT / "src", clean_env(), output)


def start_slurm(argv: list[str], ntasks: int = 2, outputs: list[Path] | None = None) -> list[subprocess.Popen]:
    """One `python -u src/training/main.py ...` per task with the variables srun sets."""
    port = free_port()
    processes = []
    for rank in range(ntasks):
        env = clean_env()
        env.update(SLURM_PROCID=str(rank), SLURM_NTASKS=str(ntasks), SLURM_LOCALID=str(rank),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   PYTHONPATH=os.pathsep.join(filter(None, [env.get("PYTHONPATH"), str(ROOT / "src")])))
        cmd = [sys.executable, "-u", "src/training/main.py", *argv]
        processes.append(_popen(cmd, ROOT, env, outputs[rank] if outputs else None))
    return processes


def _popen(cmd: list[str], cwd: Path, env: dict[str, str], output: Path | None) -> subprocess.Popen:
    stdout = open(output, "w") if output else subprocess.PIPE
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=stdout, stderr=subprocess.STDOUT, text=True)
    if output:
        stdout.close()
    return proc


def finish(processes: list[subprocess.Popen], timeout: float = TIMEOUT_S) -> list[int]:
    """Wait for every process; their exit codes."""
    deadline = time.monotonic() + timeout
    for proc in processes:
        proc.wait(timeout=max(deadline - time.monotonic(), 1))
    return [proc.returncode for proc in processes]


def check(processes: list[subprocess.Popen]) -> None:
    for proc in processes:
        out, _ = proc.communicate(timeout=TIMEOUT_S)
        assert proc.returncode == 0, (out or "")[-4000:]


def wait_for_line(path: Path, pattern: str, timeout: float = TIMEOUT_S, process: subprocess.Popen | None = None) -> str:
    """The first line of the file `path` matching the regex `pattern`, once it appears."""
    deadline = time.monotonic() + timeout
    regex = re.compile(pattern)
    while time.monotonic() < deadline:
        if path.exists():
            for line in path.read_text().splitlines():
                if regex.search(line):
                    return line
        if process is not None and process.poll() is not None:
            raise AssertionError(f"the process ended (rc {process.returncode}) before {pattern!r} appeared in {path}")
        time.sleep(0.2)
    raise AssertionError(f"{pattern!r} did not appear in {path} within {timeout} s")
