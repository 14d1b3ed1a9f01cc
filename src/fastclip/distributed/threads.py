"""How many intra-op threads a CPU rank may use, so that ranks and loader workers do not fight for cores.

torch starts one OpenMP thread per core in every process. torchrun sets OMP_NUM_THREADS=1 when it
starts several processes; srun and a plain `python` do not, so two srun ranks on a 2-core machine each
run two threads on the same two cores, and the loader workers of every rank compete with them too.
OpenMP threads wait for each other at every operator; when a core is taken by another process they
stall, which made such runs 6-10x slower than with one thread per rank.

The rule (`threads_per_rank`): the cores this process may run on, divided among the ranks of this
node, minus one core per loader worker, and at least one thread. Loader workers run one thread each
(torch's DataLoader sets it in every worker) and decode and augment images for the whole step, so
each is counted as a whole core. Measured on a shared 2-core machine with the demo shards
(ViT-Tiny-32px, FastCLIP-v3, batch 64, one rank): with 2 workers, 1 intra-op thread trained 91.6
samples/s and 2 threads 15.2; with no worker, 1 thread 160.9 and 2 threads 27.8 (other processes held
the cores there, which is when spare threads stall; on idle cores the rule's 2 threads without workers
use both). docs/benchmarks.md, "CPU threads per rank", compares the rule with every rank taking every
core. An OMP_NUM_THREADS set by the user or a launcher is always respected.
"""

from __future__ import annotations

import math
import os
import re
from typing import Mapping

import torch

_TASKS_PER_NODE = re.compile(r"^(\d+)(?:\(x(\d+)\))?$")


def _expand_tasks_per_node(value: str) -> list[int]:
    """slurm's compressed tasks-per-node list, e.g. '2(x3),1' -> [2, 2, 2, 1]."""
    counts: list[int] = []
    for part in value.split(","):
        match = _TASKS_PER_NODE.match(part.strip())
        if match is None:
            raise ValueError(f"cannot read slurm's tasks per node {value!r}")
        counts += [int(match.group(1))] * int(match.group(2) or 1)
    return counts


def local_ranks(env: Mapping[str, str]) -> int:
    """Ranks on this node, from torchrun's, slurm's or mpirun's variables; 1 without a launcher."""
    for name in ("LOCAL_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS"):
        if env.get(name):
            return max(1, int(env[name]))
    if "SLURM_PROCID" not in env:
        return 1
    if env.get("SLURM_NTASKS_PER_NODE"):
        return max(1, int(env["SLURM_NTASKS_PER_NODE"]))
    if env.get("SLURM_TASKS_PER_NODE"):
        counts = _expand_tasks_per_node(env["SLURM_TASKS_PER_NODE"])
        node = int(env.get("SLURM_NODEID", 0))
        return counts[node] if node < len(counts) else max(counts)
    if env.get("SLURM_NTASKS"):
        return max(1, math.ceil(int(env["SLURM_NTASKS"]) / int(env.get("SLURM_NNODES", 1))))
    return 1


def shared_by(env: Mapping[str, str], cores: int) -> int:
    """How many ranks share this process's cores. slurm gives each task its own mask of
    --cpus-per-task cores when it binds tasks: such a mask is not shared."""
    per_task = env.get("SLURM_CPUS_PER_TASK")
    if "SLURM_PROCID" in env and per_task and cores <= int(per_task):
        return 1
    return local_ranks(env)


def threads_per_rank(cores: int, ranks: int, loader_workers: int) -> int:
    """Intra-op threads of one rank: its share of the cores less one core per loader worker, at least 1."""
    return max(1, cores // max(1, ranks) - max(0, loader_workers))


def configure_cpu_threads(device: torch.device, loader_workers: int, env: Mapping[str, str] | None = None) -> str:
    """Set torch's intra-op threads on a CPU rank when OMP_NUM_THREADS is unset; the line that says why."""
    env = os.environ if env is None else env
    if "OMP_NUM_THREADS" in env:
        return f"CPU threads per rank: {torch.get_num_threads()} (OMP_NUM_THREADS={env['OMP_NUM_THREADS']})"
    if device.type != "cpu":
        return f"CPU threads per rank: {torch.get_num_threads()} (torch's default; the model runs on {device})"
    cores = len(os.sched_getaffinity(0))
    ranks = shared_by(env, cores)
    threads = threads_per_rank(cores, ranks, loader_workers)
    torch.set_num_threads(threads)
    return (f"CPU threads per rank: {threads} (OMP_NUM_THREADS unset; {cores} cores, {ranks} local "
            f"rank{'s' if ranks != 1 else ''}, {loader_workers} loader worker{'s' if loader_workers != 1 else ''})")
