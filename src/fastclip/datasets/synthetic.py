"""Synthetic data (`--dataset-type synthetic`): random images and captions, indices 0..n-1.

For throughput measurements and runs without a dataset. Batches have the format and the per-epoch
step count of the webdataset loader; sample i is the same image and caption in every epoch.
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np
from PIL import Image

from fastclip.data.loader import SlotDataset, TrainLoader
from fastclip.train.progress import batches_per_epoch
from fastclip.data.samples import SAMPLE_STREAM, Preprocess, Sample, SkipLog, Tokenizer, derive_rng

_WORDS = ("a", "photo", "of", "the", "small", "large", "red", "blue", "dog", "cat", "car", "tree",
          "house", "on", "in", "with", "picture", "bright", "dark", "old")


class SyntheticDataset(SlotDataset):
    """Each pass permutes 0..n-1 (seeded by seed, epoch, pass) and slot s takes every S-th index.

    A position's `taken` counts the indices of the slot's share of the pass; resuming skips them
    without generating their images.
    """

    def __init__(self, num_samples: int, image_size: int, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.num_samples, self.image_size = num_samples, image_size

    def sample(self, index: int) -> Sample:
        rng = derive_rng(self.seed, index)
        pixels = rng.integers(0, 256, (self.image_size, self.image_size, 3), dtype=np.uint8)
        words = rng.choice(_WORDS, size=int(rng.integers(3, 12)))
        return Sample(Image.fromarray(pixels), (" ".join(words),), index)

    def pass_samples(self, slot: int, num_slots: int, pass_index: int, offset: int,
                     skips: SkipLog) -> Iterator[Sample | None]:
        order = derive_rng(self.seed, self.epoch, SAMPLE_STREAM, pass_index).permutation(self.num_samples)
        return (self.sample(int(index)) for index in order[slot::num_slots][offset:])


def build_synthetic_loader(
    num_samples: int,
    preprocess: Preprocess,
    tokenizer: Tokenizer,
    batch_size: int,
    seed: int = 0,
    epoch: int = 0,
    rank: int = 0,
    world_size: int = 1,
    workers: int = 0,
    image_size: int = 32,
    pin_memory: bool = False,
) -> TrainLoader:
    """A loader like `build_train_loader`'s over `num_samples` synthetic pairs (data_size = num_samples)."""
    if num_samples < world_size * max(workers, 1):
        raise ValueError(f"{num_samples=} leaves some of the {world_size} x {max(workers, 1)} worker slots empty")
    dataset = SyntheticDataset(num_samples, image_size, preprocess, tokenizer, batch_size,
                               seed=seed, epoch=epoch, rank=rank, world_size=world_size)
    return TrainLoader(dataset, batches_per_epoch(num_samples, batch_size, world_size), workers, pin_memory)
