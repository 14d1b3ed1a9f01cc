"""Imported last by the workers' forkserver (fastclip.data.workers.PRELOADED): hand its imports to the
workers without a garbage collection that walks them, and end the server at once when its client has
gone, without tearing its imports down.

Freeze (then the collector resumes where `forkserver_start` paused it): every worker is a fork of the server
and shares its heap (torch, torchvision, open_clip: a few million objects) until it writes to it. A worker's
first full collection would walk all of them, writing each object's collector header, so it copied most of
that heap and took ~0.25 s of the worker's start here (it fell in the unpickling of the worker's dataset, so
the rank waited on it too). `gc.freeze()` moves everything imported so far out of the collector's reach, as
Python's documentation recommends before forking without exec.

End: the forkserver leaves its loop when the training process exits; an interpreter that has imported torch,
torchvision and open_clip then takes about a second to finalise, and the server holds the training
process's stdout and stderr all that while, so whoever reads them (a test, a benchmark, a pipe into
`tee`) waits a second more than the run. The server owns nothing that finalising would release: its
workers are gone or going (each watches its rank), shared memory belongs to multiprocessing's resource
tracker. So its first exit handler (atexit runs the last registered first) ends it on the spot.
Imported anywhere but in the forkserver's start, it does nothing.
"""

from __future__ import annotations

import atexit
import gc
import os

from ..run import collector
from .forkserver_start import in_forkserver_start

if in_forkserver_start():
    gc.freeze()  # for the workers, whether or not forkserver_start paused the collector
    collector.resume_frozen()
    atexit.register(os._exit, 0)
