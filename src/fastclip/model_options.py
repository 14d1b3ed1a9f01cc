"""open_clip_train's model flags as one checked value (ModelOptions): forced sizes, preprocessing overrides,
tower locking, SigLIP's initial logit bias. Free of torch and open_clip, so that the flag parser checks the
same rules the model builder relies on, at once."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

# open_clip_train's SigLIP initialisation: logit scale log(10) (temperature 0.1), logit bias -10
SIGLIP_TEMPERATURE, SIGLIP_LOGIT_BIAS = 0.1, -10.0
IMAGE_INTERPOLATIONS = ("bicubic", "bilinear", "random")
IMAGE_RESIZE_MODES = ("shortest", "longest", "squash")


def _flag(name: str) -> str:
    """The command-line spelling of an option, for error messages."""
    return "--" + name.replace("_", "-")


def _check_aug_cfg(aug_cfg: Mapping[str, Any]) -> None:
    """Catch what open_clip would only fail on (with a TypeError or an assert) once it builds the transforms."""
    if not aug_cfg:
        return
    import open_clip  # only when --aug-cfg is given: the flags' checks stay fast

    keys = tuple(f.name for f in dataclasses.fields(open_clip.AugmentationCfg))
    unknown = sorted(set(aug_cfg) - set(keys))
    if unknown:
        raise ValueError(f"--aug-cfg: unknown key(s) {', '.join(unknown)}; open_clip knows "
                         f"{', '.join(keys)}")
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
        return [written(name, getattr(self, name)) for name in names
                if getattr(self, name) is not None and getattr(self, name) is not False]


def written(name: str, value: Any) -> str:
    """An option as typed: `--flag` for a switch, `--flag v1 v2` otherwise."""
    if value is True:
        return _flag(name)
    values = value if isinstance(value, Sequence) and not isinstance(value, str) else [value]
    return " ".join([_flag(name), *map(str, values)])


def _check_force_options(options: ModelOptions) -> None:
    size = options.force_image_size
    if size is not None and (len(size) not in (1, 2) or min(size) <= 0):
        raise ValueError(f"{written('force_image_size', size)}: give one size (square) or height and width, all > 0")
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
            raise ValueError(f"{written(name, value)}: choose one of {', '.join(choices)}")


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
