"""The commands `pip install .` puts on the PATH run their programs."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import distribution
from pathlib import Path

import pytest

COMMANDS = {
    "fastclip-train": "training.main:cli",
    "fastclip-index": "fastclip.data.index:main",
    "fastclip-export": "fastclip.tools.export:main",
    "fastclip-plot": "fastclip.tools.plot:main",
}


def installed_commands() -> dict[str, str]:
    return {entry.name: entry.value for entry in distribution("fastclip").entry_points
            if entry.group == "console_scripts"}


def test_the_package_declares_every_command():
    assert installed_commands() == COMMANDS, "stale install: run `make install` (pip install -e .)"


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_each_command_runs_its_program(command):
    script = Path(sys.executable).parent / command
    assert script.is_file(), f"{script} is missing: run `make install` (pip install -e .)"
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage:")


def test_a_failing_train_command_exits_with_its_one_line_error(tmp_path):
    script = Path(sys.executable).parent / "fastclip-train"
    result = subprocess.run([str(script), "--batch-size", "0"], capture_output=True, text=True, timeout=120,
                            cwd=tmp_path)
    assert result.returncode != 0
    assert result.stderr.strip().startswith("error:") and "--batch-size" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
