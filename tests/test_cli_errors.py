"""The command line fails fast and clearly: bad flags, paths, models and data are one line naming the fix,
before anything is trained or written; `--help` is quick; evaluation takes the model from the checkpoint."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import SEED_COMMANDS, scaled, tiny_run
from fastclip.data.samples import DataError
from launch import ROOT, clean_env, finish, start_slurm
from training.main import main, original_message
from training.preflight import check_model_name

TINY = "ViT-Tiny-32px"


def synthetic(logs: Path, name: str, *extra: str, epochs: int = 1) -> list[str]:
    """A few steps of OpenCLIP on synthetic pairs (no --model unless `extra` names one)."""
    return ["--dataset-type", "synthetic", "--train-num-samples", "32", "--batch-size", "16", "--epochs", str(epochs),
            "--workers", "0", "--warmup", "1", "--logs", str(logs), "--name", name, *extra]


def error_of(argv: list[str]) -> str:
    """The one-line message `main(argv)` stops with."""
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    message = str(stopped.value.code)
    assert message.startswith("error: ") and "\n" not in message, message
    return message


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """The epoch-1 checkpoint of a ViT-Tiny-32px run; its "config" entry records the model."""
    logs = tmp_path_factory.mktemp("logs")
    main(synthetic(logs, "tiny", "--model", TINY))
    return logs / "tiny" / "checkpoints" / "epoch_1.pt"


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    """A zero-shot folder: two classes of three 32x32 images."""
    root = tmp_path_factory.mktemp("val")
    for label, colour in (("cat", (200, 30, 30)), ("dog", (30, 30, 200))):
        (root / label).mkdir()
        for i in range(3):
            Image.new("RGB", (32, 32), tuple(c + 10 * i for c in colour)).save(root / label / f"{i}.png")
    return root


# ------------------------------------------------------------------------------------------------ --help


def test_help_is_fast_and_shows_defaults():
    """`--help` parses no model and loads no torch: well under the 8-14 s an open_clip import takes here."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "src/training/main.py", "--help"], cwd=ROOT, env=clean_env(),
                          capture_output=True, text=True, timeout=60)
    elapsed = time.perf_counter() - start
    print(f"--help took {elapsed:.2f} s")
    assert done.returncode == 0 and "(default: 64)" in done.stdout and "--fastclip" in done.stdout
    assert elapsed < 4.0


def test_importing_the_script_loads_no_torch():
    """Only the parser and the torch-free version names load before the flags are parsed."""
    code = ("import sys; import training.main; print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('torch', 'open_clip', 'numpy', 'fastclip')))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT / "src", env=clean_env(), capture_output=True,
                          text=True, timeout=60)
    assert done.stdout.strip() == str(["fastclip", "fastclip.model_options", "fastclip.rules", "fastclip.run",
                                       "fastclip.run.collector", "fastclip.run.summary"]), done.stderr


# ------------------------------------------------------------------------------------------ flags and paths


