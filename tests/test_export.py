"""Exported checkpoints load in plain open_clip (no fastclip importable) and evaluate with clip_benchmark."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import SEED_COMMANDS, scaled, tiny_run
from fastclip.tools import export
from fastclip.checkpoint.files import load, model_state
from fastclip.evaluate import class_prompts, load_image_folder, zero_shot_eval
from fastclip.models import ModelBundle, build_model
from training.main import main as train

VERSIONS = ("fastclip-v3", "openclip")
TEXTS = ["a photo of a sandal.", "a grayscale image of an ankle boot.", "a bag on a black background."]

# Runs in a fresh interpreter from which every folder holding `fastclip` is removed, so only
# open_clip's own `local-dir:` loading is exercised (our model configs are not registered there).
PLAIN_OPEN_CLIP = r"""
import importlib.util, json, sys
from pathlib import Path
sys.path[:] = [p for p in sys.path if not (Path(p or ".") / "fastclip").is_dir()]
assert importlib.util.find_spec("fastclip") is None, "fastclip is importable"
import open_clip, torch
from PIL import Image
folder, images, texts, threads, result = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
assert "ViT-Tiny-32px" not in open_clip.list_models()
torch.set_num_threads(threads)
model, _, preprocess = open_clip.create_model_and_transforms("local-dir:" + folder)
tokenizer = open_clip.get_tokenizer("local-dir:" + folder)
model.eval()
pixels = torch.stack([preprocess(Image.open(path)) for path in images])
tokens = tokenizer(texts)
with torch.no_grad():
    torch.save({"pixels": pixels, "tokens": tokens, "image": model.encode_image(pixels),
                "text": model.encode_text(tokens), "logit_scale": model.logit_scale.detach()}, result)
"""

# `clip_benchmark eval` as its console script runs it. clip_benchmark 1.6.2 counts top-k hits with
# float() of a one-element array, a TypeError since NumPy 2.4; there, the same count is read with .item().
CLIP_BENCHMARK = r"""
import sys
import numpy
from clip_benchmark import cli
from clip_benchmark.metrics import zeroshot_classification

def accuracy(logits, target, topk=(1,)):
    hits = logits.topk(max(topk), dim=1).indices == target.view(-1, 1)
    return [hits[:, :k].sum().item() / len(target) for k in topk]

if tuple(int(part) for part in numpy.__version__.split(".")[:2]) >= (2, 4):
    zeroshot_classification.accuracy = accuracy
sys.exit(cli.main())
"""


def without_project_path() -> dict[str, str]:
    return {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}


@pytest.fixture(scope="module")
def checkpoints(demo_data, tmp_path_factory) -> dict[str, Path]:
    """One epoch of 10 steps of FastCLIP-v3 and of OpenCLIP (the seed's commands, tiny model)."""
    logs = tmp_path_factory.mktemp("logs")
    for version in VERSIONS:
        overrides = dict(tiny_run(demo_data, logs, version, epochs=1), train_num_samples=320)
        train(scaled(SEED_COMMANDS[version], **overrides))
    return {version: logs / version / "checkpoints" / "epoch_1.pt" for version in VERSIONS}


def trained_model(checkpoint: Path) -> ModelBundle:
    """The trained model as this project loads it, for reference."""
    saved = load(checkpoint)
    bundle = build_model(saved["config"]["model"])
    bundle.model.load_state_dict(model_state(saved))
    bundle.model.eval()
    return bundle


def one_image_per_class(test_dir: Path) -> list[Path]:
    return [min(folder.glob("*.png")) for folder in sorted(test_dir.iterdir())]


@pytest.mark.parametrize("version", VERSIONS)
def test_exported_model_is_the_trained_model_in_plain_open_clip(version, checkpoints, demo_data, tmp_path):
    checkpoint = checkpoints[version]
    out = tmp_path / "model"
    export.main([str(checkpoint), str(out)])  # model name from the checkpoint
    assert sorted(p.name for p in out.iterdir()) == ["open_clip_config.json", "open_clip_model.safetensors"]
    images = one_image_per_class(demo_data.test_dir)
    result = tmp_path / "plain.pt"
    subprocess.run([sys.executable, "-c", PLAIN_OPEN_CLIP, str(out), json.dumps([str(p) for p in images]),
                    json.dumps(TEXTS), str(torch.get_num_threads()), str(result)],
                   check=True, cwd=tmp_path, env=without_project_path())
    exported = torch.load(result, weights_only=True)

    bundle = trained_model(checkpoint)
    pixels = torch.stack([bundle.preprocess_val(Image.open(path)) for path in images])
    tokens = bundle.tokenizer(TEXTS)
    with torch.no_grad():
        reference = {"pixels": pixels, "tokens": tokens, "image": bundle.model.encode_image(pixels),
                     "text": bundle.model.encode_text(tokens), "logit_scale": bundle.model.logit_scale.detach()}
    assert torch.equal(reference["logit_scale"], load(checkpoint)["state_dict"]["logit_scale"])
    differences = {key: float((exported[key].float() - value.float()).abs().max()) for key, value in reference.items()}
    print(f"{version}: max abs difference exported vs trained: {differences}, "
          f"logit_scale {float(exported['logit_scale']):.6f}")
    assert differences == dict.fromkeys(reference, 0.0)


def test_force_writes_into_a_folder_that_is_not_empty(checkpoints, tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "README.md").write_text("notes")
    with pytest.raises(SystemExit, match="--force"):
        export.main([str(checkpoints["openclip"]), str(out)])
    export.main([str(checkpoints["openclip"]), str(out), "--force"])
    export.main([str(checkpoints["fastclip-v3"]), str(out), "--force", "--model", "ViT-Tiny-32px"])
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "open_clip_config.json",
                                                     "open_clip_model.safetensors"]
    state = model_state(load(checkpoints["fastclip-v3"]))
    model = build_model(f"local-dir:{out}").model  # the second export replaced the first
    assert all(torch.equal(value, state[name]) for name, value in model.state_dict().items())


