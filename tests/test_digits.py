"""The scikit-learn digits data set: img2dataset shards, a stratified fixed split, a zero-shot folder."""

from __future__ import annotations

import json
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("sklearn")

from sklearn.datasets import load_digits  # noqa: E402

from fastclip.datasets import digits  # noqa: E402


def read_samples(pattern: str) -> list[dict]:
    """(key, caption, label) of every sample in the shards, from the tar members themselves.

    The shards are globbed rather than read with fastclip's loader, which keeps torch out of this test.
    """
    samples = []
    for shard in sorted(Path(pattern).parent.glob("*.tar")):
        with tarfile.open(shard) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        for name, payload in members.items():
            if name.endswith(".json"):
                key = name[: -len(".json")]
                meta = json.loads(payload)
                assert {key + ".png", key + ".txt"} <= members.keys() and meta["key"] == key
                samples.append({"key": int(key), "caption": members[key + ".txt"].decode(), "label": meta["label"]})
    return samples


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits")
    return out, digits.main(["--out", str(out), "--samples-per-shard", "500", "--test-size", "500"])


def test_shards_hold_every_training_pair_with_img2dataset_keys_and_captions(built):
    _, data = built
    assert (data.num_samples, data.data_size) == (1297, 2297)  # keys shard*1000 + i: 0..499, 1000..1499, 2000..2296
    samples = read_samples(data.train_shards)
    assert sorted(s["key"] for s in samples) == [s * 1000 + i for s in range(3) for i in range(500 if s < 2 else 297)]
    for s in samples:
        assert digits.WORDS[s["label"]] in s["caption"] or str(s["label"]) in s["caption"]
    assert len({s["caption"] for s in samples if s["label"] == 7}) >= 5  # varied templates, not one string


def test_split_is_stratified_disjoint_and_fixed(built):
    out, data = built
    train_labels = Counter(s["label"] for s in read_samples(data.train_shards))
    test_counts = {d.name: len(list(d.iterdir())) for d in data.test_dir.iterdir()}
    assert sorted(test_counts) == sorted(digits.class_folder(label) for label in range(10))
    everything = Counter(load_digits().target.tolist())
    for label in range(10):
        held_out = test_counts[digits.class_folder(label)]
        assert train_labels[label] + held_out == everything[label]  # each scan in exactly one part
        assert abs(held_out - 500 * everything[label] / 1797) < 1.5  # stratified
    first, second = digits.load_split(500, seed=0), digits.load_split(500, seed=0)
    assert all(np.array_equal(a, b) for a, b in zip(first, second))


def test_test_images_are_32px_white_on_black(built):
    _, data = built
    image = np.asarray(Image.open(next((data.test_dir / "digit_seven").iterdir())))
    assert image.shape == (32, 32) and image.dtype == np.uint8
    assert np.median(image) < 32 and image.max() > 192  # dark background, bright strokes


def test_build_is_idempotent_and_new_settings_rebuild(built):
    out, data = built
    manifest = Path(out) / digits.MANIFEST
    stamp = manifest.stat().st_mtime_ns
    assert digits.build_digits(out, samples_per_shard=500, test_size=500) == data
    assert manifest.stat().st_mtime_ns == stamp
    rebuilt = digits.build_digits(out, samples_per_shard=1000, test_size=297)
    assert (rebuilt.num_samples, rebuilt.data_size) == (1500, 1500)
    assert sum(len(list(d.iterdir())) for d in rebuilt.test_dir.iterdir()) == 297
