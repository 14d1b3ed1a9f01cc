"""A script calling training.main.main() at its top level, without `if __name__ == "__main__":`, would start a
training in every DataLoader worker (each imports the script again): it stops at start with one line naming
the fix, before a run folder exists. The same check lets a guarded script through."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import SEED_COMMANDS, scaled, tiny_run
from launch import ROOT, clean_env

FIX = 'put the call under `if __name__ == "__main__":`'


def run_script(path: Path, text: str) -> subprocess.CompletedProcess:
    path.write_text(text)
    env = {**clean_env(), "PYTHONPATH": str(ROOT / "src")}
    return subprocess.run([sys.executable, str(path)], cwd=path.parent, env=env, capture_output=True, text=True,
                          timeout=300)


def test_a_script_without_the_guard_stops_with_one_line(demo_data, tmp_path):
    argv = scaled(SEED_COMMANDS["openclip"], **{**tiny_run(demo_data, tmp_path / "logs", "unguarded"), "workers": 1})
    script = tmp_path / "train_unguarded.py"
    done = run_script(script, f"from training.main import main\n\nmain({argv!r})\n")
    assert done.returncode == 1
    assert (done.stdout + done.stderr).strip().splitlines() == [
        f"error: {script} calls training.main.main() at its top level, so every DataLoader worker, which imports "
        f"the script again, would start a training: {FIX}"]
    assert not (tmp_path / "logs").exists()  # no run folder: nothing started, in the script or in a worker


def test_a_guarded_script_passes(tmp_path):
    done = run_script(tmp_path / "train_guarded.py", "from training.reimport import check_script_guard\n\n"
                                                     "if __name__ == '__main__':\n    check_script_guard(workers=1)\n"
                                                     "    print('checked')\n")
    assert done.returncode == 0 and done.stdout.strip() == "checked", done.stderr[-2000:]
