"""A script that calls `training.main.main([...])` at its top level must guard the call.

DataLoader workers start from a forkserver (fastclip.data.workers), and multiprocessing imports the
parent's main script again in every child it starts that way (as spawn does), to find the functions the
child runs. A script that calls `main` outside `if __name__ == "__main__":` therefore starts a training
in every worker: it ended in "logs/NAME is in use by another run", or in a second run inside a worker.

Both sides are checked. In a child, `main` ends the child at once when it is called while the child
imports the parent's script (multiprocessing's own bootstrap marker, the one behind "An attempt has been
made to start a new process before the current process has finished its bootstrapping phase"). In the
parent, a `main` called from the main script's top-level code, with loader workers to start, first
starts one child from the workers' forkserver: if that child ends that way, the run stops with one line
naming the fix, before its run folder or process group exist. The check comes after the flags' preflight,
which imports what the forkserver imports, so the two import side by side and the check itself costs
~0.1 s (run first, it held the script's start for the forkserver's whole import, ~3 s).
"""

from __future__ import annotations

import multiprocessing
import os
import sys

REIMPORTED = 3  # a child's exit code when its import of the parent's script called main()
FIX = 'put the call under `if __name__ == "__main__":`'


def in_child_bootstrap() -> bool:
    """True while a spawn or forkserver child imports the parent's main script."""
    return bool(getattr(multiprocessing.current_process(), "_inheriting", False))


def stop_in_child_bootstrap() -> None:
    """In a child importing the parent's script, end the child before it trains, at once and without a
    word: the parent's `check_script_guard` says why (a forkserver child would swallow a SystemExit's
    message, and its stderr need not be where the parent's log goes)."""
    if in_child_bootstrap():
        os._exit(REIMPORTED)


def _called_at_top_level() -> bool:
    """Is the main script still running its top-level code, one of whose calls led here? (An interactive
    session or a notebook has no script that a child could import.)"""
    script = sys.modules.get("__main__")
    if getattr(script, "__file__", None) is None:
        return False
    frame = sys._getframe()
    while frame is not None:
        if frame.f_code.co_name == "<module>" and frame.f_globals is vars(script):
            return True
        frame = frame.f_back
    return False


def _nothing() -> None:
    pass


def check_script_guard(workers: int) -> None:
    """Stop with one line when the calling script would start a training in each of `workers` loader
    workers; called by `main` after the flags' preflight, before the run folder and the process group."""
    if workers == 0 or not _called_at_top_level():
        return
    from fastclip.data.workers import worker_context

    probe = worker_context(workers).Process(target=_nothing)
    probe.start()
    probe.join()
    if probe.exitcode == REIMPORTED:
        raise SystemExit(f"error: {sys.modules['__main__'].__file__} calls training.main.main() at its top level, so "
                         f"every DataLoader worker, which imports the script again, would start a training: {FIX}")