@pytest.mark.parametrize("case, expected", [
    ("missing checkpoint", "epoch_7.pt: no such file"),
    ("unreadable checkpoint", "epoch_9.pt: unreadable"),
    ("output is a file", "is a file: choose a folder"),
    ("unknown model", "model 'ViT-Nothing-32px' is unknown to open_clip"),
    ("weights of another model", "do not fit model 'ViT-Small-32px'"),
])
def test_bad_input_is_a_one_line_error(case, expected, checkpoints, tmp_path):
    checkpoint, out = str(checkpoints["fastclip-v3"]), str(tmp_path / "model")
    (tmp_path / "epoch_9.pt").write_bytes(b"not a checkpoint")
    (tmp_path / "file").write_text("")
    argv = {
        "missing checkpoint": [str(tmp_path / "epoch_7.pt"), out],
        "unreadable checkpoint": [str(tmp_path / "epoch_9.pt"), out],
        "output is a file": [checkpoint, str(tmp_path / "file")],
        "unknown model": [checkpoint, out, "--model", "ViT-Nothing-32px"],
        "weights of another model": [checkpoint, out, "--model", "ViT-Small-32px"],
    }[case]
    with pytest.raises(SystemExit) as stop:
        export.main(argv)
    message = str(stop.value.code)
    assert message.startswith("error: ") and expected in message and "\n" not in message
    assert not (tmp_path / "model").exists()


def write_clip_benchmark_dataset(image_folder: Path, root: Path) -> int:
    """An image folder as clip_benchmark's local `wds/NAME` data set (root/test/0.tar, nshards.txt,
    classnames.txt, zeroshot_classification_templates.txt), with the class names and templates our
    zero-shot evaluation uses and the image files copied byte for byte; returns the image count."""
    from clip_benchmark.webdataset_builder import convert_dataset, path_to_bytes

    dataset = load_image_folder(image_folder, transform=None)
    dataset.loader = path_to_bytes
    classnames, templates = class_prompts(dataset.classes)
    dataset.classes, dataset.templates = classnames, [template("{c}") for template in templates]
    convert_dataset(dataset, "test", str(root), image_format="png", verbose=False)
    return len(dataset)


def test_clip_benchmark_eval_matches_our_zero_shot_eval(checkpoints, demo_data, tmp_path):
    pytest.importorskip("clip_benchmark", reason="clip_benchmark is not installed "
                        "(pip install --no-deps clip_benchmark==1.6.2 pycocoevalcap==1.2 && pip install requests)")
    checkpoint = checkpoints["fastclip-v3"]
    out = tmp_path / "model"
    export.main([str(checkpoint), str(out)])
    images = write_clip_benchmark_dataset(demo_data.test_dir, tmp_path / "fashion_mnist")
    result = tmp_path / "clip_benchmark.json"
    subprocess.run([sys.executable, "-c", CLIP_BENCHMARK, "eval", "--model", f"local-dir:{out}",
                    "--pretrained", "fastclip-v3", "--dataset", "wds/fashion_mnist",
                    "--dataset_root", str(tmp_path / "fashion_mnist"), "--task", "zeroshot_classification",
                    "--no_amp", "--num_workers", "0", "--batch_size", "256", "--output", str(result), "--quiet"],
                   check=True, cwd=tmp_path, env=without_project_path())
    record = json.loads(result.read_text())

    bundle = trained_model(checkpoint)
    ours = zero_shot_eval(bundle.model, demo_data.test_dir, bundle.preprocess_val, bundle.tokenizer)
    print(f"clip_benchmark: {json.dumps(record)}\nours: {json.dumps(ours)}")
    assert ours["zeroshot-num-images"] == images == 1200
    assert record["metrics"]["acc1"] == pytest.approx(ours["imagenet-zeroshot-val-top1"], abs=1 / images)
    assert record["metrics"]["acc5"] == pytest.approx(ours["imagenet-zeroshot-val-top5"], abs=1 / images)
