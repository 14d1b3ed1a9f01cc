"""Who am I in the job: rank, world size and device, from torchrun, SLURM or nothing at all."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from . import control


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_master(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _launcher_ranks() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's or SLURM's variables; (0, 1, 0) when neither."""
    env = os.environ
    if "WORLD_SIZE" in env and "RANK" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
    return 0, 1, 0


def _pick_device(local_rank: int, requested: str) -> torch.device:
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError(f"--device {requested} asked for CUDA, but torch.cuda.is_available() is False")
    device = torch.device("cuda", local_rank % torch.cuda.device_count())
    torch.cuda.set_device(device)
    return device


def init_distributed(
    device: str = "auto", backend: str | None = None, dist_url: str = "env://", timeout_s: int = 1800
) -> DistEnv:
    """Start the process group when launched with several processes; a single process needs none.

    Under SLURM (srun) MASTER_ADDR / MASTER_PORT come from the job script, as in the seed's commands.
    The backend is gloo on CPU and NCCL on GPU unless `backend` says otherwise; `timeout_s` bounds how
    long any collective waits for a rank that hung or died (--dist-timeout).
    """
    rank, world_size, local_rank = _launcher_ranks()
    torch_device = _pick_device(local_rank, device)
    if world_size > 1 and not dist.is_initialized():
        backend = backend or ("nccl" if torch_device.type == "cuda" else "gloo")
        if dist_url == "env://":
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", "29500")
        timeout = datetime.timedelta(seconds=timeout_s)
        dist.init_process_group(backend=backend, store=_attempt_store(dist_url, rank, world_size, timeout),
                                rank=rank, world_size=world_size, timeout=timeout)
        control.init_control_group(timeout)
    return DistEnv(rank=rank, world_size=world_size, local_rank=local_rank, device=torch_device)


def _attempt_store(url: str, rank: int, world_size: int, timeout: datetime.timedelta) -> dist.Store:
    """The rendezvous store of `url`, its keys prefixed with torchrun's restart count.

    After `torchrun --max-restarts` restarts a group, the store can still hold the previous group's
    keys (the gloo addresses of dead workers): a new worker that reads one before its peer rewrites it
    fails to connect. A prefix per attempt keeps every group to its own keys.
    """
    store, _, _ = next(dist.rendezvous(url, rank, world_size, timeout=timeout))
    return dist.PrefixStore(f"fastclip/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def close_distributed() -> None:
    control.close_control_group()
    if dist.is_initialized():
        dist.destroy_process_group()
