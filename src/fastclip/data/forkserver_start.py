"""Imported first by the workers' forkserver (fastclip.data.workers.PRELOADED): its imports of torch,
torchvision, open_clip and the data modules run with the garbage collector paused
(fastclip.run.collector); `forkserver_end`, imported last, freezes them and resumes it. Imported anywhere
but in the forkserver's start, it does nothing.
"""

from __future__ import annotations

import sys

from ..run import collector


def in_forkserver_start() -> bool:
    """Is this the preload of multiprocessing's forkserver (`multiprocessing.forkserver.main`)?"""
    frame = sys._getframe()
    while frame is not None:
        if frame.f_code.co_name == "main" and frame.f_globals.get("__name__") == "multiprocessing.forkserver":
            return True
        frame = frame.f_back
    return False


if in_forkserver_start():
    collector.pause_while_starting()
