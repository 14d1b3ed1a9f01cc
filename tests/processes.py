"""Processes as the kernel sees them (/proc, Linux): a process's descendants, whether they still run, and
the processes that outlived the test session that started them."""

from __future__ import annotations

import os
import time
from pathlib import Path

PROC = Path("/proc")
# set in every process the suite starts (they inherit it): its value is the pytest process's pid
SESSION_MARK = "FASTCLIP_TEST_SESSION"


def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (state, ppid, ...), None once it has gone."""
    try:
        return (PROC / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None


def _pids() -> list[int]:
    return [int(p.name) for p in PROC.iterdir() if p.name.isdigit()]


def running(pid: int) -> bool:
    """Still running (a zombie has ended: it only waits for its parent to read its exit status)."""
    fields = _stat(pid)
    return fields is not None and fields[0] != "Z"


def descendants(pid: int) -> set[int]:
    """Every running process below `pid` in the process tree."""
    children: dict[int, list[int]] = {}
    for other in _pids():
        fields = _stat(other)
        if fields is not None and fields[0] != "Z":
            children.setdefault(int(fields[1]), []).append(other)
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def still_running(pids: set[int], timeout: float) -> set[int]:
    """The processes of `pids` still running after waiting up to `timeout` seconds for them to end."""
    deadline = time.monotonic() + timeout
    left = {pid for pid in pids if running(pid)}
    while left and time.monotonic() < deadline:
        time.sleep(0.1)
        left = {pid for pid in left if running(pid)}
    return left


def command_line(pid: int) -> str:
    try:
        return (PROC / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except (FileNotFoundError, ProcessLookupError):
        return "(gone)"


def orphans_of_session(session: str) -> set[int]:
    """Processes marked with this test session that no longer descend from it: left behind by a process
    the session started and that has ended."""
    own = descendants(os.getpid()) | {os.getpid()}
    marked = set()
    for pid in _pids():
        if pid in own:
            continue
        try:
            environ = (PROC / str(pid) / "environ").read_bytes().split(b"\0")
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        if f"{SESSION_MARK}={session}".encode() in environ and running(pid):
            marked.add(pid)
    return marked
