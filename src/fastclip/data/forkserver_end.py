"""Imported last by the workers' forkserver (fastclip.data.workers.PRELOADED): end the server at once
when its client has gone, without tearing its imports down.

The forkserver leaves its loop when the training process exits; an interpreter that has imported torch,
torchvision and open_clip then takes about a second to finalise, and the server holds the training
process's stdout and stderr all that while, so whoever reads them (a test, a benchmark, a pipe into
`tee`) waits a second more than the run. The server owns nothing that finalising would release: its
workers are gone or going (each watches its rank), shared memory belongs to multiprocessing's resource
tracker. So its first exit handler (atexit runs the last registered first) ends it on the spot.
Imported anywhere but in the forkserver's start, it does nothing.
"""

from __future__ import annotations

import atexit
import os
import sys


def _in_forkserver_start() -> bool:
    """Is this import the preload of multiprocessing's forkserver (`multiprocessing.forkserver.main`)?"""
    frame = sys._getframe()
    while frame is not None:
        if frame.f_code.co_name == "main" and frame.f_globals.get("__name__") == "multiprocessing.forkserver":
            return True
        frame = frame.f_back
    return False


if _in_forkserver_start():
    atexit.register(os._exit, 0)
