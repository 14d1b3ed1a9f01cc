"""The command line's start runs without the garbage collector and ends with its objects frozen
(fastclip.run.collector); a program that calls training.main.main() itself keeps its collector as it was."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import SEED_COMMANDS, scaled, tiny_run
from launch import ROOT, clean_env

MAIN = ROOT / "src" / "training" / "main.py"
# what the process's collector did, printed at its exit: full collections during the start (before the
# first step's log line), whether it collects at the end, how many objects it froze
PROBE = """\
import atexit, gc, logging, runpy, sys
full_collections, started = [0], []
gc.callbacks.append(lambda phase, info: phase == "stop" and info["generation"] == 2 and not started
                    and full_collections.__setitem__(0, full_collections[0] + 1))
class FirstStep(logging.Filter):
    def filter(self, record):
        if "Train Epoch" in record.getMessage():
            started.append(True)
        return True
logging.getLogger("fastclip").addFilter(FirstStep())  # the training log (fastclip.run.log)
atexit.register(lambda: print("COLLECTOR", full_collections[0], gc.isenabled(), gc.get_freeze_count(), flush=True))
"""


def collector_at_exit(script: str, cwd: Path) -> tuple[int, bool, int]:
    done = subprocess.run([sys.executable, "-c", script], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={**clean_env(), "PYTHONPATH": str(ROOT / "src")})
    assert done.returncode == 0, done.stderr[-3000:]
    [line] = [line for line in done.stdout.splitlines() if line.startswith("COLLECTOR ")]
    full, enabled, frozen = line.split()[1:]
    return int(full), enabled == "True", int(frozen)


def argv(demo_data, tmp_path: Path, name: str) -> list[str]:
    return scaled(SEED_COMMANDS["fastclip-v3"], **{**tiny_run(demo_data, tmp_path / "logs", name, epochs=1),
                                                   "workers": 1})


def test_the_command_line_starts_without_collections_and_freezes_what_it_built(demo_data, tmp_path):
    script = PROBE + f"sys.argv = [{str(MAIN)!r}, *{argv(demo_data, tmp_path, 'cli')!r}]\n" \
                     f"runpy.run_path({str(MAIN)!r}, run_name='__main__')\n"
    full, enabled, frozen = collector_at_exit(script, tmp_path)
    assert full == 0  # torch's, open_clip's and the library's imports ran 7 of them with the collector on
    assert enabled and frozen > 100_000


def test_a_program_calling_main_keeps_its_collector(demo_data, tmp_path):
    script = PROBE + "from training.main import main\n" \
                     f"if __name__ == '__main__':\n    main({argv(demo_data, tmp_path, 'library')!r})\n"
    full, enabled, frozen = collector_at_exit(script, tmp_path)
    assert full > 0 and enabled and frozen == 0
