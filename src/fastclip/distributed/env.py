"""Who am I in the job and where is rank 0: rank, world size, device and the rendezvous address.

The launcher is the first of these whose rank and world size are both set; rank, world size and
local rank are all read from that one launcher, never mixed (the variables open_clip_train reads):
  torchrun         RANK, WORLD_SIZE, LOCAL_RANK
  slurm (srun)     SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID
  MPICH/Intel MPI  PMI_RANK, PMI_SIZE, MPI_LOCALRANKID
  Open MPI         OMPI_COMM_WORLD_RANK, OMPI_COMM_WORLD_SIZE, OMPI_COMM_WORLD_LOCAL_RANK
None of them: one process. A launcher that leaves its local rank unset gives local rank 0.

With --dist-url env:// and MASTER_ADDR unset, the launcher says where rank 0 runs: under slurm, on the
first host of SLURM_STEP_NODELIST (else SLURM_JOB_NODELIST, SLURM_NODELIST), read without `scontrol`;
under mpirun, on this host when its local size (MPI_LOCALNRANKS, OMPI_COMM_WORLD_LOCAL_SIZE) equals the world size. A job on
several nodes whose rank 0 cannot be found stops at once with a one-line LauncherError, where other
nodes would otherwise wait --dist-timeout for a rank 0 at 127.0.0.1. A job on one node, and torchrun's
variables without MASTER_ADDR, use 127.0.0.1. MASTER_PORT is 29500 unless set.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Mapping

import torch
import torch.distributed as dist

from . import control
from .hostlist import expand_hostlist


LOCALHOST = "127.0.0.1"
DEFAULT_PORT = "29500"
# srun starts rank 0 on the first node of its step, which `srun -N n` inside a larger allocation can
# make another than the job's first node: the step's list comes first
SLURM_NODELISTS = ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")
SLURM_FIX = "add to the job script: export MASTER_ADDR=$(scontrol show hostnames $SLURM_JOB_NODELIST | head -n 1)"


class LauncherError(SystemExit):
    """The launcher's variables cannot start the process group: exits with one line, "error: ...",
    before any rank waits for a rendezvous that cannot happen."""

    def __init__(self, message: str) -> None:
        super().__init__(f"error: {message}")


@dataclass(frozen=True)
class Launcher:
    """The variables one launcher sets; `local_size` (ranks on this host) tells a single-host mpirun."""

    name: str
    rank: str
    size: str
    local_rank: str
    local_size: str | None = None


LAUNCHERS = (  # in order of precedence
    Launcher("torchrun", "RANK", "WORLD_SIZE", "LOCAL_RANK"),
    Launcher("slurm", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"),
    Launcher("mpirun (MPICH, Intel MPI)", "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"),
    Launcher("mpirun (Open MPI)", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK",
             "OMPI_COMM_WORLD_LOCAL_SIZE"),
)


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    rendezvous: str = ""  # where the process group met, for the run's log (set up before logging is)

    @property
    def is_master(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def find_launcher(environ: Mapping[str, str] = os.environ) -> Launcher | None:
    """The first launcher in LAUNCHERS that set both its rank and its world size; None without one."""
    return next((launcher for launcher in LAUNCHERS if launcher.rank in environ and launcher.size in environ), None)


def launcher_ranks(environ: Mapping[str, str] = os.environ) -> tuple[int, int, int]:
    """(rank, world_size, local_rank), all three from the same launcher; (0, 1, 0) without one."""
    launcher = find_launcher(environ)
    if launcher is None:
        return 0, 1, 0
    local_rank = _integer(environ, launcher.local_rank) if launcher.local_rank in environ else 0
    return _integer(environ, launcher.rank), _integer(environ, launcher.size), local_rank


def _integer(environ: Mapping[str, str], name: str) -> int:
    try:
        return int(environ[name])
    except ValueError:
        raise LauncherError(f"{name}={environ[name]!r} is not a whole number") from None


def master_address(environ: Mapping[str, str] = os.environ) -> tuple[str, str]:
    """(address of rank 0's host, where it came from) for a group of several processes.

    Raises LauncherError when the job spans several hosts and nothing says which one runs rank 0.
    """
    if environ.get("MASTER_ADDR"):
        return environ["MASTER_ADDR"], "set in the environment"
    launcher = find_launcher(environ)
    if launcher is not None and launcher.name == "slurm":
        return _slurm_master(environ)
    if launcher is not None and launcher.local_size is not None:
        return _mpirun_master(launcher, environ)
    return LOCALHOST, "the default for one host"


def _slurm_master(environ: Mapping[str, str]) -> tuple[str, str]:
    """The first host of the job's node list when the job spans several nodes; 127.0.0.1 on one node."""
    nodes = _integer(environ, "SLURM_NNODES") if environ.get("SLURM_NNODES") else None
    name = next((name for name in SLURM_NODELISTS if environ.get(name)), None)
    if nodes is not None and nodes <= 1:
        return LOCALHOST, f"a job on one node: SLURM_NNODES={nodes}"
    if name is None and nodes is None:
        return LOCALHOST, "neither SLURM_NNODES nor a node list: taken for a job on one node"
    if name is None:
        raise LauncherError(f"this slurm job runs on {nodes} nodes (SLURM_NNODES) and neither MASTER_ADDR nor "
                            f"{' nor '.join(SLURM_NODELISTS)} is set to tell where rank 0 runs; {SLURM_FIX}")
    try:
        hosts = expand_hostlist(environ[name])
    except ValueError as error:
        raise LauncherError(f"{name}: {error}; {SLURM_FIX}") from None
    if nodes is None and len(hosts) == 1:
        return LOCALHOST, f"a job on one node: {name}={environ[name]}"
    return hosts[0], f"the first host of {name}={environ[name]}"


def _mpirun_master(launcher: Launcher, environ: Mapping[str, str]) -> tuple[str, str]:
    """127.0.0.1 when mpirun put every process on this host; nothing else tells where rank 0 runs."""
    size, local_size = environ[launcher.size], environ.get(launcher.local_size)
    if local_size is not None and _integer(environ, launcher.local_size) == _integer(environ, launcher.size):
        return LOCALHOST, f"one host: {launcher.local_size} = {launcher.size} = {size}"
    seen = f"{launcher.local_size}={local_size}" if local_size is not None else f"{launcher.local_size} unset"
    raise LauncherError(
        f"MASTER_ADDR is not set and the {size} processes of {launcher.name} are not known to share one host "
        f"({seen}, {launcher.size}={size}): multi-node mpirun needs MASTER_ADDR, the address of rank 0's host, "
        "in every process (Open MPI: mpirun -x MASTER_ADDR=<host>; MPICH, Intel MPI: mpirun -genv MASTER_ADDR <host>)")


def _set_rendezvous_env(world_size: int) -> str:
    """MASTER_ADDR and MASTER_PORT for env://; returns a line that says where the address came from."""
    address, source = master_address()
    os.environ["MASTER_ADDR"] = address
    os.environ.setdefault("MASTER_PORT", DEFAULT_PORT)
    return (f"process group of world size {world_size}: MASTER_ADDR {address} ({source}), "
            f"MASTER_PORT {os.environ['MASTER_PORT']}")


def _pick_device(local_rank: int, requested: str, set_device_rank: bool = True) -> torch.device:
    """The CPU, or the GPU of this local rank (cuda:0 without `set_device_rank`: --no-set-device-rank,
    for launchers that give every process its own CUDA_VISIBLE_DEVICES)."""
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError(f"--device {requested} asked for CUDA, but torch.cuda.is_available() is False")
    index = local_rank % torch.cuda.device_count() if set_device_rank else 0
    device = torch.device("cuda", index)
    torch.cuda.set_device(device)
    return device


def init_distributed(
    device: str = "auto", backend: str | None = None, dist_url: str = "env://", timeout_s: int = 1800,
    set_device_rank: bool = True,
) -> DistEnv:
    """Start the process group when launched with several processes; a single process needs none.

    With env:// the rendezvous address comes from MASTER_ADDR, else from the launcher (module docstring).
    The backend is gloo on CPU and NCCL on GPU unless `backend` says otherwise; `timeout_s` bounds how
    long any collective waits for a rank that hung or died (--dist-timeout).
    """
    rank, world_size, local_rank = launcher_ranks()
    torch_device = _pick_device(local_rank, device, set_device_rank)
    rendezvous = ""
    if world_size > 1 and not dist.is_initialized():
        backend = backend or ("nccl" if torch_device.type == "cuda" else "gloo")
        rendezvous = _set_rendezvous_env(world_size) if dist_url == "env://" else f"process group at {dist_url}"
        timeout = datetime.timedelta(seconds=timeout_s)
        dist.init_process_group(backend=backend, store=_attempt_store(dist_url, rank, world_size, timeout),
                                rank=rank, world_size=world_size, timeout=timeout)
        control.init_control_group(timeout)
    return DistEnv(rank=rank, world_size=world_size, local_rank=local_rank, device=torch_device, rendezvous=rendezvous)


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
