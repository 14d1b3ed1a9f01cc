"""Decoded samples: a raw webdataset sample -> `Sample` (image, caption, index) -> a collated batch.

Index. A sample's index is int(json["key"]) (img2dataset writes it); with `data_size` given it must
lie in [0, data_size), the per-sample state's index range.

Captions. A sample may hold several captions of its image (MS-COCO, Flickr30k, re-captioned web data): a
list under "captions" in its .json, or, where the data set says so (`captions_per_line`), one per line of
its .txt (otherwise a .txt is one caption, line breaks included, as web alt-text can have them). Training
draws one per visit, from the batch's seeded generators (as the augmentations are, so an exact resume draws
the same ones); the sample keeps its one index, so FastCLIP keeps one u per image, whichever caption a visit
brings.

Bad input. Errors (`DataError`) where training would silently be wrong: with `data_size` given, a
sample whose .json is missing, has no integer "key", or a key outside [0, data_size). Counted skips
(logged with shard and sample key, the first few per worker and epoch, and counted in the next batch's
'skipped') where a sample cannot be used: no image, no text, an undecodable image or caption.

Randomness. Every random choice of the pipeline comes from a generator derived from integer keys
(seed, epoch, stream, ...), so it is the same on every rank and in every process; `seeded_rngs` seeds
the global RNGs the transforms draw from and restores them afterwards.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import random
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
MAX_LOGGED_SKIPS = 5
# Independent random streams derived from the same (seed, epoch).
SHARD_STREAM, SAMPLE_STREAM, LOADER_STREAM, AUGMENT_STREAM = 0, 1, 2, 3

Preprocess = Callable[[Image.Image], torch.Tensor]
Tokenizer = Callable[[list[str]], torch.Tensor]


class DataError(ValueError):
    """Input data that would make training wrong; the message names the shard, the sample and the fix."""


@dataclass
class Sample:
    """A decoded image with its captions (one or more); `index` is int(json['key']), or -1 where it is
    absent and not needed."""

    image: Image.Image
    captions: tuple[str, ...]
    index: int

    def caption(self, draw: bool) -> str:
        """One caption: drawn from the global RNG (seeded per batch in training) or, without `draw`, the first."""
        if draw and len(self.captions) > 1:
            return self.captions[random.randrange(len(self.captions))]
        return self.captions[0]


def split_captions(text: str) -> tuple[str, ...]:
    """The captions of a text member: its non-empty lines, stripped."""
    return tuple(line.strip() for line in text.splitlines() if line.strip())


def json_captions(raw: dict[str, Any]) -> tuple[str, ...]:
    """The "captions" list of a sample's .json, when it has one (strings only), else nothing."""
    try:
        listed = json.loads(raw["json"]).get("captions")
    except (KeyError, TypeError, ValueError, AttributeError):
        return ()
    if not isinstance(listed, list):
        return ()
    return tuple(c.strip() for c in listed if isinstance(c, str) and c.strip())


def derive_rng(*keys: int) -> np.random.Generator:
    """A generator determined by non-negative integer keys only (same on every rank and process)."""
    return np.random.default_rng(np.random.SeedSequence(list(keys)))


@contextlib.contextmanager
def seeded_rngs(*keys: int) -> Iterator[None]:
    """Torch's, python's and numpy's global RNGs seeded from `keys` inside, restored on exit.

    Transforms draw from the global RNGs; seeding them per batch makes augmentations independent of
    what ran before, and restoring them keeps the model's randomness independent of data loading.
    """
    rng = derive_rng(*keys)
    seed, numpy_seed = int(rng.integers(2**63)), int(rng.integers(2**32))
    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(numpy_seed)
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


# ------------------------------------------------------------------------------------------ skips


class SkipLog:
    """Counts skipped samples until the next batch takes the count; logs the first few of them."""

    def __init__(self, limit: int = MAX_LOGGED_SKIPS) -> None:
        self.limit = limit
        self.pending = 0
        self.logged = 0
        self._muted = False

    @contextlib.contextmanager
    def muted(self) -> Iterator[None]:
        """Ignores skips met again while fast-forwarding: they were logged and counted before."""
        self._muted = True
        try:
            yield
        finally:
            self._muted = False

    def record(self, source: str, what: str) -> None:
        """Counts one skip; `source` names the file it came from ("shard URL", "CSV PATH")."""
        if self._muted:
            return
        self.pending += 1
        if self.logged < self.limit:
            log.warning("%s: skipped %s", source, what)
        elif self.logged == self.limit:
            log.warning("further skipped samples are counted in the batches' 'skipped' but not logged")
        self.logged += 1

    def take(self) -> int:
        count, self.pending = self.pending, 0
        return count


