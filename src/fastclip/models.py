"""Models, transforms and tokenizers, all from open_clip; this module adds our CPU-sized configs and
open_clip_train's model flags (ModelOptions: forced sizes, preprocessing overrides, tower locking)."""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import open_clip
import torch
from open_clip.hf_model import HFTextEncoder
from open_clip.modified_resnet import ModifiedResNet
from open_clip.timm_model import TimmModel

from .model_options import ModelOptions, written

CONFIG_DIR = Path(__file__).with_name("model_configs")
_registered = False
logger = logging.getLogger("fastclip")


def register_model_configs() -> None:
    """Make our small configs (e.g. ViT-Tiny-32px, for 28-64 px images on a CPU) known to open_clip."""
    global _registered
    if not _registered:
        open_clip.add_model_config(CONFIG_DIR)
        _registered = True


@contextlib.contextmanager
def _without_random_init_warning() -> Iterator[None]:
    """Drop open_clip's root-logger warning that no pretrained weights were loaded: without --pretrained
    a random initialisation is what was asked for. Any other warning still shows."""

    def keep(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No pretrained weights loaded")

    root = logging.getLogger()
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)



def _creation_kwargs(options: ModelOptions) -> dict[str, Any]:
    """create_model_and_transforms' keyword arguments, as open_clip_train's main passes the same flags."""
    size = options.force_image_size
    kwargs = dict(
        force_quick_gelu=options.force_quick_gelu,
        force_custom_text=options.force_custom_text,
        force_patch_dropout=options.force_patch_dropout,
        force_image_size=size[0] if size is not None and len(size) == 1 else size,
        force_context_length=options.force_context_length,
        image_mean=options.image_mean,
        image_std=options.image_std,
        image_interpolation=options.image_interpolation,
        image_resize_mode=options.image_resize_mode,
        aug_cfg=dict(options.aug_cfg),
        pretrained_image=options.pretrained_image,
        cache_dir=options.cache_dir,
    )
    if options.init_logit_bias is not None:
        kwargs["init_logit_bias"] = options.init_logit_bias
    return kwargs


def _create(name: str, device: torch.device | str, precision: str, pretrained: str | None,
            options: ModelOptions) -> tuple[torch.nn.Module, Callable, Callable]:
    """open_clip's model and transforms; an error under --force-* flags names them (open_clip's own message
    does not say that, e.g., pretrained weights do not fit a forced size)."""
    try:
        with _without_random_init_warning() if pretrained is None else contextlib.nullcontext():
            return open_clip.create_model_and_transforms(
                name, pretrained=pretrained, precision=precision, device=device, output_dict=True,
                **_creation_kwargs(options))
    except torch.OutOfMemoryError:
        raise
    except (RuntimeError, ValueError, AssertionError) as error:
        if not options.forced():
            raise
        reason = " ".join(str(error).split()).rstrip(".")
        reason = reason if len(reason) <= 300 else reason[:300] + "..."
        raise ValueError(f"{name} cannot be built with {' '.join(options.forced())}: {reason}; change or drop "
                         "those flags") from error


def _check_model_fits(name: str, model: torch.nn.Module, options: ModelOptions) -> None:
    """Flags open_clip would ignore, or assert on, for this particular model."""
    visual = model.visual
    if options.pretrained_image and not isinstance(visual, TimmModel):
        raise ValueError(f"--pretrained-image loads timm ImageNet weights, but {name}'s image tower is not a "
                         "timm model: drop the flag")
    if options.lock_image_freeze_bn_stats and not any(
            isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in visual.modules()):
        raise ValueError(f"--lock-image-freeze-bn-stats: {name}'s image tower has no BatchNorm: drop the flag")
    if options.lock_image_unlocked_groups and isinstance(visual, ModifiedResNet):
        raise ValueError(f"--lock-image-unlocked-groups: open_clip locks {name}'s ResNet image tower only as a "
                         "whole: drop the flag")
    if options.lock_text and not options.lock_text_freeze_layer_norm and not isinstance(
            getattr(model, "text", None), HFTextEncoder):
        raise ValueError(f"--lock-text on {name}'s text tower needs --lock-text-freeze-layer-norm: open_clip "
                         "cannot leave its LayerNorms trainable (only a Hugging Face text tower can)")
    patch = getattr(visual, "patch_size", None)
    if options.force_image_size is not None and patch is not None and any(
            size % step for size, step in zip(visual.image_size, patch)):
        raise ValueError(f"{written('force_image_size', options.force_image_size)}: {name}'s patches are "
                         f"{patch[0]}x{patch[1]} px; give a multiple of that")


def _lock_towers(model: torch.nn.Module, options: ModelOptions) -> None:
    """LiT-style locking through open_clip's own methods; says how much of the model is left to train."""
    if options.lock_image:
        model.lock_image_tower(unlocked_groups=options.lock_image_unlocked_groups,
                               freeze_bn_stats=options.lock_image_freeze_bn_stats)
    if options.lock_text:
        model.lock_text_tower(unlocked_layers=options.lock_text_unlocked_layers,
                              freeze_layer_norm=options.lock_text_freeze_layer_norm)
    if options.lock_image or options.lock_text:
        total = sum(p.numel() for p in model.parameters())
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        logger.info("towers locked: %d of %d parameters trainable (%.1f%%)", trainable, total, 100 * trainable / total)


@dataclass
class ModelBundle:
    model: torch.nn.Module
    preprocess_train: Callable
    preprocess_val: Callable
    tokenizer: Callable


def build_model(
    name: str,
    device: torch.device | str = "cpu",
    temperature: float | None = None,
    precision: str = "fp32",
    pretrained: str | None = None,
    grad_checkpointing: bool = False,
    options: ModelOptions | None = None,
) -> ModelBundle:
    """Create an open_clip model (any registered name, or `local-dir:PATH`) with its transforms.

    `temperature` initialises the model's logit_scale to log(1 / temperature), the value the FastCLIP
    objectives and the seed's `--temperature` flag refer to; None keeps open_clip's log(1 / 0.07).
    `options` carries open_clip_train's model flags (ModelOptions); towers are locked after creation.
    """
    options = options or ModelOptions()
    if options.pretrained_image and pretrained is not None:
        raise ValueError("--pretrained-image has no effect with --pretrained (the CLIP weights replace the "
                         "image tower's): drop one")
    register_model_configs()
    model, preprocess_train, preprocess_val = _create(name, device, precision, pretrained, options)
    _check_model_fits(name, model, options)
    if temperature is not None:
        with torch.no_grad():
            model.logit_scale.fill_(math.log(1.0 / temperature))
    _lock_towers(model, options)
    if grad_checkpointing:
        model.set_grad_checkpointing(True)
    tokenizer = open_clip.get_tokenizer(name, context_length=options.force_context_length, cache_dir=options.cache_dir)
    return ModelBundle(model, preprocess_train, preprocess_val, tokenizer)
