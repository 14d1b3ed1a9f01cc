"""Models, transforms and tokenizers, all from open_clip; this module only adds our CPU-sized configs."""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import open_clip
import torch

CONFIG_DIR = Path(__file__).with_name("model_configs")
_registered = False


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
) -> ModelBundle:
    """Create an open_clip model (any registered name, or `local-dir:PATH`) with its transforms.

    `temperature` initialises the model's logit_scale to log(1 / temperature), the value the FastCLIP
    objectives and the seed's `--temperature` flag refer to.
    """
    register_model_configs()
    with _without_random_init_warning() if pretrained is None else contextlib.nullcontext():
        model, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(
            name, pretrained=pretrained, precision=precision, device=device, output_dict=True
        )
    if temperature is not None:
        with torch.no_grad():
            model.logit_scale.fill_(math.log(1.0 / temperature))
    if grad_checkpointing:
        model.set_grad_checkpointing(True)
    return ModelBundle(model, preprocess_train, preprocess_val, open_clip.get_tokenizer(name))
