"""Distributed start-up under each launcher: slurm's host lists, rank variables, rank 0's address.

The unit tests set the launchers' variables in this process. The simulated 2-node slurm job starts
real training processes on this machine with the variables srun sets and MASTER_ADDR unset, so that
rank 0's address must come from SLURM_JOB_NODELIST.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import free_port
from fastclip.distributed.env import LauncherError, launcher_ranks, master_address
from fastclip.distributed.hostlist import expand_hostlist
from launch import ROOT, clean_env, finish

LAUNCHER_PREFIXES = ("SLURM_", "MASTER_", "RANK", "LOCAL_RANK", "WORLD_SIZE", "TORCHELASTIC", "PMI_", "MPI_",
                     "OMPI_")
TINY = ["--dataset-type", "synthetic", "--train-num-samples", "16", "--data_size", "16", "--model", "ViT-Tiny-32px",
        "--batch-size", "2", "--epochs", "1", "--workers", "0", "--warmup", "1", "--device", "cpu"]


@pytest.fixture
def environ(monkeypatch):
    """No launcher's variables in this process; the tests set their own."""
    for name in list(os.environ):
        if name.startswith(LAUNCHER_PREFIXES):
            monkeypatch.delenv(name)
    return monkeypatch


# --- host lists

@pytest.mark.parametrize("text, hosts", [
    ("node01", ["node01"]),
    ("node[01-04]", ["node01", "node02", "node03", "node04"]),
    ("node[01-04,07,10-12]", ["node01", "node02", "node03", "node04", "node07", "node10", "node11", "node12"]),
    ("gpu-a[1-2],gpu-b3", ["gpu-a1", "gpu-a2", "gpu-b3"]),
    ("rack1-node[003-005]", ["rack1-node003", "rack1-node004", "rack1-node005"]),
    ("n[1-2]-ib[3-4]", ["n1-ib3", "n1-ib4", "n2-ib3", "n2-ib4"]),
    ("n[8-10]", ["n8", "n9", "n10"]),
    ("n[098-101]", ["n098", "n099", "n100", "n101"]),
    ("a[1],b[2-3]c,d", ["a1", "b2c", "b3c", "d"]),
    ("127.0.0.[1-2]", ["127.0.0.1", "127.0.0.2"]),
    ("host.example.org", ["host.example.org"]),
])
def test_hostlist_expands_as_slurm(text, hosts):
    assert expand_hostlist(text) == hosts


@pytest.mark.parametrize("text, reason", [
    ("", "empty host name"),
    ("node[01-04", "'[' without ']'"),
    ("node01]", "']' without '['"),
    ("n[[1-2]]", "nested '['"),
    ("node[]", "neither a number nor a range"),
    ("node[a-b]", "neither a number nor a range"),
    ("node[1-3:2]", "neither a number nor a range"),
    ("node[1-2,]", "neither a number nor a range"),
    ("node[04-01]", "runs backwards"),
    ("a,,b", "empty host name"),
    ("node1,", "empty host name"),
    ("node 1", "white space"),
])
def test_bad_hostlist_is_a_value_error_naming_it(text, reason):
    with pytest.raises(ValueError, match="not a slurm host list") as error:
        expand_hostlist(text)
    assert repr(text) in str(error.value) and reason in str(error.value)


# --- ranks

