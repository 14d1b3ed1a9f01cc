"""CSV data (`--dataset-type csv`) on real image files: exact coverage over ranks, resume, bad input, training."""

from __future__ import annotations

import functools
import itertools
import json
import logging
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from conftest import SEED_COMMANDS, available, scaled, tiny_run
from fastclip.data import samples
from fastclip.data.csv import CsvTable
from fastclip.data.loader import build_csv_train_loader, build_csv_val_loader
from fastclip.data.samples import DataError
from fastclip.datasets.demo import FILES, caption, find_fashion_mnist, read_idx
from fastclip.models import register_model_configs
from test_data_position import BATCH, EPOCH, SEED, Counting, assert_same, augment, recorded, resumed
from training.main import main

ROWS = 192  # 2 ranks x 2 workers x 48 rows: 3 batches of 16 per slot (6 with one slot per rank)


@functools.cache
def fashion_mnist() -> tuple[np.ndarray, np.ndarray]:
    """The first ROWS Fashion-MNIST training images and labels."""
    images, labels = (read_idx(available(find_fashion_mnist) / name)[:ROWS] for name in FILES["train"])
    return images, labels


def write_csv(directory: Path, rows: int, separator: str = "\t", header: str = "filepath\ttitle") -> Path:
    """Fashion-MNIST pairs as image files (PNG and JPEG alternating) and a CSV of absolute paths and captions."""
    images, labels = (array[:rows] for array in fashion_mnist())
    rng = np.random.default_rng(0)
    directory.mkdir(parents=True, exist_ok=True)
    lines = [header]
    for row, (pixels, label) in enumerate(zip(images, labels)):
        path = directory / f"{row:05d}.{'png' if row % 2 else 'jpg'}"
        Image.fromarray(pixels).save(path)
        lines.append(separator.join([str(path), caption(int(label), rng)]))
    csv = directory / "pairs.csv"
    csv.write_text("\n".join(lines) + "\n")
    return csv


@pytest.fixture(scope="module")
def pairs_csv(tmp_path_factory) -> Path:
    return write_csv(tmp_path_factory.mktemp("csv"), ROWS)


@pytest.fixture(scope="module")
def table(pairs_csv) -> CsvTable:
    return CsvTable(pairs_csv)


@pytest.fixture(scope="module")
def tokenizer():
    register_model_configs()
    return open_clip.get_tokenizer("ViT-Tiny-32px")


def make_loader(table, tokenizer, *, workers=0, world_size=1, rank=0, num_samples=ROWS, preprocess=None):
    loader = build_csv_train_loader(table, preprocess or augment(), tokenizer, batch_size=BATCH,
                                    num_samples=num_samples, seed=SEED, rank=rank, world_size=world_size,
                                    workers=workers, data_size=len(table))
    loader.set_epoch(EPOCH)
    return loader


