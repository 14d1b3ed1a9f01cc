"""Write img2dataset-style webdataset shards: per sample KEY.<image>, KEY.txt and KEY.json {"key", ...}."""

from __future__ import annotations

import io
import math
import os
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
from PIL import Image
from webdataset import TarWriter

_PIL_FORMATS = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}


def img2dataset_key(shard_id: int, position: int, samples_per_shard: int, shard_digits: int = 5) -> str:
    """img2dataset's key: shard_id * 10^ceil(log10(samples_per_shard)) + position, zero-padded.

    Keys are dense only when the shard size is a power of ten, which is why data_size must exceed
    the largest key rather than the number of samples.
    """
    magnitude = math.ceil(math.log10(samples_per_shard))
    return f"{shard_id * 10**magnitude + position:0{shard_digits + magnitude}d}"


def encode_image(image: Image.Image | np.ndarray, extension: str = "png") -> bytes:
    """Image bytes in the format the extension names (a uint8 array is read as PIL would)."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buffer = io.BytesIO()
    image.save(buffer, format=_PIL_FORMATS[extension])
    return buffer.getvalue()


def shard_sample(
    key: str,
    image: Image.Image | np.ndarray | bytes | None,
    caption: str | None,
    extension: str = "png",
    meta: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A sample as img2dataset writes it; None leaves the image or caption out, `meta` extends the json."""
    sample: dict[str, Any] = {"__key__": key, "json": {"key": key, "caption": caption, **(meta or {})}}
    if image is not None:
        sample[extension] = image if isinstance(image, bytes) else encode_image(image, extension)
    if caption is not None:
        sample["txt"] = caption
    return sample


def write_shard(path: str | Path, samples: Iterable[dict[str, Any]]) -> int:
    """Write webdataset samples ({'__key__', extension: bytes/str/dict}) to a tar; returns their count.

    The tar is written under a temporary name and renamed, so a shard that exists is complete.
    """
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    count = 0
    with TarWriter(str(partial), mtime=0) as writer:
        for sample in samples:
            writer.write(sample)
            count += 1
    os.replace(partial, path)
    return count


def write_shards(num_samples: int, make_sample: Callable[[str, int], dict[str, Any]], directory: str | Path,
                 samples_per_shard: int) -> tuple[str, int]:
    """Shards 00000.tar, 00001.tar, ... as img2dataset lays them out: sample i (in order) goes to shard
    i // samples_per_shard with its img2dataset key, and `make_sample(key, i)` builds it.

    Returns the shards' file-name brace pattern and data_size (the largest key + 1).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    starts = range(0, num_samples, samples_per_shard)
    for shard_id, start in enumerate(starts):
        positions = range(min(samples_per_shard, num_samples - start))
        write_shard(directory / f"{shard_id:05d}.tar",
                    (make_sample(img2dataset_key(shard_id, p, samples_per_shard), start + p) for p in positions))
    last = num_samples - 1
    data_size = int(img2dataset_key(last // samples_per_shard, last % samples_per_shard, samples_per_shard)) + 1
    return f"{{00000..{len(starts) - 1:05d}}}.tar", data_size
