"""Starting a run: the README's torchrun command from `src/`, relative paths, CPU threads, the start-up summary
and the start-up noise.

The launch tests run a copy of the project (its `src/` and a setup.py) in a temporary folder, so that the
seed's relative paths (`./datasets/...`, the default `./logs`) are those of a project root the test owns:
`cd src && torchrun --standalone --nproc_per_node=2 -m training.main` trains one epoch, then two srun-style
ranks resume it from the root with OMP_NUM_THREADS unset.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import SEED_COMMANDS, free_port, scaled
from launch import ROOT, TIMEOUT_S, clean_env
from fastclip.distributed import DistEnv
from fastclip.distributed.threads import configure_cpu_threads, local_ranks, shared_by, threads_per_rank
from fastclip.models import build_model
from fastclip.run.summary import KNOWN_NOISE, RunFacts, format_summary, version_name
from training.builders import build_objective
from training.config import Config
from training.params import build_parser, parse_args
from training.paths import project_root_if_in_src, rebased_paths

TORCHRUN = Path(sys.executable).with_name("torchrun")
TRAIN_SHARDS = "./datasets/cc3m_webdataset/cc3m_train/{00000..00003}.tar"  # the seed's form, 4 demo shards
IMAGENET_VAL = "./datasets/imagenet/val"
NAME = "medium_fastclipv3"
NOISE = ("No pretrained weights loaded", *(re.sub(r"\\(.)", r"\1", message) for message in KNOWN_NOISE))
SHOW_THREADS = ("import sys, torch\nfrom training.main import main\ntry:\n    main(sys.argv[1:])\n"
                "finally:\n    print('torch.get_num_threads()', torch.get_num_threads(), flush=True)\n")


# ------------------------------------------------------------------------------------------- threads


@pytest.mark.parametrize("env, expected", [
    ({}, 1),
    ({"SLURM_NTASKS": "8", "SLURM_NNODES": "2"}, 1),  # slurm's allocation, but not one of its tasks
    ({"LOCAL_WORLD_SIZE": "4", "SLURM_PROCID": "0", "SLURM_NTASKS_PER_NODE": "2"}, 4),  # torchrun inside slurm
    ({"SLURM_PROCID": "5", "SLURM_NTASKS_PER_NODE": "3"}, 3),
    ({"SLURM_PROCID": "1", "SLURM_TASKS_PER_NODE": "2(x3),1", "SLURM_NODEID": "1"}, 2),
    ({"SLURM_PROCID": "6", "SLURM_TASKS_PER_NODE": "2(x3),1", "SLURM_NODEID": "3"}, 1),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "7", "SLURM_NNODES": "2"}, 4),
])
def test_local_ranks_from_launcher_variables(env, expected):
    assert local_ranks(env) == expected


def test_threads_share_the_cores_among_ranks_and_workers():
    assert threads_per_rank(cores=16, ranks=4, loader_workers=0) == 4
    assert threads_per_rank(cores=16, ranks=2, loader_workers=2) == 6
    assert threads_per_rank(cores=2, ranks=1, loader_workers=2) == 1
    assert threads_per_rank(cores=2, ranks=4, loader_workers=0) == 1  # never below one
    # a slurm task bound to its own --cpus-per-task cores shares them with nobody
    bound = {"SLURM_PROCID": "0", "SLURM_NTASKS_PER_NODE": "4", "SLURM_CPUS_PER_TASK": "6"}
    assert shared_by(bound, cores=6) == 1 and shared_by(bound, cores=24) == 4


def test_omp_num_threads_is_respected():
    before = torch.get_num_threads()
    line = configure_cpu_threads(torch.device("cpu"), loader_workers=8, env={"OMP_NUM_THREADS": "3"})
    assert torch.get_num_threads() == before and "OMP_NUM_THREADS=3" in line


# --------------------------------------------------------------------------------------------- paths


def test_relative_paths_mean_the_project_root_only_from_its_src_folder(tmp_path):
    src = ROOT / "src"
    assert project_root_if_in_src(src) == ROOT and project_root_if_in_src(ROOT) is None
    argv = ["--train-data", f"{TRAIN_SHARDS}::/abs/{{0..1}}.tar", "--train-num-samples", "10", "--logs-dir", "./logs",
            "--imagenet-val", IMAGENET_VAL, "--resume", "latest", "--model", "ViT-Tiny-32px"]
    parsed = vars(build_parser().parse_args(argv))  # unresolved: resolve rebases for the real working directory
    from_src = {**parsed, **rebased_paths(parsed, cwd=src)}
    assert from_src["train_data"] == f"{ROOT / TRAIN_SHARDS}::/abs/{{0..1}}.tar"
    assert Path(from_src["logs"]) == ROOT / "logs" and Path(from_src["imagenet_val"]) == ROOT / IMAGENET_VAL
    assert from_src["resume"] == "latest" and from_src["paths_relative_to"] == str(ROOT)
    elsewhere = {**parsed, **rebased_paths(parsed, cwd=tmp_path)}
    assert (elsewhere["train_data"], elsewhere["logs"], elsewhere["paths_relative_to"]) == (argv[1], "./logs", None)


def test_home_and_parent_paths_keep_their_meaning_from_src():
    argv = ["--train-data", "~/cc3m/{0..3}.tar::../datasets/{0..1}.tar::s3://bucket/{0..1}.tar",
            "--train-num-samples", "10", "--logs-dir", "~/runs", "--model", "ViT-Tiny-32px"]
    parsed = vars(build_parser().parse_args(argv))
    changes = rebased_paths(parsed, cwd=ROOT / "src")
    assert (changes["train_data"], changes["logs"]) == (argv[1], "~/runs")


# ------------------------------------------------------------------------------------------- summary


@pytest.mark.parametrize("version", sorted(k for k in SEED_COMMANDS if k.startswith(("fastclip-", "openclip"))))
def test_version_of_each_seed_command(version):
    args = parse_args(SEED_COMMANDS[version])
    expected = "OpenCLIP" if version == "openclip" else "FastCLIP-" + version.split("-")[1]
    assert version_name(args.fastclip, args.temperature_scheme, args.multiply_tau) == expected


NOISE_CHECK = """
import warnings, torch, torch.distributed as dist, torch.distributed.nn
from fastclip.run.summary import silence_known_warnings
dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
def emit():
    with warnings.catch_warnings(record=True) as caught:
        torch.distributed.nn.all_gather(torch.ones(2, requires_grad=True))
        torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(2, 2), broadcast_buffers=False)
        warnings.warn("a real warning", FutureWarning)
    return sorted(str(w.message)[:60] for w in caught)
