"""Checks at the start of a run that need the file system, open_clip or a checkpoint.

`params.resolve` checks the flags among themselves; this module checks them against the world, before
anything is built: input paths exist, the model is one open_clip knows, and a run that resumes or
evaluates a checkpoint uses the checkpoint's model (taken from it when `--model` is absent). Each
problem is a one-line `SystemExit("error: ...")` naming the fix. Every rank runs the same checks on
the same flags and files, so every rank stops with the same message; a good shard pattern costs one
`stat`, a checkpoint one metadata read (its tensors stay on disk), and open_clip loads only for the
last check, so that the other errors come back in the time torch takes to import.
"""

from __future__ import annotations

import difflib
import importlib.util
import json
from pathlib import Path

from fastclip.checkpoint import files
from fastclip.data.samples import DataError
from fastclip.data.shards import expand_shards
from training.config import Config
from training.params import DEFAULT_MODEL, model_defaults

HF_HUB = "hf-hub:"
LOCAL_DIR = "local-dir:"


def check_run(config: Config) -> Config:
    """Check the paths, settle the model (from the checkpoint when --model is absent) and check its name;
    returns the config with the model settled."""
    check_paths(config)
    config = settle_model(config)
    check_model_name(config.model.model)
    return config


def _fail(message: str) -> None:
    raise SystemExit(f"error: {message}")


def check_paths(config: Config) -> None:
    """Every input the flags name exists, so that a typo stops the run now, not after an epoch of training."""
    data, evaluation, resume = config.data, config.eval, config.checkpoint.resume
    check_input = _check_csv if data.dataset_type == "csv" else _check_shards
    if data.train_data and config.trains and data.dataset_type != "synthetic":  # synthetic ignores the flag
        check_input("--train-data", data.train_data)
    if evaluation.val_data:
        check_input("--val-data", evaluation.val_data)
    if evaluation.imagenet_val and not Path(evaluation.imagenet_val).is_dir():
        _fail(f"--imagenet-val {evaluation.imagenet_val}: no such folder: pass an image folder with one sub-folder "
              "per class (e.g. ImageNet's val/ with its 1000 synset folders)")
    if evaluation.zeroshot_classnames and not Path(evaluation.zeroshot_classnames).is_file():
        _fail(f"--zeroshot-classnames {evaluation.zeroshot_classnames}: no such file: pass a text file with one "
              "class name per line, or drop the flag to use the folder names")
    if resume not in (None, "latest") and not Path(resume).is_file():
        _fail(f"--resume {resume}: no such file: pass a checkpoint file, or --resume latest for the newest "
              f"checkpoint in {checkpoint_dir(config, 'NAME')}")


def _check_shards(flag: str, spec: str) -> None:
    try:
        expand_shards(spec)
    except DataError as error:
        _fail(f"{flag}: {error}")


def _check_csv(flag: str, path: str) -> None:
    if not Path(path).expanduser().is_file():
        _fail(f"{flag} {path}: no such CSV file (relative paths start in {Path.cwd()}): fix the path")


def checkpoint_dir(config: Config, name: str | None = None) -> Path:
    """The run's checkpoint folder: --logs / --name / checkpoints."""
    return Path(config.run.logs) / (config.run.name or name) / "checkpoints"


def resume_candidates(config: Config) -> tuple[list[Path], list[str], bool]:
    """The checkpoints --resume names, newest first; for 'latest', why the unreadable ones were left out;
    and whether the user named one explicitly."""
    resume = config.checkpoint.resume
    if resume is None:
        return [], [], False
    if resume != "latest":
        return [Path(resume)], [], True
    newest, unreadable = files.newest_first(checkpoint_dir(config))
    return newest, unreadable, False


def resume_path(config: Config) -> Path | None:
    """The checkpoint the run will start from: --resume PATH, or the newest readable one for 'latest'."""
    candidates, _, _ = resume_candidates(config)
    return candidates[0] if candidates else None


def settle_model(config: Config) -> Config:
    """A resumed or evaluated checkpoint fixes the model: take it when --model is absent, and stop when
    --model names another (rather than fail later in load_state_dict)."""
    path, model = resume_path(config), config.model.model
    if path is None:
        if config.checkpoint.resume == "latest" and not config.trains:
            _fail(f"--resume latest: no checkpoint in {checkpoint_dir(config)} to evaluate: pass --resume PATH, or "
                  "the --name (and --logs) of the run that wrote it")
        if model is None:
            return _with_model(config, DEFAULT_MODEL, "the default (no --model, no checkpoint yet)")
        return config
    recorded_config = files.peek(path).get("config")
    recorded = recorded_config.get("model") if isinstance(recorded_config, dict) else None
    if model is None:
        if recorded is None:
            _fail(f"{path} does not record its model: pass --model NAME")
        return _with_model(config, recorded, f"the checkpoint {path}")
    if recorded is not None and recorded != model:
        _fail(f"--model {model} does not match {path}, a {recorded} checkpoint: drop --model (the "
              f"checkpoint's is used) or pass --model {recorded}")
    return config


def _with_model(config: Config, model: str, source: str) -> Config:
    return config.replace(**model_defaults(config.flat(), model, source))


def check_model_name(name: str) -> None:
    """open_clip knows the model (a registered config, ours included; hf-hub:ORG/REPO; or an existing
    local-dir:PATH folder with its open_clip_config.json), and it can be trained here (`check_trainable`)."""
    if name.startswith(HF_HUB):
        return
    if name.startswith(LOCAL_DIR):
        folder = Path(name[len(LOCAL_DIR):])
        if not (folder / "open_clip_config.json").is_file():
            _fail(f"--model {name}: {folder} is not a folder holding open_clip_config.json: fix the path")
        try:
            config = json.loads((folder / "open_clip_config.json").read_text())
        except (OSError, ValueError) as error:
            _fail(f"--model {name}: {folder / 'open_clip_config.json'} cannot be read ({error}): fix or re-export it")
        check_trainable(name, config.get("model_cfg", {}))
        return
    import open_clip

    from fastclip.models import register_model_configs

    register_model_configs()
    known = open_clip.list_models()
    if name not in known:
        close = difflib.get_close_matches(name, known, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        _fail(f"--model {name} is not an open_clip model{hint}: pick one of open_clip.list_models(), or pass "
              "hf-hub:ORG/REPO or local-dir:PATH")
    check_trainable(name, open_clip.get_model_config(name) or {})


def check_trainable(name: str, model_config: dict) -> None:
    """Every part of the model is trained by an objective here, and what it is built from is at hand: CoCa's
    captioning decoder would stay uninitialised under a contrastive loss, and Hugging Face text towers and
    tokenizers need the transformers package (and the hub, or its cache)."""
    if "multimodal_cfg" in model_config:
        _fail(f"--model {name} is a CoCa model: only a captioning loss trains its text decoder, and this project "
              "trains contrastive objectives, so the decoder would stay uninitialised: pick a CLIP model "
              "(e.g. ViT-B-32), or train CoCa with open_clip_train")
    text = model_config.get("text_cfg", {})
    source = text.get("hf_model_name") or text.get("hf_tokenizer_name")
    if source and importlib.util.find_spec("transformers") is None:
        _fail(f"--model {name} takes its text tower or tokenizer from Hugging Face ({source}), which needs the "
              "transformers package: pip install transformers (the files then come from the Hugging Face hub; "
              "offline, from its cache with HF_HUB_OFFLINE=1)")
