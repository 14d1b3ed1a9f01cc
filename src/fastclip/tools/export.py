"""Export a training checkpoint as an open_clip `local-dir:` model folder.

    python -m fastclip.tools.export logs/NAME/checkpoints/epoch_N.pt OUT [--model NAME] [--force]

OUT receives the two files open_clip 3.3.0 reads for `local-dir:OUT`: `open_clip_model.safetensors`
(the model weights alone, the learned logit_scale among them) and `open_clip_config.json` (the full
model config and the preprocessing). The config is written out in full rather than named, so that
`open_clip.create_model_and_transforms('local-dir:OUT')` and `open_clip.get_tokenizer('local-dir:OUT')`
work where only open_clip is installed, also for the configs this project registers (ViT-Tiny-32px).
Optimizer, schedules and FastCLIP's per-sample state stay behind: they matter only for resuming.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Sequence

import open_clip
import safetensors.torch
from open_clip.constants import HF_CONFIG_NAME, HF_SAFE_WEIGHTS_NAME

from fastclip.checkpoint.files import CheckpointError, load, model_state, write_atomic
from fastclip.models import ModelBundle, ModelOptions, build_model, register_model_configs


class ExportError(ValueError):
    """An export that cannot be done; the message names the file or model and the fix."""


def export_checkpoint(checkpoint: str | Path, out: str | Path, model: str | None = None,
                      force: bool = False) -> Path:
    """Write the model of a training checkpoint into `out` as an open_clip `local-dir:` folder.

    `model` defaults to the `--model` the run recorded in the checkpoint. `out` must be missing or
    empty unless `force`, which overwrites the exported files and leaves anything else in place.
    """
    out = Path(out)
    _check_output(out, force)
    try:
        saved = load(checkpoint)
    except CheckpointError as error:
        raise ExportError(f"{error}: pass a run's checkpoints/epoch_N.pt or epoch_latest.pt") from error
    name = model or saved.get("config", {}).get("model")
    if not name:
        raise ExportError(f"{checkpoint} records no model name: pass --model NAME (the run's --model)")
    _refuse_changed_architecture(checkpoint, saved.get("config", {}))
    model_cfg = _model_config(name)
    bundle = build_model(name)
    try:
        bundle.model.load_state_dict(model_state(saved), strict=True)
    except RuntimeError as error:
        detail = " ".join(str(error).split())[:300]
        raise ExportError(f"the weights in {checkpoint} do not fit model {name!r}: pass the run's --model "
                          f"({detail})") from error
    del saved  # the optimizer state it holds is not needed while the weights are serialised
    _write_local_dir(out, bundle, model_cfg)
    return out


def _write_local_dir(out: Path, bundle: ModelBundle, model_cfg: dict) -> None:
    """The files `local-dir:OUT` reads, each written atomically (a stopped export leaves no half file)."""
    out.mkdir(parents=True, exist_ok=True)
    tensors = {key: value.contiguous() for key, value in bundle.model.state_dict().items()}
    write_atomic(out / HF_SAFE_WEIGHTS_NAME, lambda f: f.write(safetensors.torch.save(tensors)))
    config = {"model_cfg": model_cfg, "preprocess_cfg": dict(bundle.model.visual.preprocess_cfg)}
    write_atomic(out / HF_CONFIG_NAME, lambda f: f.write(json.dumps(config, indent=2).encode()))
    if hasattr(bundle.tokenizer, "save_pretrained"):  # local-dir: reads a Hugging Face tokenizer from OUT
        bundle.tokenizer.save_pretrained(out)


def _check_output(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} is a file: choose a folder name for OUT")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ExportError(f"{out} is not empty: choose another OUT, or pass --force to overwrite the model in it")


def _refuse_changed_architecture(checkpoint: Path | str, config: dict) -> None:
    """The export writes the named model's config: a run whose flags changed the architecture (--force-*,
    --siglip's logit bias) would not load from it, so say so instead of writing a broken folder."""
    options = ModelOptions.from_record(config)
    changed = options.forced() + (["--siglip"] if options.init_logit_bias is not None else [])
    if changed:
        raise ExportError(f"{checkpoint} was trained with {' '.join(changed)}, which changes the model's "
                          "architecture; export writes the unchanged config of --model and cannot describe it")


def _model_config(name: str) -> dict:
    """The full open_clip config of `name` (one of ours, open_clip's, or a local-dir:PATH)."""
    register_model_configs()
    fix = "pass --model with a name from open_clip.list_models() or a local-dir:PATH"
    try:
        config = open_clip.get_model_config(name)
    except (OSError, ValueError) as error:
        raise ExportError(f"model {name!r} cannot be read ({error}): {fix}") from error
    if config is None:
        raise ExportError(f"model {name!r} is unknown to open_clip: {fix}")
    return config


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="fastclip-export", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path, help="epoch_N.pt or epoch_latest.pt of a run")
    parser.add_argument("out", type=Path, help="folder to write (missing or empty, unless --force)")
    parser.add_argument("--model", default=None, help="model name (default: the --model the run recorded)")
    parser.add_argument("--force", action="store_true", help="write into a non-empty OUT")
    args = parser.parse_args(argv)
    try:
        out = export_checkpoint(args.checkpoint, args.out, args.model, args.force)
    except ExportError as error:
        raise SystemExit(f"error: {error}") from None
    print(f"exported {args.checkpoint} to {out}: load it with "
          f"open_clip.create_model_and_transforms('local-dir:{out}')")


if __name__ == "__main__":
    main()
