"""A process's start without the cyclic garbage collector, for the processes that are ours alone: the
command line's rank and the workers' forkserver.

Importing torch, torchvision, open_clip and this library creates a few million objects that live as long as
the process. With the collector on, creating them runs about 1,100 collections, 7 of them walks of the whole
heap so far: 0.8 s of a 3.9 s import on 2 cores, and none of them frees anything. So the start runs with the
collector paused; at its end everything then alive is frozen (`gc.freeze()`: no later collection walks it
again, in this process or in a fork of it, as Python's documentation recommends before forking) and the
collector resumes. What the start leaves as cyclic garbage is kept (measured: about 10,000 objects of the
imports, 2 MB, no tensor; a collection to free them would cost 0.3 s). A program that calls
`training.main.main` from its own code keeps its collector as it is: its heap is its own.
"""

from __future__ import annotations

import gc

_paused = False


def pause_while_starting() -> None:
    """Pause the collector until `resume_frozen` (no-op where it is off already)."""
    global _paused
    if gc.isenabled():
        gc.disable()
        _paused = True


def resume_frozen() -> None:
    """End a pause of `pause_while_starting`: freeze everything alive now, then resume the collector.
    Does nothing where no pause began, so any code path may call it."""
    global _paused
    if _paused:
        gc.freeze()
        gc.enable()
        _paused = False
