"""Data pipeline on real tar shards: equal steps per rank, exact coverage, reshuffling, bad input, demo."""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from fastclip.data.loader import build_train_loader, build_val_loader
from fastclip.data.samples import DataError, to_rgb
from fastclip.data.shards import expand_shards, shard_order, slot_assignment
from fastclip.datasets import demo
from fastclip.datasets.synthetic import build_synthetic_loader
from fastclip.datasets.writer import img2dataset_key, shard_sample, write_shard
from fastclip.models import register_model_configs

IMAGE_SIZE = 32


@pytest.fixture(scope="module")
def tokenizer():
    register_model_configs()
    return open_clip.get_tokenizer("ViT-Tiny-32px")


@pytest.fixture(scope="module")
def preprocess():
    return open_clip.image_transform(IMAGE_SIZE, is_train=False)


def _image(seed: int, mode: str = "RGB") -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (12, 12, 3), dtype=np.uint8)
    return Image.fromarray(pixels).convert(mode)


def make_shards(directory: Path, sizes: list[int], samples_per_shard: int | None = None) -> tuple[str, list[int]]:
    """Shards with img2dataset keys; returns the brace pattern and all keys."""
    directory.mkdir(parents=True, exist_ok=True)
    per_shard = samples_per_shard or max(sizes)
    keys = []
    for shard_id, size in enumerate(sizes):
        shard_keys = [img2dataset_key(shard_id, i, per_shard) for i in range(size)]
        write_shard(directory / f"{shard_id:05d}.tar",
                    (shard_sample(k, _image(int(k)), f"caption {int(k)}") for k in shard_keys))
        keys += [int(k) for k in shard_keys]
    return f"{directory}/{{00000..{len(sizes) - 1:05d}}}.tar", keys


def indices(loader) -> list[int]:
    return [i for batch in loader for i in batch["index"].tolist()]


def loader_for(pattern, preprocess, tokenizer, **kw):
    kw = {"batch_size": 5, "num_samples": 60, "data_size": 10_000, "shuffle_buffer": 4, **kw}
    return build_train_loader(pattern, preprocess, tokenizer, **kw)


# ------------------------------------------------------------------------------------------ shard lists


def test_brace_patterns_joined_with_double_colon(tmp_path):
    a, _ = make_shards(tmp_path / "a", [2, 2, 2])
    b, _ = make_shards(tmp_path / "b", [2])
    urls = expand_shards(f"{a}::{b}")
    assert [Path(u).parent.name for u in urls] == ["a", "a", "a", "b"]
    assert expand_shards([a, b]) == urls


def test_pattern_matching_no_file_is_an_error(tmp_path):
    with pytest.raises(DataError, match=r"no shard file matches .*nowhere/\{00000\.\.00003\}\.tar"):
        expand_shards(f"{tmp_path}/nowhere/{{00000..00003}}.tar")


def test_partly_missing_pattern_keeps_the_existing_shards(tmp_path, caplog):
    pattern, _ = make_shards(tmp_path, [2, 2])
    with caplog.at_level(logging.WARNING):
        urls = expand_shards(pattern.replace("00001", "00003"))
    assert len(urls) == 2 and "2 of 4 shards" in caplog.text


def test_slot_assignment_covers_every_shard_and_sample_once():
    shards = [f"s{i}" for i in range(3)]
    for num_slots in (1, 2, 3, 5, 8):
        plans = [slot_assignment(shards, s, num_slots) for s in range(num_slots)]
        covered = sorted((url, p) for plan in plans for url, part, parts in plan for p in range(part, 12, parts))
        assert covered == sorted((url, p) for url in shards for p in range(12))


# -------------------------------------------------------------------------------------- steps and coverage


@pytest.mark.parametrize("world_size,workers,sizes", [
    (2, 0, [7, 13, 9, 11, 5]),
    (3, 0, [7, 13, 9, 11, 5]),
    (2, 2, [7, 13, 9, 11, 5]),
    (3, 2, [17, 23]),  # fewer shards than the 6 slots
    (3, 0, [40]),  # one shard shared by three ranks
])
def test_every_rank_yields_the_same_number_of_full_batches(tmp_path, preprocess, tokenizer, world_size, workers,
                                                           sizes):
    pattern, _ = make_shards(tmp_path, sizes)
    expected = math.ceil(60 / (5 * world_size))
    for rank in range(world_size):
        loader = loader_for(pattern, preprocess, tokenizer, rank=rank, world_size=world_size, workers=workers)
        batches = list(loader)
        assert len(loader) == len(batches) == expected
        assert all(b["image"].shape == (5, 3, IMAGE_SIZE, IMAGE_SIZE) for b in batches)
        assert all(b["text"].shape == (5, 32) and b["index"].dtype == torch.int64 for b in batches)


