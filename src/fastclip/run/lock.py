"""One run per folder: `logs/NAME/.lock`, held by rank 0 for the whole run.

The lock is an `fcntl.flock` on the file, which the kernel (or the network file system's lock
manager) drops when its process dies, however it dies: a requeued or restarted job takes over the
lock of its dead predecessor, and the file's text says who held it.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import logging
import os
import socket
from pathlib import Path

logger = logging.getLogger("fastclip")


class RunFolderBusy(RuntimeError):
    """Another live process holds the run folder."""


class RunLock:
    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / ".lock"
        self._fd: int | None = None

    def acquire(self) -> str | None:
        """Take the lock or raise `RunFolderBusy` naming its holder; returns who held it last, if it was
        not released (its process died), for the log."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read(fd)
            os.close(fd)
            raise RunFolderBusy(
                f"{self.path.parent} is in use by another run ({_describe(holder)}): wait for it to end, stop "
                "it, or pick another --name"
            ) from None
        except OSError as error:
            if error.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                os.close(fd)
                raise
            logger.warning("%s: this file system does not support locks (%s); nothing stops a second run "
                           "from using the same folder", self.path, os.strerror(error.errno))
        previous = _read(fd)
        holder = {"host": socket.gethostname(), "pid": os.getpid(),
                  "started": datetime.datetime.now().isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        self._fd = fd
        return _describe(previous) if previous else None

    def release(self) -> None:
        """Empty the file and drop the lock (the file stays: deleting it would race with a new holder)."""
        if self._fd is None:
            return
        os.ftruncate(self._fd, 0)
        os.close(self._fd)
        self._fd = None


def _read(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 4096, 0) or b"{}")
    except ValueError:
        return {}


def _describe(holder: dict) -> str:
    if not holder:
        return "holder unknown"
    return f"pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}"