@pytest.mark.parametrize("workers", [0, 2])
def test_an_epoch_covers_every_row_once_over_two_ranks(table, tokenizer, workers):
    ranks = [list(make_loader(table, tokenizer, workers=workers, world_size=2, rank=rank)) for rank in (0, 1)]
    assert [len(batches) for batches in ranks] == [ROWS // (2 * BATCH)] * 2
    rows = [int(i) for batches in ranks for batch in batches for i in batch["index"]]
    assert sorted(rows) == list(range(ROWS))
    for batch in ranks[1]:  # each pair is its row: the caption tokens are those of the row's caption
        expected = tokenizer([table.captions(int(i))[0] for i in batch["index"]])
        assert torch.equal(batch["text"], expected)
    assert rows != sorted(rows)  # shuffled
    again = list(make_loader(table, tokenizer, workers=workers, world_size=2, rank=1))
    assert_same(again, ranks[1])  # deterministic from (seed, epoch)
    following = make_loader(table, tokenizer, workers=workers, world_size=2, rank=1)
    following.set_epoch(EPOCH + 1)
    assert [int(i) for b in following for i in b["index"]] != [int(i) for b in ranks[1] for i in b["index"]]


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_yields_exactly_the_remaining_batches(table, tokenizer, workers):
    """An epoch of two passes over the rows, cut before, inside and after the change of pass."""
    def make():
        return make_loader(table, tokenizer, workers=workers, world_size=2, rank=1, num_samples=2 * ROWS)

    full, states = recorded(make())
    crossing = next(i for i, state in enumerate(states) if any(slot[0] > 0 for slot in state["slots"])) - 1
    for cut in sorted({1, crossing, crossing + 1, len(full) - 1}):
        interrupted = make()
        head = list(itertools.islice(interrupted, cut))
        assert interrupted.state_dict() == states[cut]
        rest = resumed(make, states[cut])
        assert_same(head + list(rest), full)
        assert rest.state_dict() == states[-1]


def test_resume_opens_no_image_of_the_batches_before_it(pairs_csv, tokenizer):
    table = CsvTable(pairs_csv)  # its own table: `sample` is counted on this instance
    opened = Counting(table.sample)
    table.sample = opened
    preprocess = Counting(augment())

    def make():
        return make_loader(table, tokenizer, preprocess=preprocess)

    full, states = recorded(make())
    cut = len(full) // 2
    opened.calls = preprocess.calls = 0
    rest = list(resumed(make, states[cut]))
    assert_same(full[:cut] + rest, full)
    assert opened.calls == preprocess.calls == (len(full) - cut) * BATCH


def test_missing_column_names_the_file_the_key_the_columns_and_the_flag(tmp_path):
    renamed = write_csv(tmp_path / "renamed", 4, header="path\tcaption")
    with pytest.raises(DataError, match=r"has no column 'filepath' \(columns: \['path', 'caption'\].*--csv-img-key"):
        CsvTable(renamed)
    with pytest.raises(DataError, match=r"no column 'text'.*--csv-caption-key"):
        CsvTable(renamed, img_key="path", caption_key="text")
    assert len(CsvTable(renamed, img_key="path", caption_key="caption")) == 4
    commas = write_csv(tmp_path / "commas", 4, separator=",", header="filepath,title")
    with pytest.raises(DataError, match=r"columns: \['filepath,title'\].*--csv-separator"):
        CsvTable(commas)
    assert len(CsvTable(commas, separator=",")) == 4


def test_unusable_rows_are_counted_and_logged_skips(tmp_path, tokenizer, caplog):
    csv = write_csv(tmp_path, 35)
    lines = csv.read_text().splitlines()
    missing = lines[1 + 3].split("\t")[0]
    Path(missing).unlink()
    corrupt = lines[1 + 5].split("\t")[0]
    Path(corrupt).write_bytes(b"not an image")
    lines[1 + 8] = lines[1 + 8].split("\t")[0] + "\t"  # no caption
    csv.write_text("\n".join(lines) + "\n")
    table = CsvTable(csv)
    with caplog.at_level(logging.WARNING, logger=samples.__name__):
        batches = list(make_loader(table, tokenizer, num_samples=32))  # one pass: 32 usable rows
    rows = [int(i) for batch in batches for i in batch["index"]]
    assert sorted(rows) == sorted(set(range(35)) - {3, 5, 8})
    assert sum(batch["skipped"] for batch in batches) == 3
    assert f"CSV {csv}: skipped row 3 (image {missing}: FileNotFoundError: No such file or directory)" in caplog.text
    assert f"CSV {csv}: skipped row 5 (image {corrupt}: UnidentifiedImageError" in caplog.text
    assert f"CSV {csv}: skipped row 8 (empty caption)" in caplog.text


def test_relative_image_paths_start_in_the_working_directory(tmp_path, monkeypatch):
    """As in open_clip_train: the path is opened as written."""
    directory = tmp_path / "data"
    csv = write_csv(directory, 2)
    csv.write_text(csv.read_text().replace(str(directory) + "/", "data/"))
    monkeypatch.chdir(tmp_path)
    table = CsvTable(csv)
    assert table.images[0] == "data/00000.jpg" and table.sample(0, samples.SkipLog()) is not None
    monkeypatch.chdir(directory)
    skips = samples.SkipLog()
    assert table.sample(0, skips) is None and skips.take() == 1


def test_validation_covers_every_row_once_over_ranks_and_workers(table, tokenizer):
    preprocess = augment()
    orders = [int(i) for rank in (0, 1) for batch in
              build_csv_val_loader(table, preprocess, tokenizer, BATCH, workers=2, rank=rank, world_size=2)
              for i in batch["order"]]
    assert sorted(orders) == list(range(ROWS))


def without(argv: list[str], *flags: str) -> list[str]:
    """A command line without some flags and their values."""
    keep, skip = [], False
    for word in argv:
        if skip:
            skip = False
        elif word in flags:
            skip = True
        else:
            keep.append(word)
    return keep


@pytest.mark.parametrize("version", ["fastclip-v3", "openclip"])
def test_training_on_a_csv_defaults_to_its_rows_and_checkpoints(version, pairs_csv, demo_data, tmp_path):
    run = tiny_run(demo_data, tmp_path, version, epochs=1, batch_size=32)
    argv = without(scaled(SEED_COMMANDS[version], **{**run, "train_data": str(pairs_csv)}),
                   "--train-num-samples", "--data_size")
    metrics = main(argv + ["--val-data", str(pairs_csv)])  # .csv: --dataset-type auto reads it as csv
    run_dir = tmp_path / version
    assert [p.name for p in (run_dir / "checkpoints").glob("*.pt")] == ["epoch_1.pt"]
    saved = torch.load(run_dir / "checkpoints" / "epoch_1.pt", map_location="cpu", weights_only=True)
    assert saved["config"]["dataset_type"] == "csv"
    assert saved["config"]["train_num_samples"] == saved["config"]["data_size"] == ROWS
    assert saved["step"] == ROWS // 32
    assert metrics["num_samples"] == ROWS and 0 <= metrics["image_to_text_R@1"] <= 1
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1]["step"] == saved["step"] and steps[-1]["non_finite_steps"] == 0


def test_a_missing_column_stops_the_run_with_one_line(tmp_path, demo_data):
    renamed = write_csv(tmp_path / "renamed", 40, header="path\ttitle")
    run = tiny_run(demo_data, tmp_path, "renamed", epochs=1)
    argv = scaled(SEED_COMMANDS["openclip"], **{**run, "train_data": str(renamed), "dataset_type": "csv"})
    with pytest.raises(SystemExit) as stop:
        main(argv)
    message = str(stop.value.code)
    assert message.startswith(f"error: CSV {renamed} has no column 'filepath'") and "\n" not in message
    assert "--csv-img-key" in message
