"""Models, transforms and tokenizers, all from open_clip; this module adds our CPU-sized configs and
open_clip_train's model flags (ModelOptions: forced sizes, preprocessing overrides, tower locking)."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import open_clip
import torch
from open_clip.hf_model import HFTextEncoder
from open_clip.modified_resnet import ModifiedResNet
from open_clip.timm_model import TimmModel

CONFIG_DIR = Path(__file__).with_name("model_configs")
AUG_CFG_KEYS = tuple(f.name for f in dataclasses.fields(open_clip.AugmentationCfg))
IMAGE_INTERPOLATIONS = ("bicubic", "bilinear", "random")
IMAGE_RESIZE_MODES = ("shortest", "longest", "squash")
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


def _flag(name: str) -> str:
    """The command-line spelling of an option, for error messages."""
    return "--" + name.replace("_", "-")


def _check_aug_cfg(aug_cfg: Mapping[str, Any]) -> None:
    """Catch what open_clip would only fail on (with a TypeError or an assert) once it builds the transforms."""
    unknown = sorted(set(aug_cfg) - set(AUG_CFG_KEYS))
    if unknown:
        raise ValueError(f"--aug-cfg: unknown key(s) {', '.join(unknown)}; open_clip knows "
                         f"{', '.join(AUG_CFG_KEYS)}")
    jitter = aug_cfg.get("color_jitter")
    if aug_cfg.get("color_jitter_prob") and not (isinstance(jitter, (tuple, list)) and len(jitter) == 4):
        raise ValueError("--aug-cfg color_jitter_prob needs color_jitter with 4 values, "
                         "e.g. color_jitter=(0.4,0.4,0.4,0.1)")


@dataclass(frozen=True)
class ModelOptions:
    """open_clip_train's model flags, with its names, defaults and meaning, plus SigLIP's initial logit bias.

    Checked on creation, so that a contradictory combination fails before a model is built. The model's
    initial logit scale is not here: build_model's `temperature` sets it (SigLIP's log(10) is temperature 0.1).
    """

    force_image_size: Sequence[int] | None = None
    force_context_length: int | None = None
    force_quick_gelu: bool = False
    force_patch_dropout: float | None = None
    force_custom_text: bool = False
    pretrained_image: bool = False
    cache_dir: str | None = None
    image_mean: Sequence[float] | None = None
    image_std: Sequence[float] | None = None
    image_interpolation: str | None = None
    image_resize_mode: str | None = None
    aug_cfg: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    lock_image: bool = False
    lock_image_unlocked_groups: int = 0
    lock_image_freeze_bn_stats: bool = False
    lock_text: bool = False
    lock_text_unlocked_layers: int = 0
    lock_text_freeze_layer_norm: bool = False
    init_logit_bias: float | None = None

    def __post_init__(self) -> None:
        _check_force_options(self)
        _check_image_options(self)
        _check_aug_cfg(self.aug_cfg)
        _check_lock_options(self)

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> ModelOptions:
        """Options from values named like open_clip_train's dests (a run's configuration, or the one a
        checkpoint recorded); a name the record lacks keeps its default (a flag newer than the record)."""
        values = {f.name: record[f.name] for f in dataclasses.fields(cls) if f.name in record}
        for name in ("force_image_size", "image_mean", "image_std"):
            if values.get(name) is not None:
                values[name] = tuple(values[name])
        if "aug_cfg" in values:
            values["aug_cfg"] = dict(values["aug_cfg"] or {})
        return cls(**values)

    def forced(self) -> list[str]:
        """The --force-* flags set, written as on a command line."""
        names = [f.name for f in dataclasses.fields(self) if f.name.startswith("force_")]
        return [_written(name, getattr(self, name)) for name in names
                if getattr(self, name) is not None and getattr(self, name) is not False]


def _written(name: str, value: Any) -> str:
    """An option as typed: `--flag` for a switch, `--flag v1 v2` otherwise."""
    if value is True:
        return _flag(name)
    values = value if isinstance(value, Sequence) and not isinstance(value, str) else [value]
    return " ".join([_flag(name), *map(str, values)])


def _check_force_options(options: ModelOptions) -> None:
    size = options.force_image_size
    if size is not None and (len(size) not in (1, 2) or min(size) <= 0):
        raise ValueError(f"{_written('force_image_size', size)}: give one size (square) or height and width, all > 0")
    if options.force_context_length is not None and options.force_context_length <= 0:
        raise ValueError(f"--force-context-length {options.force_context_length}: must be > 0")
    if options.force_patch_dropout is not None and not 0 <= options.force_patch_dropout < 1:
        raise ValueError(f"--force-patch-dropout {options.force_patch_dropout}: must be in [0, 1)")


def _check_image_options(options: ModelOptions) -> None:
    for name in ("image_mean", "image_std"):
        values = getattr(options, name)
        if values is not None and len(values) not in (1, 3):
            raise ValueError(f"{_flag(name)}: give 1 value (all channels) or 3 (R G B), not {len(values)}")
    if options.image_std is not None and min(options.image_std) <= 0:
        raise ValueError("--image-std: every value must be > 0")
    for name, choices in (("image_interpolation", IMAGE_INTERPOLATIONS), ("image_resize_mode", IMAGE_RESIZE_MODES)):
        value = getattr(options, name)
        if value not in (None, *choices):
            raise ValueError(f"{_written(name, value)}: choose one of {', '.join(choices)}")


def _check_lock_options(options: ModelOptions) -> None:
    """open_clip_train ignores a tower's lock details without the lock itself; here that is an error."""
    towers = (("lock_image", "lock_image_unlocked_groups", "lock_image_freeze_bn_stats"),
              ("lock_text", "lock_text_unlocked_layers", "lock_text_freeze_layer_norm"))
    for lock, unlocked, freeze in towers:
        if getattr(options, unlocked) < 0:
            raise ValueError(f"{_flag(unlocked)} {getattr(options, unlocked)}: must be >= 0")
        for detail in (unlocked, freeze):
            if getattr(options, detail) and not getattr(options, lock):
                raise ValueError(f"{_flag(detail)} has no effect without {_flag(lock)}: add {_flag(lock)} or drop it")


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
        raise ValueError(f"{_written('force_image_size', options.force_image_size)}: {name}'s patches are "
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
