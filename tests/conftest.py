"""Shared test helpers: the seed's command lines, a free port for process groups, data that may be missing."""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import sys
from pathlib import Path

import pytest

from fastclip.datasets.packages import MissingData
from processes import SESSION_MARK, command_line, orphans_of_session, still_running

FIXTURES = Path(__file__).with_name("fixtures")


def _seed_commands() -> dict[str, list[str]]:
    """The seed README's `main.py` command lines as argument lists, keyed by version name."""
    text = (FIXTURES / "seed_commands.sh").read_text()
    commands = {}
    for name, body in re.findall(r"^# (\S+)\n(srun .*?)(?:\n\n|\Z)", text, re.M | re.S):
        words = shlex.split(body.replace("\\\n", " "))
        commands[name] = words[words.index("src/training/main.py") + 1 :]
    return commands


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def port() -> int:
    return free_port()


def scaled(command: list[str], **overrides: str) -> list[str]:
    """A seed command with some flag values replaced (e.g. a tiny model and small shards), the rest kept.

    Keyword names use underscores for dashes: `train_data="x"` replaces `--train-data`'s value;
    flags the command lacks are appended.
    """
    args = list(command)
    for name, value in overrides.items():
        spellings = {"--" + name, "--" + name.replace("_", "-")}
        position = next((i for i, word in enumerate(args) if word in spellings), None)
        if position is None:
            args += ["--" + name.replace("_", "-"), str(value)]
        else:
            args[position + 1] = str(value)
    return args


def available(get, *args, **kwargs):
    """`get(*args, **kwargs)`, or skip the calling test when its data cannot be had on this machine, with the
    reason and the install command in pytest's summary. On CI (`CI` set) missing data fails instead: `make test`
    installs it there, so a skip would hide a broken install step."""
    try:
        return get(*args, **kwargs)
    except MissingData as error:
        if os.environ.get("CI"):
            raise
        pytest.skip(str(error), allow_module_level=True)  # test_fonts asks at import time


@pytest.fixture(scope="session")
def fashion_mnist_dir() -> Path:
    """The folder of Fashion-MNIST's four .gz files (Debian's package, or the download cache)."""
    from fastclip.datasets.demo import find_fashion_mnist

    return available(find_fashion_mnist)


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory, fashion_mnist_dir):
    """Real Fashion-MNIST shards (sparse img2dataset keys: 300 per shard) and a zero-shot test folder."""
    from fastclip.datasets.demo import build_demo

    return build_demo(tmp_path_factory.mktemp("fmnist"), samples_per_shard=300, limit=1200, source=fashion_mnist_dir)


def tiny_run(demo, logs, name: str, epochs: int = 2, batch_size: int = 32) -> dict[str, str]:
    """Overrides that scale a seed command to the demo shards, a tiny model and a few steps on the CPU."""
    return dict(
        train_data=demo.train_shards, train_num_samples=demo.num_samples, data_size=demo.data_size,
        warmup=5, batch_size=batch_size, epochs=epochs, workers=0, model="ViT-Tiny-32px", name=name,
        logs_dir=str(logs), gamma_decay_epochs=1, log_every_n_steps=5,
    )


SEED_COMMANDS = _seed_commands()

