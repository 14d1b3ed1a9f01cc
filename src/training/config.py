"""A run's configuration: frozen, typed parts built once from the parsed flags, then settled against the world.

`Config.from_args` splits the resolved flags (`params.parse_args`) into the parts a run is built from; every
field is named like its flag's dest, so `flat()` is the layout params.json and the checkpoints' "config" have
always had. Facts only the world knows (the checkpoint's model, `auto` sizes, a CSV's rows, the effective
precision) are filled in by `replace`, which returns a new Config: nothing changes a config after it is made.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class DataConfig:
    """The training data and how it is read (sizes may be 'auto' until settled)."""

    dataset_type: str
    train_data: str | None
    train_num_samples: int | str | None
    data_size: int | str | None
    dataset_resampled: bool
    train_data_upsampling_factors: str | None
    csv_separator: str
    csv_img_key: str
    csv_caption_key: str
    captions_per_line: bool
    batch_size: int
    workers: int


@dataclass(frozen=True)
class EvalConfig:
    """What is evaluated, and after which epochs."""

    imagenet_val: str | None
    zeroshot_classnames: str | None
    zeroshot_frequency: int
    val_data: str | None
    val_num_samples: int | None
    val_frequency: int
    train_eval_num_samples: int  # 0: the training subset is not evaluated


@dataclass(frozen=True)
class ModelConfig:
    """The model (open_clip name, weights, initial temperature) and open_clip_train's model flags."""

    model: str | None
    pretrained: str | None
    temperature: float
    init_logit_bias: float | None
    grad_checkpointing: bool
    torchcompile: bool
    cache_dir: str | None
    pretrained_image: bool
    lock_image: bool
    lock_image_unlocked_groups: int
    lock_image_freeze_bn_stats: bool
    lock_text: bool
    lock_text_unlocked_layers: int
    lock_text_freeze_layer_norm: bool
    image_mean: list[float] | None
    image_std: list[float] | None
    image_interpolation: str | None
    image_resize_mode: str | None
    aug_cfg: dict
    force_image_size: list[int] | None
    force_context_length: int | None
    force_quick_gelu: bool
    force_patch_dropout: float | None
    force_custom_text: bool
    model_source: str | None = None  # for the log: --model, the checkpoint, or the default


@dataclass(frozen=True)
class OptimConfig:
    """Optimizer, learning-rate and temperature schedules, precision and the step's safeguards."""

    epochs: int
    stop_epochs: int
    lr: float | None
    beta1: float | None
    beta2: float | None
    eps: float | None
    wd: float
    warmup: int
    lr_scheduler: str
    epochs_cooldown: int | None
    lr_cooldown_end: float
    lr_cooldown_power: float
    skip_scheduler: bool
    grad_clip_norm: float | None
    precision: str
    accum_freq: int
    opt: str
    momentum: float | None
    lr_tau: float
    lr_tau_scheduler: str
    max_bad_steps: int
    precision_effective: str | None = None  # --precision on this device, once the device is known


@dataclass(frozen=True)
class ObjectiveConfig:
    """Which loss trains the model (OpenCLIP, SigLIP or a FastCLIP version) and its hyperparameters."""

    fastclip: bool
    siglip: bool
    local_loss: bool
    gather_with_grad: bool
    loss_dist_impl: str | None
    temperature_scheme: str
    multiply_tau: bool
    gamma: float
    gamma_schedule: str
    gamma_decay_epochs: int
    rho: float
    fastclip_eps: float
    clamp_u_to_g: float | None


@dataclass(frozen=True)
class CheckpointConfig:
    """Where a run starts from and when it saves."""

    resume: str | None
    save_frequency: int
    save_most_recent: bool
    delete_previous_checkpoint: bool
    save_every_n_steps: int
    save_every_minutes: float


@dataclass(frozen=True)
class RunConfig:
    """The run's name and folder, its logs and remote copy, and how its processes meet."""

    name: str | None
    logs: str
    seed: int
    paths_relative_to: str | None
    log_every_n_steps: int
    report_to: list[str]
    wandb_project_name: str
    wandb_notes: str
    log_local: bool
    remote_sync: str | None
    remote_sync_frequency: int
    remote_sync_protocol: str
    profile: bool
    debug: bool
    device: str
    dist_backend: str | None
    dist_url: str
    dist_timeout: float
    use_bn_sync: bool
    ddp_static_graph: bool
    no_set_device_rank: bool


PARTS = {"data": DataConfig, "eval": EvalConfig, "model": ModelConfig, "optim": OptimConfig,
         "objective": ObjectiveConfig, "checkpoint": CheckpointConfig, "run": RunConfig}


@dataclass(frozen=True)
class Config:
    data: DataConfig
    eval: EvalConfig
    model: ModelConfig
    optim: OptimConfig
    objective: ObjectiveConfig
    checkpoint: CheckpointConfig
    run: RunConfig

    @classmethod
    def from_values(cls, values: Mapping[str, Any]) -> Config:
        """The parts from flat values named like the flags' dests (a resolved Namespace's `vars`)."""
        return cls(**{part: _filled(kind, values) for part, kind in PARTS.items()})

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Config:
        return cls.from_values(vars(args))

    def flat(self) -> dict[str, Any]:
        """Every field by its flag's dest: the params.json and checkpoint layout."""
        return {f.name: getattr(getattr(self, part), f.name)
                for part, kind in PARTS.items() for f in dataclasses.fields(kind)}

    def replace(self, **changes: Any) -> Config:
        """A new Config with fields changed by dest; each change goes to the part that owns the field."""
        unknown = set(changes).difference(*_FIELDS.values())
        if unknown:
            raise TypeError(f"no such configuration field: {', '.join(sorted(unknown))}")
        parts = {}
        for part, kind in PARTS.items():
            mine = {name: value for name, value in changes.items() if name in _FIELDS[part]}
            parts[part] = dataclasses.replace(getattr(self, part), **mine) if mine else getattr(self, part)
        return Config(**parts)

    def select(self, kind: type[T]) -> T:
        """A library dataclass whose fields are named like the flags (e.g. FastCLIPConfig), filled from this
        config; a field the config lacks keeps the dataclass's default."""
        return _filled(kind, self.flat())

    @property
    def trains(self) -> bool:
        return trains(self.data.dataset_type, self.optim.epochs)


def _filled(kind: type[T], values: Mapping[str, Any]) -> T:
    """A dataclass from the values its fields are named after; a field `values` lacks keeps its default."""
    return kind(**{f.name: values[f.name] for f in dataclasses.fields(kind) if f.name in values})


def trains(dataset_type: str, epochs: int) -> bool:
    """Whether a run trains (it has training data and epochs), rather than only evaluating."""
    return dataset_type != "none" and epochs > 0


_FIELDS = {part: {f.name for f in dataclasses.fields(kind)} for part, kind in PARTS.items()}
