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

import argparse
import difflib
from pathlib import Path


from fastclip.checkpoint import files
from fastclip.data.samples import DataError
from fastclip.data.shards import expand_shards
from training.params import DEFAULT_MODEL, apply_model, trains

HF_HUB = "hf-hub:"
LOCAL_DIR = "local-dir:"


def check_run(args: argparse.Namespace) -> None:
    """Check the paths, settle the model (from the checkpoint when --model is absent) and check its name."""
    check_paths(args)
    settle_model(args)
    check_model_name(args.model)


def _fail(message: str) -> None:
    raise SystemExit(f"error: {message}")


def check_paths(args: argparse.Namespace) -> None:
    """Every input the flags name exists, so that a typo stops the run now, not after an epoch of training."""
    check_input = _check_csv if args.dataset_type == "csv" else _check_shards
    if args.train_data and trains(args) and args.dataset_type != "synthetic":  # synthetic ignores the flag
        check_input("--train-data", args.train_data)
    if args.val_data:
        check_input("--val-data", args.val_data)
    if args.imagenet_val and not Path(args.imagenet_val).is_dir():
        _fail(f"--imagenet-val {args.imagenet_val}: no such folder: pass an image folder with one sub-folder "
              "per class (e.g. ImageNet's val/ with its 1000 synset folders)")
    if args.zeroshot_classnames and not Path(args.zeroshot_classnames).is_file():
        _fail(f"--zeroshot-classnames {args.zeroshot_classnames}: no such file: pass a text file with one class "
              "name per line, or drop the flag to use the folder names")
    if args.resume not in (None, "latest") and not Path(args.resume).is_file():
        _fail(f"--resume {args.resume}: no such file: pass a checkpoint file, or --resume latest for the newest "
              f"checkpoint in {Path(args.logs) / (args.name or 'NAME') / 'checkpoints'}")


def _check_shards(flag: str, spec: str) -> None:
    try:
        expand_shards(spec)
    except DataError as error:
        _fail(f"{flag}: {error}")


def _check_csv(flag: str, path: str) -> None:
    if not Path(path).expanduser().is_file():
        _fail(f"{flag} {path}: no such CSV file (relative paths start in {Path.cwd()}): fix the path")


def resume_candidates(args: argparse.Namespace) -> tuple[list[Path], list[str], bool]:
    """The checkpoints --resume names, newest first; for 'latest', why the unreadable ones were left out;
    and whether the user named one explicitly."""
    if args.resume is None:
        return [], [], False
    if args.resume != "latest":
        return [Path(args.resume)], [], True
    newest, unreadable = files.newest_first(Path(args.logs) / args.name / "checkpoints")
    return newest, unreadable, False


def resume_path(args: argparse.Namespace) -> Path | None:
    """The checkpoint the run will start from: --resume PATH, or the newest readable one for 'latest'."""
    candidates, _, _ = resume_candidates(args)
    return candidates[0] if candidates else None


def settle_model(args: argparse.Namespace) -> None:
    """A resumed or evaluated checkpoint fixes the model: take it when --model is absent, and stop when
    --model names another (rather than fail later in load_state_dict)."""
    path = resume_path(args)
    if path is None:
        if args.resume == "latest" and not trains(args):
            folder = Path(args.logs) / args.name / "checkpoints"
            _fail(f"--resume latest: no checkpoint in {folder} to evaluate: pass --resume PATH, or the --name "
                  "(and --logs) of the run that wrote it")
        if args.model is None:
            apply_model(args, DEFAULT_MODEL, "the default (no --model, no checkpoint yet)")
        return
    config = files.peek(path).get("config")
    recorded = config.get("model") if isinstance(config, dict) else None
    if args.model is None:
        if recorded is None:
            _fail(f"{path} does not record its model: pass --model NAME")
        apply_model(args, recorded, f"the checkpoint {path}")
    elif recorded is not None and recorded != args.model:
        _fail(f"--model {args.model} does not match {path}, a {recorded} checkpoint: drop --model (the "
              f"checkpoint's is used) or pass --model {recorded}")


def check_model_name(name: str) -> None:
    """open_clip knows the model: a registered config (ours included), hf-hub:ORG/REPO, or an existing
    local-dir:PATH folder with its open_clip_config.json."""
    if name.startswith(HF_HUB):
        return
    if name.startswith(LOCAL_DIR):
        folder = Path(name[len(LOCAL_DIR):])
        if not (folder / "open_clip_config.json").is_file():
            _fail(f"--model {name}: {folder} is not a folder holding open_clip_config.json: fix the path")
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
