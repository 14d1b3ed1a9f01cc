"""Shared test helpers: the seed's command lines, a free port for process groups."""

from __future__ import annotations

import re
import shlex
import socket
from pathlib import Path

import pytest

FIXTURES = Path(__file__).with_name("fixtures")


def seed_commands() -> dict[str, list[str]]:
    """The seed README's `main.py` command lines as argument lists, keyed by version name."""
    text = (FIXTURES / "seed_commands.sh").read_text()
    commands = {}
    for name, body in re.findall(r"^# (\S+)\n(srun .*?)(?:\n\n|\Z)", text, re.M | re.S):
        words = shlex.split(body.replace("\\\n", " "))
        commands[name] = words[words.index("src/training/main.py") + 1 :]
    return commands


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def port() -> int:
    return free_port()
