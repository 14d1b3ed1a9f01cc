"""Every process a rank starts (the workers' forkserver, its DataLoader workers, multiprocessing's resource
tracker) ends with the rank, however the rank ends: killed with SIGKILL (the OOM killer, slurm after a
preemption's grace period), or at a normal end."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from conftest import SEED_COMMANDS, scaled, tiny_run
from launch import ROOT, clean_env, finish, start_slurm, wait_for_line
from processes import command_line, descendants, still_running

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")

FIRST_STEP = r"Train Epoch: 0 \["
GONE_WITHIN_S = 15


def argv(demo, logs, name: str, epochs: int = 3) -> list[str]:
    """The seed's FastCLIP-v3 command on the demo shards with 2 loader workers and a validation set."""
    return scaled(SEED_COMMANDS["fastclip-v3"], **{**tiny_run(demo, logs, name, epochs=epochs), "workers": 2,
                                                   "val_data": demo.train_shards, "log_every_n_steps": 1})


def rank_processes(pids: list[int], expected: int) -> set[int]:
    """The processes below `pids`, once each rank has its forkserver, resource tracker and 2 workers."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        found = set().union(*(descendants(pid) for pid in pids))
        if len(found) >= expected:
            return found
        time.sleep(0.2)
    raise AssertionError(f"expected {expected} processes below {pids}, found {sorted(found)}")


def assert_all_gone(pids: set[int]) -> None:
    left = still_running(pids, GONE_WITHIN_S)
    assert not left, "still running: " + "; ".join(f"{pid} {command_line(pid)[:120]}" for pid in sorted(left))


def test_sigkill_of_a_process_leaves_none_of_its_processes(demo_data, tmp_path):
    [rank] = start_slurm(argv(demo_data, tmp_path, "run"), ntasks=1, outputs=[tmp_path / "out.txt"])
    try:
        wait_for_line(tmp_path / "out.txt", FIRST_STEP, process=rank)
        started = rank_processes([rank.pid], expected=4)  # forkserver, resource tracker, 2 workers
        rank.send_signal(signal.SIGKILL)
        rank.wait()
    finally:
        rank.kill()
    assert_all_gone(started)


def test_sigkill_of_one_gloo_rank_leaves_no_process_of_either(demo_data, tmp_path):
    outputs = [tmp_path / "rank0.txt", tmp_path / "rank1.txt"]
    ranks = start_slurm(argv(demo_data, tmp_path, "run", epochs=20), outputs=outputs)
    try:
        wait_for_line(outputs[0], FIRST_STEP, process=ranks[0])
        started = rank_processes([r.pid for r in ranks], expected=8)
        ranks[1].send_signal(signal.SIGKILL)
        finish(ranks, timeout=120)  # rank 0 sees its peer gone and exits (76)
    finally:
        for rank in ranks:
            rank.kill()
    assert ranks[0].returncode != 0
    assert_all_gone(started)


def test_a_normal_end_leaves_none_of_its_processes(demo_data, tmp_path):
    short = scaled(argv(demo_data, tmp_path, "run", epochs=1), train_num_samples=256)  # 8 steps, then evaluation
    [rank] = start_slurm(short, ntasks=1, outputs=[tmp_path / "out.txt"])
    seen: set[int] = set()
    while rank.poll() is None:  # the training loader's workers, then the evaluation loader's
        seen |= descendants(rank.pid)
        time.sleep(0.1)
    assert rank.returncode == 0, (tmp_path / "out.txt").read_text()[-3000:]
    assert len(seen) >= 4
    assert_all_gone(seen)


FORKSERVER_CLIENT = """
import multiprocessing, sys
from multiprocessing import forkserver
context = multiprocessing.get_context("forkserver")
context.set_forkserver_preload(sys.argv[1:])
worker = context.Process(target=print)
worker.start()
worker.join()
print(forkserver._forkserver._forkserver_pid)
"""
FINALISED_MARKER = """
import atexit, os, pathlib
atexit.register(lambda: pathlib.Path(os.environ["FINALISED"]).write_text("finalised"))
"""


@pytest.mark.parametrize("quick_end", [True, False], ids=["with forkserver_end", "without"])
def test_the_forkserver_ends_without_finalising_its_imports(tmp_path, quick_end):
    """fastclip.data.forkserver_end, preloaded last, ends the server before the exit handlers of the
    modules preloaded before it (torch's, open_clip's: a second of finalising) run; without it they run."""
    (tmp_path / "finalised_marker.py").write_text(FINALISED_MARKER)
    marker = tmp_path / "finalised.txt"
    preload = ["finalised_marker", *(["fastclip.data.forkserver_end"] if quick_end else [])]
    env = {**clean_env(), "PYTHONPATH": f"{tmp_path}:{ROOT / 'src'}", "FINALISED": str(marker)}
    done = subprocess.run([sys.executable, "-c", FORKSERVER_CLIENT, *preload], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    server = int(done.stdout.split()[-1])
    assert not still_running({server}, GONE_WITHIN_S)
    assert marker.exists() != quick_end


def test_forkserver_end_does_nothing_outside_the_forkserver():
    import atexit
    import gc

    before = atexit._ncallbacks(), gc.get_freeze_count()
    import fastclip.data.forkserver_end  # noqa: F401

    assert (atexit._ncallbacks(), gc.get_freeze_count()) == before