def error_text(error: BaseException) -> str:
    """An exception as one short line for skip logs and error messages (an OSError's reason, not its errno)."""
    message = error.strerror if isinstance(error, OSError) and error.strerror else error.args[0] if error.args else ""
    return f"{type(error).__name__}: {message}"


# ------------------------------------------------------------------------------------------- decoding

_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa"}


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode as RGB: transparency over white, 16-bit grey scaled down rather than clipped."""
    if image.mode.startswith("I;16"):
        image = Image.fromarray((np.asarray(image, dtype=np.float32) / 257.0).round().astype(np.uint8))
    if image.mode in _ALPHA_MODES or (image.mode == "P" and "transparency" in image.info):
        image = Image.alpha_composite(Image.new("RGBA", image.size, "white"), image.convert("RGBA"))
    return image.convert("RGB")


def sample_index(raw: dict[str, Any], data_size: int | None) -> int:
    """int(json['key']); -1 when absent and no index is needed; a `DataError` when it is needed."""
    shard, key = raw["__url__"], raw["__key__"]
    try:
        index = int(json.loads(raw["json"])["key"])
    except (KeyError, TypeError, ValueError) as error:
        if data_size is None:
            return -1
        raise DataError(
            f"shard {shard}, sample {key}: no integer 'key' in the sample's .json ({error_text(error)}); "
            "with data_size set every sample needs the .json img2dataset writes, whose 'key' is its index"
        ) from error
    if data_size is not None and not 0 <= index < data_size:
        raise DataError(
            f"shard {shard}, sample {key}: key {index} is outside [0, data_size={data_size}); set data_size "
            "(--data_size) above the largest key: img2dataset keys are shard_id * 10^ceil(log10("
            "samples_per_shard)) + i, so they exceed the number of samples"
        )
    return index


def decode_sample(raw: dict[str, Any], data_size: int | None, skips: SkipLog,
                  captions_per_line: bool = False) -> Sample | None:
    """Image, caption and index of a raw sample, or None (a recorded skip) when it cannot be used."""
    shard, key = raw["__url__"], raw["__key__"]
    extension = next((e for e in IMAGE_EXTENSIONS if e in raw), None)
    listed = json_captions(raw)
    if extension is None or ("txt" not in raw and not listed):
        skips.record(f"shard {shard}", f"sample {key} (no {'image' if extension is None else 'text'})")
        return None
    index = sample_index(raw, data_size)
    try:
        text = "" if listed else raw["txt"].decode("utf-8")
        captions = listed or (split_captions(text) if captions_per_line else (text,))
        with Image.open(io.BytesIO(raw[extension])) as image:
            rgb = to_rgb(image)
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        skips.record(f"shard {shard}", f"sample {key} (undecodable .{extension} or .txt: {error_text(error)})")
        return None
    if not captions:
        skips.record(f"shard {shard}", f"sample {key} (empty caption)")
        return None
    return Sample(rgb, captions, index)


def collate(samples: Sequence[Sample], preprocess: Preprocess, tokenizer: Tokenizer, skipped: int,
            draw_captions: bool = True) -> dict:
    """One batch in the format the engine consumes: a caption per sample, drawn (training) or the first.
    Without drawing (validation), a batch where some sample has several captions also carries all of them
    ('captions') and the batch position of each one's image ('caption_owner'), for retrieval."""
    batch = {
        "image": torch.stack([preprocess(s.image) for s in samples]),
        "text": tokenizer([s.caption(draw_captions) for s in samples]),
        "index": torch.tensor([s.index for s in samples], dtype=torch.int64),
        "skipped": skipped,
    }
    if not draw_captions and any(len(s.captions) > 1 for s in samples):
        batch["captions"] = tokenizer([c for s in samples for c in s.captions])
        batch["caption_owner"] = torch.tensor([i for i, s in enumerate(samples) for _ in s.captions])
    return batch
