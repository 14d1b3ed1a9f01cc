"""The fonts data set on the installed fonts: unique captions, a held-out test font, readable shards."""

from __future__ import annotations

import io
import json
import os
import tarfile
import unicodedata
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import numpy as np
import open_clip
import pytest
from PIL import Image

pytest.importorskip("fontTools")

from fastclip.data.loader import build_train_loader, build_val_loader  # noqa: E402
from fastclip.datasets import fonts  # noqa: E402
from fastclip.models import register_model_configs  # noqa: E402
from conftest import available  # noqa: E402

TRAIN, TEST = 300, 60

available(fonts.check_fonts)


def read_samples(pattern: str) -> list[dict]:
    """Every sample of the shards: key, caption, json and the decoded image, from the tar members."""
    samples = []
    for shard in sorted(Path(pattern).parent.glob("*.tar")):
        with tarfile.open(shard) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        for name in sorted(n for n in members if n.endswith(".json")):
            key = name[: -len(".json")]
            meta = json.loads(members[name])
            assert meta["key"] == key
            samples.append({"key": int(key), "caption": members[key + ".txt"].decode(), "meta": meta,
                            "image": Image.open(io.BytesIO(members[key + ".png"]))})
    return samples


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("fonts")
    data = fonts.build_fonts(out, train_pairs=TRAIN, test_pairs=TEST, samples_per_shard=100, processes=2)
    return out, data, read_samples(data.train_shards), read_samples(data.test_shards)


def test_counts_keys_and_manifest(built):
    out, data, train, test = built
    assert (data.num_samples, data.data_size, data.test_samples) == (TRAIN, TRAIN, TEST)
    assert sorted(s["key"] for s in train) == list(range(TRAIN))  # 100 per shard: dense img2dataset keys
    manifest = json.loads((out / fonts.MANIFEST).read_text())["result"]
    assert sum(manifest["train_fonts"].values()) == TRAIN and len(manifest["train_fonts"]) > 10
    assert manifest["skipped"]["name repeats the code point"] > 20_000  # CJK, Tangut, ... in Unifont and Noto


def test_every_training_caption_is_a_unique_unicode_name(built):
    _, _, train, _ = built
    captions = [s["caption"] for s in train]
    assert len(set(captions)) == len(captions)
    for s in train:
        code_point = int(s["meta"]["codepoint"][2:], 16)
        assert s["caption"] == unicodedata.name(chr(code_point)).lower()
        assert f"{code_point:04x}" not in s["caption"].replace("-", " ").split()
        assert unicodedata.category(chr(code_point)) not in fonts.SKIPPED_CATEGORIES


def test_name_rules():
    assert fonts.name_problem(0x4E00) == "name repeats the code point"  # cjk unified ideograph-4e00
    assert fonts.name_problem(0xF900) == "name repeats the code point"  # cjk compatibility ideograph-f900
    assert fonts.name_problem(0x1B170) == "name repeats the code point"  # nushu character-1b170
    assert fonts.name_problem(0x17000) == "no name"  # Python's database leaves Tangut ideographs unnamed
    assert fonts.name_problem(0x0301) == "combining mark"
    assert fonts.name_problem(0x0020) == fonts.name_problem(0x200B) == "control, format or space"
    assert fonts.name_problem(0xE000) == "no name"  # private use
    assert fonts.name_problem(ord("a")) is None and fonts.caption(ord("a")) == "latin small letter a"


def test_test_split_names_training_characters_in_a_font_never_trained_on(built):
    _, data, train, test = built
    assert {s["caption"] for s in test} <= {s["caption"] for s in train}
    assert len({s["caption"] for s in test}) == TEST
    assert {s["meta"]["font"] for s in test} == {data.test_font} == {fonts.TEST_FONT}
    assert data.test_font not in data.train_fonts and "dejavu" not in " ".join(data.train_fonts).lower()
    assert {s["meta"]["font"] for s in train} == set(data.train_fonts)


def test_images_are_32px_black_glyphs_on_white(built):
    _, _, train, test = built
    for s in train + test:
        pixels = np.asarray(s["image"])
        assert pixels.shape == (32, 32) and pixels.dtype == np.uint8
        assert pixels.min() < 100 and pixels.max() == 255, s["caption"]  # ink on a white background
    # the same character in a training font and in the test font are different images
    by_caption = {s["caption"]: np.asarray(s["image"]) for s in train}
    assert sum(np.array_equal(by_caption[s["caption"]], np.asarray(s["image"])) for s in test) < TEST // 10


def test_shards_read_back_through_the_loaders(built):
    _, data, _, _ = built
    register_model_configs()
    tokenizer = open_clip.get_tokenizer("ViT-Tiny-32px")
    preprocess = open_clip.image_transform(32, is_train=False)
    loader = build_train_loader(data.train_shards, preprocess, tokenizer, batch_size=50,
                                num_samples=data.num_samples, data_size=data.data_size)
    indices = [i for batch in loader for i in batch["index"].tolist()]
    assert sorted(indices) == list(range(TRAIN))
    batches = list(build_val_loader(data.test_shards, preprocess, tokenizer, batch_size=50))
    assert sum(len(b["image"]) for b in batches) == TEST
    assert batches[0]["image"].shape[1:] == (3, 32, 32) and sum(b["skipped"] for b in batches) == 0


def test_same_arguments_give_the_same_files(built, tmp_path):
    out, _, _, _ = built
    again = tmp_path / "again"
    fonts.build_fonts(again, train_pairs=TRAIN, test_pairs=TEST, samples_per_shard=100, processes=1)
    files = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    for name in files:
        assert (out / name).read_bytes() == (again / name).read_bytes(), name


class EndsTheProcessThatUnpicklesIt:
    def __reduce__(self):
        return os._exit, (3,)


def test_a_drawing_process_that_dies_stops_the_build_instead_of_waiting_for_ever():
    tasks = [(ord("a"), [EndsTheProcessThatUnpicklesIt()], None)]
    with pytest.raises(BrokenProcessPool):
        list(fonts.draw_all(tasks, processes=2))


def test_missing_fonts_name_the_packages_and_the_install_line(tmp_path, capsys):
    with pytest.raises(fonts.MissingFonts, match="apt-get install -y fonts-noto-core fonts-unifont"):
        fonts.build_fonts(tmp_path / "out", root=tmp_path)
    with pytest.raises(SystemExit, match="fonts-dejavu-core"):
        fonts.main(["--check", "--font-root", str(tmp_path)])
    assert not (tmp_path / "out").exists()