@pytest.mark.parametrize("sizes,world_size,workers,batch_size", [
    ([10] * 6, 2, 0, 5),
    ([10] * 6, 3, 0, 4),
    ([5] * 12, 2, 2, 5),
    ([30, 30], 3, 2, 5),  # 2 shards, 6 slots: each shard split three ways
])
def test_one_epoch_over_all_ranks_sees_each_sample_once(tmp_path, preprocess, tokenizer, sizes, world_size, workers,
                                                        batch_size):
    pattern, keys = make_shards(tmp_path, sizes, samples_per_shard=100)
    for epoch in (0, 1):
        seen = []
        for rank in range(world_size):
            loader = loader_for(pattern, preprocess, tokenizer, batch_size=batch_size, num_samples=len(keys),
                                rank=rank, world_size=world_size, workers=workers, epoch=epoch)
            seen += indices(loader)
        assert sorted(seen) == sorted(keys)


def test_reshuffle_differs_between_epochs_and_repeats_for_the_same_epoch(tmp_path, preprocess, tokenizer):
    pattern, _ = make_shards(tmp_path, [6] * 8)
    shards = expand_shards(pattern)
    assert shard_order(shards, seed=1, epoch=0) == shard_order(shards, seed=1, epoch=0)
    assert shard_order(shards, seed=1, epoch=0) != shard_order(shards, seed=1, epoch=1)
    loader = loader_for(pattern, preprocess, tokenizer, num_samples=48, rank=1, world_size=2, workers=2, seed=1)
    first = indices(loader)
    assert indices(loader) == first  # position is a function of (seed, epoch, step)
    loader.set_epoch(1)
    assert set(indices(loader)) != set(first)


def test_workers_interleave_and_skip_count_is_zero_on_clean_data(tmp_path, preprocess, tokenizer):
    pattern, _ = make_shards(tmp_path, [10] * 4)
    batches = list(loader_for(pattern, preprocess, tokenizer, num_samples=40, workers=2))
    assert len(batches) == 8 and all(b["skipped"] == 0 for b in batches)


# ------------------------------------------------------------------------------------------- bad input


def _single_shard(tmp_path, samples) -> str:
    path = tmp_path / "00000.tar"
    write_shard(path, samples)
    return str(path)


def _val_batches(url, preprocess, tokenizer, **kw):
    return list(build_val_loader(url, preprocess, tokenizer, batch_size=100, **kw))


@pytest.mark.parametrize("workers", [0, 2])
def test_key_outside_data_size_is_an_error_naming_shard_and_key(tmp_path, preprocess, tokenizer, workers):
    url = _single_shard(tmp_path, [shard_sample(f"{k:05d}", _image(k), "c") for k in (1, 2, 999)])
    loader = loader_for(url, preprocess, tokenizer, data_size=500, num_samples=3, batch_size=1, workers=workers)
    with pytest.raises(DataError, match=r"00000\.tar, sample 00999: key 999 is outside \[0, data_size=500\)"):
        list(loader)


@pytest.mark.parametrize("meta", [{"key": None}, "drop-key", "drop-json"])
def test_sample_without_index_is_an_error_when_data_size_is_set(tmp_path, preprocess, tokenizer, meta):
    sample = shard_sample("00007", _image(7), "c")
    if meta == "drop-json":
        del sample["json"]
    elif meta == "drop-key":
        del sample["json"]["key"]
    else:
        sample["json"].update(meta)
    url = _single_shard(tmp_path, [sample])
    with pytest.raises(DataError, match=r"00000\.tar, sample 00007: no integer 'key'"):
        _val_batches(url, preprocess, tokenizer, data_size=100)


def test_missing_json_gives_index_minus_one_without_data_size(tmp_path, preprocess, tokenizer):
    sample = shard_sample("00007", _image(7), "c")
    del sample["json"]
    url = _single_shard(tmp_path, [sample, shard_sample("00008", _image(8), "c")])
    [batch] = _val_batches(url, preprocess, tokenizer)
    assert batch["index"].tolist() == [-1, 8]


def test_samples_without_text_or_image_or_decodable_image_are_counted_skips(tmp_path, preprocess, tokenizer,
                                                                            caplog):
    samples = [
        shard_sample("00001", _image(1), "ok"),
        shard_sample("00002", _image(2), None),
        shard_sample("00003", None, "no image"),
        shard_sample("00004", b"not an image at all", "broken"),
        shard_sample("00005", _image(5), "ok"),
    ]
    url = _single_shard(tmp_path, samples)
    with caplog.at_level(logging.WARNING):
        [batch] = _val_batches(url, preprocess, tokenizer, data_size=10)
    assert batch["index"].tolist() == [1, 5] and batch["skipped"] == 3
    for key, reason in (("00002", "no text"), ("00003", "no image"), ("00004", "undecodable")):
        assert f"sample {key} ({reason}" in caplog.text
    assert url in caplog.text


def test_skips_are_reported_with_the_next_training_batch(tmp_path, preprocess, tokenizer):
    samples = [shard_sample(f"{k:05d}", _image(k) if k % 3 else None, "c") for k in range(12)]
    url = _single_shard(tmp_path, samples)
    batches = list(loader_for(url, preprocess, tokenizer, num_samples=8, batch_size=4, shuffle_buffer=1))
    assert [b["index"].tolist() for b in batches] == [[1, 2, 4, 5], [7, 8, 10, 11]]
    assert [b["skipped"] for b in batches] == [2, 2]


def _cut_before(url: str, file_name: str, extra: int = 0) -> None:
    data = Path(url).read_bytes()
    Path(url).write_bytes(data[: data.index(file_name.encode()) + extra])


def test_truncated_tar_keeps_the_samples_before_the_cut(tmp_path, preprocess, tokenizer, caplog):
    url = _single_shard(tmp_path, [shard_sample(f"{k:05d}", _image(k), "c") for k in range(10)])
    _cut_before(url, "00006.json", extra=700)  # inside the first file of sample 6
    with caplog.at_level(logging.WARNING):
        [batch] = _val_batches(url, preprocess, tokenizer, data_size=10)
    assert batch["index"].tolist() == [0, 1, 2, 3, 4, 5] and batch["skipped"] == 1
    assert f"shard {url}: skipped everything after sample 00005 (truncated" in caplog.text


def test_tar_cut_at_a_header_boundary_is_detected(tmp_path, preprocess, tokenizer, caplog):
    """tarfile reads such a tar as complete; the missing end marker gives it away."""
    url = _single_shard(tmp_path, [shard_sample(f"{k:05d}", _image(k), "c") for k in range(10)])
    _cut_before(url, "00006.json")
    with caplog.at_level(logging.WARNING):
        [batch] = _val_batches(url, preprocess, tokenizer, data_size=10)
    # sample 5 may have lost files after its last one read, so it goes too
    assert batch["index"].tolist() == [0, 1, 2, 3, 4] and batch["skipped"] == 1
    assert f"shard {url}: skipped sample 00005 and everything after it (no tar end marker" in caplog.text


def test_corrupt_tar_header_keeps_the_samples_before_it(tmp_path, preprocess, tokenizer, caplog):
    url = _single_shard(tmp_path, [shard_sample(f"{k:05d}", _image(k), "c") for k in range(10)])
    data = bytearray(Path(url).read_bytes())
    header = data.index(b"00006.json")
    data[header + 148 : header + 156] = b"garbage!"  # the header checksum field
    Path(url).write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        [batch] = _val_batches(url, preprocess, tokenizer, data_size=10)
    assert batch["index"].tolist() in ([0, 1, 2, 3, 4], [0, 1, 2, 3, 4, 5]) and batch["skipped"] == 1
    assert f"shard {url}: skipped" in caplog.text


def test_tar_cut_inside_the_last_sample_drops_it(tmp_path, preprocess, tokenizer):
    url = _single_shard(tmp_path, [shard_sample(f"{k:05d}", _image(k), "c") for k in range(3)])
    _cut_before(url, "00002.txt")  # json and png of sample 2 survive, its caption is lost
    [batch] = _val_batches(url, preprocess, tokenizer, data_size=10)
    assert batch["index"].tolist() == [0, 1] and batch["skipped"] == 1


def test_training_on_a_truncated_shard_finishes(tmp_path, preprocess, tokenizer):
    pattern, _ = make_shards(tmp_path, [10, 10])
    second = Path(expand_shards(pattern)[1])
    second.write_bytes(second.read_bytes()[:3000])
    batches = list(loader_for(pattern, preprocess, tokenizer, num_samples=40, workers=2))
    assert len(batches) == 8 and sum(b["skipped"] for b in batches) >= 1


def test_shards_without_any_usable_sample_raise_instead_of_hanging(tmp_path, preprocess, tokenizer):
    url = _single_shard(tmp_path, [shard_sample(f"{k:05d}", _image(k), None) for k in range(3)])
    with pytest.raises(DataError, match="no usable sample"):
        list(loader_for(url, preprocess, tokenizer, num_samples=4, batch_size=2))


# ----------------------------------------------------------------------------------------- image modes


@pytest.mark.parametrize("mode,extension", [
    ("RGBA", "png"), ("LA", "png"), ("L", "png"), ("P", "png"), ("I;16", "png"), ("CMYK", "jpg"), ("RGB", "webp"),
])
def test_any_image_mode_becomes_an_rgb_batch(tmp_path, preprocess, tokenizer, mode, extension):
    url = _single_shard(tmp_path, [shard_sample(f"{k:05d}", _image(k, mode), "c", extension) for k in range(3)])
    [batch] = _val_batches(url, preprocess, tokenizer)
    assert batch["image"].shape == (3, 3, IMAGE_SIZE, IMAGE_SIZE) and batch["skipped"] == 0


def test_to_rgb_puts_transparency_on_white_and_scales_16_bit():
    clear = Image.new("RGBA", (2, 2), (0, 0, 0, 0))
    assert to_rgb(clear).getpixel((0, 0)) == (255, 255, 255)
    grey16 = Image.fromarray(np.full((2, 2), 32896, dtype=np.uint16))
    assert grey16.mode == "I;16" and to_rgb(grey16).getpixel((0, 0)) == (128, 128, 128)


# ---------------------------------------------------------------------------------- validation, synthetic


@pytest.mark.parametrize("workers", [0, 2])
def test_val_loader_yields_every_sample_once(tmp_path, preprocess, tokenizer, workers):
    pattern, keys = make_shards(tmp_path, [7, 3, 5])
    loader = build_val_loader(pattern, preprocess, tokenizer, batch_size=4, workers=workers, data_size=100)
    seen = indices(loader)
    assert sorted(seen) == keys and (workers or seen == keys)


def test_synthetic_loader_follows_the_step_rule_and_covers_indices(preprocess, tokenizer):
    seen = []
    for rank in range(2):
        loader = build_synthetic_loader(40, preprocess, tokenizer, batch_size=5, rank=rank, world_size=2,
                                        workers=2)
        batches = list(loader)
        assert len(loader) == len(batches) == 4
        assert batches[0]["image"].shape == (5, 3, IMAGE_SIZE, IMAGE_SIZE) and batches[0]["skipped"] == 0
        seen += indices(batches)
    assert sorted(seen) == list(range(40))


# ------------------------------------------------------------------------------------------------- demo


def test_demo_conversion_writes_sparse_keys_and_a_zero_shot_folder(tmp_path, preprocess, tokenizer, capsys,
                                                                    fashion_mnist_dir):
    data = demo.main(["--out", str(tmp_path), "--samples-per-shard", "30", "--limit", "100"])
    assert (data.num_samples, data.data_size) == (100, 310)  # keys shard*100 + i: 0..29, 100..129, ..., 300..309
    assert str(data.data_size) in capsys.readouterr().out
    val = build_val_loader(data.train_shards, preprocess, tokenizer, batch_size=64, data_size=data.data_size)
    keys = indices(val)
    assert keys == [s * 100 + i for s in range(4) for i in range(30 if s < 3 else 10)]
    classes = sorted(p.name for p in data.test_dir.iterdir())
    assert set(classes) <= set(demo.CLASS_NAMES) and "ankle boot" in classes
    assert sum(len(os.listdir(data.test_dir / c)) for c in classes) == 100
    manifest = tmp_path / demo.MANIFEST
    stamp = manifest.stat().st_mtime_ns
    assert demo.build_demo(tmp_path, samples_per_shard=30, limit=100) == data
    assert manifest.stat().st_mtime_ns == stamp  # second call reuses the build
    rebuilt = demo.build_demo(tmp_path, samples_per_shard=50, limit=100)  # new settings replace the build
    assert rebuilt.data_size == 150 and len(expand_shards(rebuilt.train_shards)) == 2