warnings.simplefilter("always")
print("before", emit())
silence_known_warnings()
print("after", emit())
dist.destroy_process_group()
"""


def test_known_noise_is_silenced_and_other_warnings_kept():
    """torch's own deprecation messages, as raised by the real calls, before and after the filters."""
    lines = run([sys.executable, "-c", NOISE_CHECK], ROOT, clean_env()).splitlines()
    before = next(line for line in lines if line.startswith("before"))
    after = next(line for line in lines if line.startswith("after"))
    assert "broadcast_buffers" in before and "all_gather is deprecated" in before
    assert after == "after ['a real warning']"


def test_summary_of_a_large_run_states_its_per_rank_memory():
    """400M pairs on 256 ranks of 8 per node: rows and bytes per rank, not per data set."""
    facts = RunFacts(version="FastCLIP-v3", world_size=256, local_ranks=8, device="cuda:0", precision="amp_bf16",
                     model="ViT-B-16", parameters=149_620_737, batch_size=256, steps_per_epoch=6104, epochs=30,
                     stop_epochs=30, data_size=400_000_000, state_bytes_per_sample=16,
                     state_rows_per_rank=math.ceil(400_000_000 / 256), cpu_threads="CPU threads per rank: 6 (x)",
                     output="/runs/x", paths_relative_to=None)
    text = format_summary(facts)
    assert "256 on 32 nodes" in text and "65536 (256 per rank)" in text
    assert f"{16 * math.ceil(400_000_000 / 256) / 2**20:.1f} MiB per rank" in text
    assert f"{6104 * 30:,} steps" in text and "relative paths" not in text


# ------------------------------------------------------------------------------------------ launches


@pytest.fixture(scope="module")
def project(demo_data, tmp_path_factory):
    """A copy of this project (src/ and setup.py) with the demo shards where the seed's paths point."""
    root = tmp_path_factory.mktemp("project")
    shutil.copytree(ROOT / "src", root / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    shutil.copy(ROOT / "setup.py", root / "setup.py")
    shards = root / "datasets" / "cc3m_webdataset" / "cc3m_train"
    shards.mkdir(parents=True)
    for shard in sorted(Path(demo_data.train_shards).parent.glob("*.tar")):
        shutil.copy(shard, shards / shard.name)
    for folder in sorted(Path(demo_data.test_dir).iterdir()):  # 20 test images per class suffice here
        (root / IMAGENET_VAL / folder.name).mkdir(parents=True)
        for image in sorted(folder.iterdir())[:20]:
            shutil.copy(image, root / IMAGENET_VAL / folder.name / image.name)
    return root


def seed_argv(demo_data) -> list[str]:
    """The seed's FastCLIP-v3 command, scaled to 10 steps per epoch on the demo shards, its paths relative
    as the seed writes them."""
    return scaled(SEED_COMMANDS["fastclip-v3"], train_data=TRAIN_SHARDS, train_num_samples=640,
                  data_size=demo_data.data_size, warmup=5, batch_size=32, epochs=2, workers=0, model="ViT-Tiny-32px",
                  gamma_decay_epochs=1, log_every_n_steps=5, imagenet_val=IMAGENET_VAL)


def run(cmd: list[str], cwd: Path, env: dict[str, str]) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stdout[-4000:]
    return proc.stdout


@pytest.fixture(scope="module")
def first_epoch(project, demo_data) -> str:
    """The README's one-node torchrun command, from src/, two processes: the output of epoch 1 of 2."""
    env = {k: v for k, v in clean_env().items() if k not in ("OMP_NUM_THREADS", "PYTHONPATH")}
    cmd = [str(TORCHRUN), "--standalone", "--nproc_per_node=2", "-m", "training.main",
           *scaled(seed_argv(demo_data), stop_epochs=1)]
    return run(cmd, project / "src", env)


def summary_facts(output: str) -> dict[str, str]:
    """The start-up block's lines as label -> value."""
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.endswith("start-up summary"))
    block = []
    for line in lines[start + 1:]:
        if not line.startswith("  "):
            break
        block.append(line.strip())
    return dict(re.split(r"\s{2,}", line, maxsplit=1) for line in block)