# The suite's slow tiers, applied here and nowhere else; `make test-fast` leaves them out, `make test` runs all.
TIERS = {
    "multiprocess": "starts several gloo processes (torch.multiprocessing.spawn)",
    "launcher": "starts the training script through torchrun, srun-style variables or the slurm scripts",
    "e2e": "trains through the training script (or the demo, or a console script) end to end",
    "fake_cuda": "the GPU step on a fake CUDA device at the objective x precision pairs `make test-fast` leaves out",
}
# test file, or file::test-name prefix -> tier (the first match counts)
TIER_OF = {
    # launcher: the training script started through torchrun, srun-style variables or the slurm scripts
    "test_launch.py": "launcher",
    "test_launchers.py::test_two_node_slurm_job": "launcher",
    "test_slurm_script.py": "launcher",
    "test_resume_exact.py": "launcher",
    "test_resume_world_size.py::test_two_ranks": "launcher",
    "test_resume_world_size.py::test_one_rank": "launcher",
    "test_startup.py::test_readme_torchrun": "launcher",
    "test_startup.py::test_summary_block": "launcher",
    "test_startup.py::test_srun_ranks": "launcher",
    "test_examples.py::test_ddp_example": "launcher",
    # multiprocess: several gloo processes in one test
    "test_fastclip_distributed.py": "multiprocess",
    "test_captions.py::test_multi_caption_retrieval_split": "multiprocess",
    "test_state_files.py": "multiprocess",
    "test_state.py::test_round_trips": "multiprocess",
    "test_accumulation.py::test_accumulation_under_ddp": "multiprocess",
    "test_distributed_eval.py::test_two_ranks": "multiprocess",
    "test_data_sampling.py::test_a_sample_twice": "multiprocess",
    "test_siglip.py::test_ddp": "multiprocess",
    "test_reference_transcription.py::test_two_gloo": "multiprocess",
    "test_index.py::test_two_ranks": "multiprocess",
    "test_faults.py::test_a_stopped_rank": "multiprocess",
    "test_faults.py::test_timed_checkpoints": "multiprocess",
    "test_cli_errors.py::test_every_rank_stops": "multiprocess",
    "test_worker_lifetime.py::test_sigkill_of_one_gloo_rank": "multiprocess",
    "test_loss_api.py::test_shards_of_two_ranks": "multiprocess",
    "test_loss_api.py::test_fsdp_trains_as_ddp": "multiprocess",
    # e2e: whole training runs through the script, the demo or a console script
    "test_carry_over_runs.py": "e2e",
    "test_export.py": "e2e",
    "test_faults.py": "e2e",
    "test_worker_lifetime.py": "e2e",
    "test_train_e2e.py": "e2e",
    "test_demo.py": "e2e",
    "test_finetune.py": "e2e",
    "test_console_scripts.py": "e2e",
    "test_examples.py": "e2e",
    "test_script_guard.py": "e2e",
    "test_collector.py": "e2e",
    "test_csv_data.py::test_training_on_a_csv": "e2e",
    "test_index.py::test_index_of_img2dataset": "e2e",
    "test_index.py::test_fastclip_v3_trains": "e2e",
    "test_distributed_eval.py::test_results_rows": "e2e",
    # fake_cuda: the rest of the objective x precision matrix (about a minute); test-fast runs a subset
    "test_fake_cuda.py::test_nor_at_any_other_objective_and_precision": "fake_cuda",
}


def pytest_configure(config) -> None:
    for name, meaning in TIERS.items():
        config.addinivalue_line("markers", f"{name}: {meaning}")


def pytest_collection_modifyitems(items) -> None:
    for item in items:
        for where, tier in TIER_OF.items():
            file, _, prefix = where.partition("::")
            if item.path.name == file and item.name.startswith(prefix):
                item.add_marker(tier)
                break


# Processes left behind: every process the suite starts carries SESSION_MARK; at the end of the session
# none may run outside the pytest process's own tree (a rank's forkserver, workers or resource tracker
# orphaned by a killed rank would be).
os.environ.setdefault(SESSION_MARK, str(os.getpid()))
LEFT_BEHIND_WAIT_S = 20


def pytest_sessionfinish(session, exitstatus) -> None:
    if not sys.platform.startswith("linux") or os.environ[SESSION_MARK] != str(os.getpid()):
        return
    left = still_running(orphans_of_session(os.environ[SESSION_MARK]), LEFT_BEHIND_WAIT_S)
    if not left:
        return
    lines = "\n".join(f"  {pid}: {command_line(pid)[:200]}" for pid in sorted(left))
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    session.config.get_terminal_writer().line(
        f"\n{len(left)} process(es) started by the tests still ran {LEFT_BEHIND_WAIT_S} s after the session "
        f"(killed now):\n{lines}", red=True)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED
