"""Run a function on K real gloo processes; an exception in any of them fails the calling test."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import free_port


def _entry(rank: int, world: int, port: int, fn, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        fn(*args)
    finally:
        dist.destroy_process_group()


def spawn(world: int, fn, *args) -> None:
    """fn(*args) on `world` gloo processes (fn must be a module-level function)."""
    mp.spawn(_entry, args=(world, free_port(), fn, args), nprocs=world, join=True)