@pytest.mark.parametrize("variables, ranks", [
    ({}, (0, 1, 0)),
    ({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1"}, (3, 8, 1)),
    ({"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1"}, (5, 8, 1)),
    ({"PMI_RANK": "2", "PMI_SIZE": "4", "MPI_LOCALRANKID": "0"}, (2, 4, 0)),
    ({"OMPI_COMM_WORLD_RANK": "6", "OMPI_COMM_WORLD_SIZE": "8", "OMPI_COMM_WORLD_LOCAL_RANK": "2"}, (6, 8, 2)),
    ({"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2"}, (1, 2, 0)),  # no local rank: 0
])
def test_each_launcher_gives_its_ranks(environ, variables, ranks):
    for name, value in variables.items():
        environ.setenv(name, value)
    assert launcher_ranks() == ranks


def test_torchrun_comes_before_slurm_before_mpi(environ):
    for name, value in {"OMPI_COMM_WORLD_RANK": "7", "OMPI_COMM_WORLD_SIZE": "16", "OMPI_COMM_WORLD_LOCAL_RANK": "3",
                        "PMI_RANK": "6", "PMI_SIZE": "12", "MPI_LOCALRANKID": "2"}.items():
        environ.setenv(name, value)
    assert launcher_ranks() == (6, 12, 2)  # MPICH's PMI before Open MPI's
    for name, value in {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1"}.items():
        environ.setenv(name, value)
    assert launcher_ranks() == (5, 8, 1)
    for name, value in {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}.items():
        environ.setenv(name, value)
    assert launcher_ranks() == (1, 2, 0)


def test_rank_and_size_never_come_from_two_launchers(environ):
    """A launcher counts only with both its rank and its size: RANK alone does not pair with SLURM_NTASKS."""
    for name, value in {"RANK": "3", "LOCAL_RANK": "3", "SLURM_PROCID": "1", "SLURM_NTASKS": "2",
                        "SLURM_LOCALID": "1", "OMPI_COMM_WORLD_SIZE": "64", "PMI_RANK": "9"}.items():
        environ.setenv(name, value)
    assert launcher_ranks() == (1, 2, 1)


def test_a_rank_that_is_not_a_number_is_a_one_line_error(environ):
    environ.setenv("SLURM_PROCID", "first")
    environ.setenv("SLURM_NTASKS", "2")
    with pytest.raises(SystemExit, match=r"^error: SLURM_PROCID='first' is not a whole number$"):
        launcher_ranks()


# --- rank 0's address

def set_slurm(environ, nodes: str | None, **variables: str) -> None:
    environ.setenv("SLURM_PROCID", "0")
    environ.setenv("SLURM_NTASKS", "8")
    if nodes is not None:
        environ.setenv("SLURM_NNODES", nodes)
    for name, value in variables.items():
        environ.setenv(name, value)


def test_slurm_address_is_the_first_host_of_the_job_node_list(environ):
    set_slurm(environ, "4", SLURM_JOB_NODELIST="gpu[07-08,11],cpu01", SLURM_NODELIST="other[1-4]")
    assert master_address() == ("gpu07", "the first host of SLURM_JOB_NODELIST=gpu[07-08,11],cpu01")


def test_slurm_step_node_list_comes_first(environ):
    """`srun -N 2` on nodes 3-4 of a 4-node allocation: rank 0 runs on the step's first node."""
    set_slurm(environ, "2", SLURM_JOB_NODELIST="node[01-04]", SLURM_STEP_NODELIST="node[03-04]")
    assert master_address() == ("node03", "the first host of SLURM_STEP_NODELIST=node[03-04]")


def test_slurm_node_list_without_job_node_list(environ):
    set_slurm(environ, "2", SLURM_NODELIST="n[1-2]-ib[3-4]")
    assert master_address()[0] == "n1-ib3"


def test_slurm_node_count_from_the_node_list(environ):
    set_slurm(environ, None, SLURM_JOB_NODELIST="node[3-4]")
    assert master_address()[0] == "node3"


@pytest.mark.parametrize("nodes, variables", [
    ("1", {"SLURM_JOB_NODELIST": "node3"}),
    ("1", {}),
    ("1", {"SLURM_JOB_NODELIST": "not[a list"}),  # one node: the list is not read
    (None, {"SLURM_JOB_NODELIST": "node3"}),
    (None, {}),
])
def test_single_node_slurm_job_keeps_localhost(environ, nodes, variables):
    set_slurm(environ, nodes, **variables)
    assert master_address()[0] == "127.0.0.1"


def test_master_addr_of_the_environment_comes_first(environ):
    set_slurm(environ, "2", SLURM_JOB_NODELIST="node[1-2]", MASTER_ADDR="10.1.2.3")
    assert master_address() == ("10.1.2.3", "set in the environment")


def test_multi_node_slurm_without_node_list_stops_with_one_line(environ):
    set_slurm(environ, "2")
    with pytest.raises(LauncherError) as error:
        master_address()
    message = str(error.value)
    assert message.startswith("error: this slurm job runs on 2 nodes") and "\n" not in message
    assert message.endswith("export MASTER_ADDR=$(scontrol show hostnames $SLURM_JOB_NODELIST | head -n 1)")


def test_multi_node_slurm_with_a_bad_node_list_stops_with_one_line(environ):
    set_slurm(environ, "2", SLURM_JOB_NODELIST="node[1-2")
    with pytest.raises(LauncherError, match=r"^error: SLURM_JOB_NODELIST: not a slurm host list: 'node\[1-2' .*"
                                            r"export MASTER_ADDR=\$\(scontrol show hostnames"):
        master_address()


@pytest.mark.parametrize("prefix, size, local_size", [
    ("OMPI_COMM_WORLD_", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE"),
    ("PMI_", "PMI_SIZE", "MPI_LOCALNRANKS"),
])
def test_mpirun_on_one_host_uses_localhost_and_on_several_stops(environ, prefix, size, local_size):
    environ.setenv(prefix + "RANK", "0")
    environ.setenv(size, "4")
    with pytest.raises(LauncherError, match=f"{local_size} unset.*multi-node mpirun needs MASTER_ADDR"):
        master_address()
    environ.setenv(local_size, "2")
    with pytest.raises(LauncherError, match=f"^error: MASTER_ADDR is not set .*{local_size}=2, {size}=4"):
        master_address()
    environ.setenv(local_size, "4")
    assert master_address() == ("127.0.0.1", f"one host: {local_size} = {size} = 4")


def test_torchrun_variables_without_master_addr_keep_localhost(environ):
    environ.setenv("RANK", "0")
    environ.setenv("WORLD_SIZE", "2")
    assert master_address()[0] == "127.0.0.1"


# --- real processes

def run_tasks(tmp_path, tasks: list[dict[str, str]]) -> list[str]:
    """The outputs of one tiny training process per dict of launcher variables, once all exited 0."""
    processes, outputs = [], [tmp_path / f"task{index}.txt" for index in range(len(tasks))]
    for variables, output in zip(tasks, outputs):
        env = {k: v for k, v in clean_env().items() if not k.startswith(LAUNCHER_PREFIXES)}
        env.update(variables, PYTHONPATH=os.pathsep.join(filter(None, [env.get("PYTHONPATH"), str(ROOT / "src")])))
        cmd = [sys.executable, "-u", "src/training/main.py", *TINY, "--logs-dir", str(tmp_path)]
        with open(output, "w") as stdout:
            processes.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=stdout, stderr=subprocess.STDOUT))
    try:
        codes = finish(processes, timeout=120)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    for code, output in zip(codes, outputs):
        assert code == 0, output.read_text()[-3000:]
    return [output.read_text() for output in outputs]


def test_two_node_slurm_job_finds_rank_0_in_the_node_list(tmp_path):
    """4 tasks as srun starts them on 2 nodes of 2 tasks, MASTER_ADDR unset; node "127.0.0.1" comes first."""
    port = str(free_port())
    tasks = [dict(SLURM_PROCID=str(rank), SLURM_NTASKS="4", SLURM_NNODES="2", SLURM_NODEID=str(rank // 2),
                  SLURM_LOCALID=str(rank % 2), SLURM_JOB_NODELIST="127.0.0.[1-2]", MASTER_PORT=port)
             for rank in range(4)]
    rank0 = run_tasks(tmp_path, tasks)[0]
    assert "rank 0 of 4" in rank0
    assert (f"process group of world size 4: MASTER_ADDR 127.0.0.1 (the first host of "
            f"SLURM_JOB_NODELIST=127.0.0.[1-2]), MASTER_PORT {port}") in rank0


def test_multi_node_job_without_address_stops_main_with_the_fix(environ, tmp_path):
    """main exits at once with the one line, where the other nodes would wait --dist-timeout for rank 0."""
    from training.main import main

    set_slurm(environ, "2", SLURM_LOCALID="0")
    with pytest.raises(SystemExit) as stop:
        main([*TINY, "--logs-dir", str(tmp_path)])
    assert str(stop.value) == (
        "error: this slurm job runs on 2 nodes (SLURM_NNODES) and neither MASTER_ADDR nor SLURM_STEP_NODELIST nor "
        "SLURM_JOB_NODELIST nor SLURM_NODELIST is set to tell where rank 0 runs; add to the job script: "
        "export MASTER_ADDR=$(scontrol show hostnames $SLURM_JOB_NODELIST | head -n 1)")