def test_readme_torchrun_command_from_src(project, first_epoch, demo_data):
    assert (project / "logs" / NAME / "checkpoints" / "epoch_1.pt").is_file()
    assert not (project / "src" / "logs").exists() and not (project / "src" / "datasets").exists()
    facts = summary_facts(first_epoch)
    assert facts["relative paths"] == f"resolved against {project} (run from its src/ folder)"
    assert "zeroshot" in (project / "logs" / NAME / "results.jsonl").read_text()  # ./datasets/imagenet/val found
    for noise in NOISE:
        assert noise not in first_epoch, noise


def test_summary_block_once_with_the_run_numbers(project, first_epoch, demo_data):
    assert first_epoch.count("start-up summary") == 1
    facts = summary_facts(first_epoch)
    args = parse_args(seed_argv(demo_data))
    world = 2
    steps = math.ceil(args.train_num_samples / (args.batch_size * world))
    parameters = sum(p.numel() for p in build_model(args.model).model.parameters())
    state = build_objective(Config.from_args(args), DistEnv()).per_sample
    rows = math.ceil(args.data_size / world)
    assert facts["version"] == "FastCLIP-v3"
    assert facts["ranks"] == "2 on 1 node, device cpu"
    assert facts["model"] == f"ViT-Tiny-32px ({parameters:,} parameters)"
    assert facts["global batch"] == f"{args.batch_size * world} ({args.batch_size} per rank)"
    assert facts["epoch"] == f"{steps * args.batch_size * world:,} samples, {steps} steps"
    assert facts["schedule"] == f"2 epochs, {2 * steps} steps, stopping after epoch 1"
    bytes_per_sample = state.columns * state.table.element_size()
    assert facts["per-sample state"].endswith(f"({bytes_per_sample} B x {rows:,} rows)")
    assert facts["CPU threads per rank"] == "1 (OMP_NUM_THREADS=1)"  # torchrun sets it for several processes
    assert facts["output"] == str(project / "logs" / NAME)


def test_srun_ranks_pick_threads_and_keep_only_real_warnings(project, first_epoch, demo_data):
    """Two srun-style ranks resume the run with OMP_NUM_THREADS unset; a damaged newer checkpoint gives a
    real warning on both ranks, while the known noise is silent."""
    (project / "logs" / NAME / "checkpoints" / "epoch_2.pt").write_bytes(b"not a checkpoint")
    workers = 1
    argv = scaled(seed_argv(demo_data), resume="latest", workers=workers)
    port = free_port()
    processes = []
    for rank in range(2):
        env = {k: v for k, v in clean_env().items() if k != "OMP_NUM_THREADS"}
        env.update(SLURM_PROCID=str(rank), SLURM_NTASKS="2", SLURM_LOCALID=str(rank), SLURM_NTASKS_PER_NODE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), PYTHONPATH=str(project / "src"))
        processes.append(subprocess.Popen([sys.executable, "-c", SHOW_THREADS, *argv], cwd=project, env=env,
                                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [process.communicate(timeout=TIMEOUT_S)[0] for process in processes]
    assert [process.returncode for process in processes] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    cores = len(os.sched_getaffinity(0))
    threads = threads_per_rank(cores, 2, workers)
    assert (f"CPU threads per rank  {threads} (OMP_NUM_THREADS unset; {cores} cores, 2 local ranks, "
            f"{workers} loader worker)") in outputs[0]
    for output in outputs:
        assert f"torch.get_num_threads() {threads}" in output
        assert "skipping a bad checkpoint" in output and "epoch_2.pt" in output
        for noise in NOISE:
            assert noise not in output, noise
    assert (project / "logs" / NAME / "checkpoints" / "epoch_2.pt").stat().st_size > 1000  # trained epoch 2
