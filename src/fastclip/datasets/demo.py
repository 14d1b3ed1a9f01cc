"""The embedded demo data set: Fashion-MNIST as img2dataset-style shards plus a zero-shot test folder.

The 60,000 training images become webdataset shards (KEY.png, KEY.txt, KEY.json) whose keys follow
img2dataset's sparse scheme, with captions made from the class name and varied templates; the 10,000
test images become an ImageFolder `test/<class name>/NNNNN.png` for zero-shot evaluation. The files
come from the Debian package dataset-fashion-mnist when installed, else from the official URLs
(downloaded once into a cache directory); where neither works, `MissingData` says how to install it.

    python -m fastclip.datasets.demo --out data/fashion-mnist [--samples-per-shard 2500] [--limit N]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import struct
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image

from .packages import FASHION_MNIST, FASHION_MNIST_DIR, MissingData, install_hint
from .writer import encode_image, shard_sample, write_shards

CLASS_NAMES = (
    "t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot",
)
TEMPLATES = (
    "a photo of {}.",
    "a black and white photo of {}.",
    "a low resolution picture of {}.",
    "a grayscale image of {}.",
    "a small photo of {}.",
    "a product photo of {}.",
    "a centered photo of {}.",
    "{} on a black background.",
    "a picture of {}, a fashion item.",
)
BASE_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
MANIFEST = "demo.json"


@dataclass(frozen=True)
class DemoData:
    train_shards: str  # brace pattern for --train-data
    data_size: int  # largest key + 1, for --data_size
    num_samples: int  # training pairs, for --train-num-samples
    test_dir: Path  # ImageFolder whose folder names are the class names


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "fastclip" / "fashion-mnist"


def _file_names() -> list[str]:
    return [name for pair in FILES.values() for name in pair]


def _has_files(directory: Path) -> bool:
    return all((directory / name).is_file() for name in _file_names())


def download(directory: Path, base_url: str = BASE_URL, timeout_s: float = 30.0) -> None:
    """Fetch the four .gz files into `directory` (each renamed into place once complete).

    Raises `MissingData`, one line naming the file, the error and the Debian package that avoids the download.
    """
    directory.mkdir(parents=True, exist_ok=True)
    for name in _file_names():
        if (directory / name).is_file():
            continue
        partial = directory / f"{name}.partial"
        try:
            with urllib.request.urlopen(base_url + name, timeout=timeout_s) as response, open(partial, "wb") as f:
                shutil.copyfileobj(response, f)
        except OSError as error:  # URLError, timeouts, refused connections, a full disk
            partial.unlink(missing_ok=True)
            reason = getattr(error, "reason", None) or error
            raise MissingData(
                f"Fashion-MNIST: {FASHION_MNIST.name} is not installed and downloading {base_url + name} failed "
                f"({reason}); install the package with: {install_hint([FASHION_MNIST])}") from None
        os.replace(partial, directory / name)


def find_fashion_mnist(source: Path | None = None, system_dir: Path = FASHION_MNIST_DIR,
                       base_url: str = BASE_URL) -> Path:
    """The directory with the four .gz files: `source`, the Debian package's, or the cache (downloaded
    into on first use)."""
    for directory in (source, system_dir, cache_dir()):
        if directory is not None and _has_files(directory):
            return directory
    if source is not None:
        raise MissingData(f"{source} lacks some of {_file_names()}")
    download(cache_dir(), base_url)
    return cache_dir()


def read_idx(path: Path) -> np.ndarray:
    """A gzipped IDX file (MNIST's format: big-endian header, uint8 payload) as an array."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    if data[:3] != b"\0\0\x08":
        raise ValueError(f"{path} is not a uint8 IDX file")
    ndim = data[3]
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _load(directory: Path, split: str, limit: int | None) -> tuple[np.ndarray, np.ndarray]:
    images, labels = FILES[split]
    return read_idx(directory / images)[:limit], read_idx(directory / labels)[:limit]


def caption(label: int, rng: np.random.Generator) -> str:
    """A caption for a class, with a random template so that captions are not one string per class."""
    name = CLASS_NAMES[label]
    article = "an" if name[0] in "aeiou" else "a"
    return TEMPLATES[rng.integers(len(TEMPLATES))].format(f"{article} {name}")


def write_train_shards(images: np.ndarray, labels: np.ndarray, directory: Path,
                       samples_per_shard: int) -> tuple[str, int]:
    """Captioned shards with img2dataset keys; returns their file-name brace pattern and data_size."""
    rng = np.random.default_rng(0)

    def sample(key: str, i: int) -> dict:
        label = int(labels[i])
        return shard_sample(key, encode_image(images[i]), caption(label, rng), meta={"label": label})

    return write_shards(len(images), sample, directory, samples_per_shard)


def write_test_folder(images: np.ndarray, labels: np.ndarray, directory: Path) -> None:
    """<class name>/NNNNN.png: an ImageFolder whose folder names are the class names."""
    for name in {CLASS_NAMES[label] for label in labels}:
        (directory / name).mkdir(parents=True, exist_ok=True)
    for i, (image, label) in enumerate(zip(images, labels)):
        Image.fromarray(image).save(directory / CLASS_NAMES[label] / f"{i:05d}.png")


def _clear_previous_build(out: Path, manifest: Path, settings: dict) -> dict | None:
    """The manifest's result when `out` holds a build with these settings; else make room for one."""
    if manifest.is_file():
        built = json.loads(manifest.read_text())
        if built["settings"] == settings:
            return built["result"]
        manifest.unlink()
        for part in ("train", "test"):  # ours: the manifest says so
            shutil.rmtree(out / part, ignore_errors=True)
    elif (out / "train").exists() or (out / "test").exists():
        raise FileExistsError(f"{out} holds a train/ or test/ this tool did not write: choose another --out")
    return None


def build_once(out: str | Path, manifest_name: str, settings: dict,
               write: Callable[[Path], tuple[str, int, int]]) -> DemoData:
    """Build a data set's train/ shards and test/ folder under `out` once; later calls with the same
    settings only read its manifest.

    `write(staging)` writes staging/train and staging/test and returns (shard pattern relative to
    train/, data_size, training pairs).
    """
    def staged(staging: Path) -> dict:
        pattern, data_size, num_samples = write(staging)
        return {"train_shards": f"train/{pattern}", "data_size": data_size, "num_samples": num_samples,
                "test_dir": "test"}

    out = Path(out).resolve()
    result = build_manifest_once(out, manifest_name, settings, staged)
    return DemoData(str(out / result["train_shards"]), result["data_size"], result["num_samples"],
                    out / result["test_dir"])


def build_manifest_once(out: str | Path, manifest_name: str, settings: dict,
                        write: Callable[[Path], dict]) -> dict:
    """`build_once` for any result: `write(staging)` writes staging/train and staging/test and returns
    the result (JSON, paths relative to `out`) that the manifest keeps and later calls return.

    Everything lands in a staging folder first, so an interrupted build leaves nothing that looks complete.
    """
    out = Path(out).resolve()
    manifest = out / manifest_name
    result = _clear_previous_build(out, manifest, settings)
    if result is None:
        staging = out / ".staging"
        shutil.rmtree(staging, ignore_errors=True)
        result = write(staging)
        for part in ("train", "test"):
            os.replace(staging / part, out / part)
        staging.rmdir()
        manifest.write_text(json.dumps({"settings": settings, "result": result}, indent=1))
    return result


def build_demo(out: str | Path, samples_per_shard: int = 2500, limit: int | None = None,
               source: Path | None = None) -> DemoData:
    """Build the demo data under `out` once (see `build_once`).

    `limit` keeps the first `limit` training and test images (for quick runs and tests).
    """
    def write(staging: Path) -> tuple[str, int, int]:
        directory = find_fashion_mnist(source)
        train_images, train_labels = _load(directory, "train", limit)
        pattern, data_size = write_train_shards(train_images, train_labels, staging / "train", samples_per_shard)
        write_test_folder(*_load(directory, "test", limit), staging / "test")
        return pattern, data_size, len(train_images)

    return build_once(out, MANIFEST, {"samples_per_shard": samples_per_shard, "limit": limit}, write)


def main(argv: Sequence[str] | None = None) -> DemoData:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument("--samples-per-shard", type=int, default=2500)
    parser.add_argument("--limit", type=int, default=None, help="keep only the first N train and test images")
    parser.add_argument("--source", type=Path, default=None, help="directory with the Fashion-MNIST .gz files")
    args = parser.parse_args(argv)
    try:
        demo = build_demo(args.out, args.samples_per_shard, args.limit, args.source)
    except MissingData as error:
        raise SystemExit(f"error: {error}") from None
    print(json.dumps({**asdict(demo), "test_dir": str(demo.test_dir)}, indent=1))
    return demo


if __name__ == "__main__":
    main()