def test_no_arguments_say_what_is_needed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert "nothing to do: pass --train-data SHARDS --train-num-samples N" in error_of([])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("case", [
    "multiply_tau without fastclip", "batch size 0", "unknown model", "missing local-dir model", "missing imagenet-val",
    "missing classnames file", "missing val-data", "missing resume file", "missing train-data",
])
def test_bad_input_stops_before_anything_is_written(case, tmp_path, image_folder):
    nowhere = tmp_path / "nowhere"
    extra, expected = {
        "multiply_tau without fastclip": (["--multiply_tau"],
                                          "--multiply_tau selects FastCLIP-v3's loss: add --fastclip"),
        "batch size 0": (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
        "unknown model": (["--model", "ViT-B-33"], "--model ViT-B-33 is not an open_clip model (did you mean ViT-B-32"),
        "missing local-dir model": (["--model", f"local-dir:{nowhere}"],
                                    "is not a folder holding open_clip_config.json"),
        "missing imagenet-val": (["--imagenet-val", str(nowhere)], f"--imagenet-val {nowhere}: no such folder"),
        "missing classnames file": (["--imagenet-val", str(image_folder), "--zeroshot-classnames", str(nowhere)],
                                    f"--zeroshot-classnames {nowhere}: no such file"),
        "missing val-data": (["--val-data", f"{nowhere}/{{0..3}}.tar"], "--val-data: no shard file matches"),
        "missing resume file": (["--resume", str(nowhere)], f"--resume {nowhere}: no such file"),
        "missing train-data": (["--dataset-type", "webdataset", "--train-data", f"{nowhere}/{{00000..00003}}.tar"],
                               f"--train-data: no shard file matches '{nowhere}/{{00000..00003}}.tar'"),
    }[case]
    argv = synthetic(tmp_path / "logs", "run", *(["--model", TINY] if "model" not in case else []), *extra)
    assert expected in error_of(argv)
    assert not (tmp_path / "logs").exists()


def test_model_names_open_clip_resolves_pass(tmp_path):
    folder = tmp_path / "exported"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": {}}))
    for name in (TINY, "RN50", "ViT-B-32", "hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K", f"local-dir:{folder}"):
        check_model_name(name)


# ------------------------------------------------------------------------------- the model of a checkpoint


def test_evaluation_takes_the_model_from_the_checkpoint(trained, image_folder, tmp_path):
    metrics = main(["--epochs", "0", "--resume", str(trained), "--imagenet-val", str(image_folder), "--workers", "0",
                    "--batch-size", "4", "--logs", str(tmp_path), "--name", "eval"])
    log = (tmp_path / "eval" / "out.log").read_text()
    assert f"model {TINY}, from the checkpoint {trained}" in log and f"loaded model weights of {trained}" in log
    (record,) = [json.loads(line) for line in (tmp_path / "eval" / "results.jsonl").read_text().splitlines()]
    assert record["epoch"] == 1 and record["imagenet-zeroshot-val-top1"] == metrics["imagenet-zeroshot-val-top1"]
    assert json.loads((tmp_path / "eval" / "params.json").read_text())["model"] == TINY


def test_a_model_other_than_the_checkpoints_is_refused_before_loading(trained, image_folder, tmp_path):
    message = error_of(["--epochs", "0", "--resume", str(trained), "--imagenet-val", str(image_folder),
                        "--model", "RN50", "--logs", str(tmp_path), "--name", "eval"])
    assert message == (f"error: --model RN50 does not match {trained}, a {TINY} checkpoint: drop --model (the "
                       f"checkpoint's is used) or pass --model {TINY}")
    assert not (tmp_path / "eval").exists()


def test_evaluating_latest_without_a_checkpoint_is_refused(image_folder, tmp_path):
    message = error_of(["--epochs", "0", "--resume", "latest", "--imagenet-val", str(image_folder), "--model", TINY,
                        "--logs", str(tmp_path), "--name", "untrained"])
    assert f"--resume latest: no checkpoint in {tmp_path / 'untrained' / 'checkpoints'} to evaluate" in message
    assert not (tmp_path / "untrained").exists()


def test_resumed_training_takes_the_model_from_the_checkpoint(trained, tmp_path):
    shutil.copytree(trained.parents[1], tmp_path / "tiny")
    main(synthetic(tmp_path, "tiny", "--resume", "latest", epochs=2))
    second = torch.load(tmp_path / "tiny" / "checkpoints" / "epoch_2.pt", weights_only=True)
    assert second["config"]["model"] == TINY and second["epoch"] == 2
    assert f"model {TINY}, from the checkpoint {tmp_path / 'tiny' / 'checkpoints' / 'epoch_1.pt'}" in (
        tmp_path / "tiny" / "out.log").read_text()


def test_every_rank_stops_with_the_same_line(trained, tmp_path):
    """Two srun-style ranks: each checks before the process group exists, so both exit at once with one line."""
    argv = synthetic(tmp_path, "run", "--resume", str(trained), "--model", "RN50")
    processes = start_slurm(argv)
    assert finish(processes, timeout=120) == [1, 1]
    last_lines = [proc.stdout.read().strip().splitlines()[-1] for proc in processes]
    assert last_lines[0] == last_lines[1] and last_lines[0].startswith("error: --model RN50 does not match")
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------ bad data


def test_a_workers_data_error_is_one_line(demo_data, tmp_path):
    """Keys above --data_size fail in a DataLoader worker; torch re-raises that wrapped in two tracebacks."""
    run = dict(tiny_run(demo_data, tmp_path, "bad-keys", epochs=1), workers=1, data_size=demo_data.num_samples)
    message = error_of(scaled(SEED_COMMANDS["fastclip-v3"], **run))
    assert message.startswith("error: shard ") and ", sample " in message
    assert f"is outside [0, data_size={demo_data.num_samples}); set data_size (--data_size) above" in message


def test_debug_keeps_the_full_traceback(demo_data, tmp_path):
    run = dict(tiny_run(demo_data, tmp_path, "bad-keys", epochs=1), workers=1, data_size=demo_data.num_samples)
    with pytest.raises(DataError, match="Caught DataError in DataLoader worker process 0"):
        main(scaled(SEED_COMMANDS["fastclip-v3"], **run) + ["--debug"])


def test_original_message_of_an_exception_torch_reraised():
    """What torch's ExceptionWrapper makes of a chained DataError, and the message it started with."""
    from torch._utils import ExceptionWrapper

    original = "shard s.tar, sample 000012: key 12 is outside [0, data_size=10); set data_size above the largest key"
    try:
        try:
            {}["key"]
        except KeyError as cause:
            raise DataError(original) from cause
    except DataError:
        wrapped = ExceptionWrapper(where="in DataLoader worker process 0")
    with pytest.raises(DataError) as reraised:
        wrapped.reraise()
    assert str(reraised.value).count("Traceback") == 2
    assert original_message(reraised.value) == original
    assert original_message(DataError("a\n  b")) == "a b"
