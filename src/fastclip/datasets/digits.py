"""A second real data set, fully offline: scikit-learn's handwritten digits as img2dataset-style shards.

`sklearn.datasets.load_digits` ships 1,797 real 8x8 scans (the UCI "Optical Recognition of Handwritten
Digits" test set, bundled with scikit-learn under its BSD-3-Clause licence), so this needs no network.
A fixed, seeded, stratified split keeps `test_size` images (50 per class by default) for a zero-shot
ImageFolder `test/digit_<name>/NNNN.png` (prompts read "a photo of the digit seven."); the rest become
training shards (KEY.png, KEY.txt, KEY.json) with img2dataset's sparse keys and captions that name the
digit with varied templates, as a word or as a numeral. Images are upscaled to 32 px, the input size
of ViT-Tiny-32px, and drawn white on black as in the scans.

    python -m fastclip.datasets.digits --out data/digits [--samples-per-shard 500] [--test-size 500]

Needs scikit-learn (`pip install scikit-learn`).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from .demo import DemoData, build_once
from .writer import shard_sample, write_shards

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# {w}: the digit's word, {n}: its numeral. Both forms, so the text side must tie "7" and "seven" to
# the same images; the zero-shot prompts use the word only.
TEMPLATES = (
    "a handwritten digit {w}.",
    "a scan of the number {n}.",
    "the digit {w}, written by hand.",
    "a low resolution scan of a handwritten {w}.",
    "a photo of the digit {w}.",
    "a blurry picture of the number {w}.",
    "the numeral {n} on a black background.",
    "a handwritten {n}.",
    "a small grayscale image of the digit {w}.",
)
IMAGE_SIZE = 32
MANIFEST = "digits.json"


def class_folder(label: int) -> str:
    """The zero-shot folder name of a class; evaluation reads underscores as spaces: "digit seven"."""
    return f"digit_{WORDS[label]}"


def caption(label: int, rng: np.random.Generator) -> str:
    """A caption for a digit with a random template, so that captions are not one string per class."""
    return TEMPLATES[rng.integers(len(TEMPLATES))].format(w=WORDS[label], n=label)


def to_image(scan: np.ndarray) -> Image.Image:
    """An 8x8 scan with values 0..16 as a 32x32 8-bit grayscale image (bilinear: smooth, no ringing)."""
    pixels = np.round(scan.reshape(8, 8) * (255 / 16)).astype(np.uint8)
    return Image.fromarray(pixels).resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR)


def load_split(test_size: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train scans, train labels, test scans, test labels): a stratified split fixed by `seed`."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        digits.data, digits.target, test_size=test_size, stratify=digits.target, random_state=seed
    )
    return x_train, y_train, x_test, y_test


def write_train_shards(scans: np.ndarray, labels: np.ndarray, directory: Path,
                       samples_per_shard: int) -> tuple[str, int]:
    """Captioned shards with img2dataset keys; returns their file-name brace pattern and data_size."""
    rng = np.random.default_rng(0)

    def sample(key: str, i: int) -> dict:
        label = int(labels[i])
        return shard_sample(key, to_image(scans[i]), caption(label, rng), meta={"label": label})

    return write_shards(len(scans), sample, directory, samples_per_shard)


def write_test_folder(scans: np.ndarray, labels: np.ndarray, directory: Path) -> None:
    """digit_<word>/NNNN.png: an ImageFolder whose folder names make sensible zero-shot class names."""
    for label in range(len(WORDS)):
        (directory / class_folder(label)).mkdir(parents=True, exist_ok=True)
    for i, (scan, label) in enumerate(zip(scans, labels)):
        to_image(scan).save(directory / class_folder(int(label)) / f"{i:04d}.png")


def build_digits(out: str | Path, samples_per_shard: int = 500, test_size: int = 500, seed: int = 0) -> DemoData:
    """Build the digits data under `out` once (see `build_once`); the result has build_demo's type, so
    the two data sets are interchangeable for a caller."""
    def write(staging: Path) -> tuple[str, int, int]:
        x_train, y_train, x_test, y_test = load_split(test_size, seed)
        pattern, data_size = write_train_shards(x_train, y_train, staging / "train", samples_per_shard)
        write_test_folder(x_test, y_test, staging / "test")
        return pattern, data_size, len(x_train)

    settings = {"samples_per_shard": samples_per_shard, "test_size": test_size, "seed": seed}
    return build_once(out, MANIFEST, settings, write)


def main(argv: Sequence[str] | None = None) -> DemoData:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument("--samples-per-shard", type=int, default=500)
    parser.add_argument("--test-size", type=int, default=500, help="images held out for the zero-shot folder")
    parser.add_argument("--seed", type=int, default=0, help="seed of the stratified split")
    args = parser.parse_args(argv)
    data = build_digits(args.out, args.samples_per_shard, args.test_size, args.seed)
    print(json.dumps({**asdict(data), "test_dir": str(data.test_dir)}, indent=1))
    return data


if __name__ == "__main__":
    main()
