"""CSV data (`--dataset-type csv`): a table of image paths and captions, read once per process with pandas.

The format is open_clip_train's: a header row, one pair per row, the image path in the column
`--csv-img-key` (default "filepath"), the caption in `--csv-caption-key` (default "title"), columns
separated by `--csv-separator` (default a tab). As in open_clip_train, a path is opened as written: a
relative path starts in the working directory of the training process, not in the CSV's folder.

Index. A pair's index is its row number 0..rows-1 (the header does not count), so the per-sample
state needs data_size >= rows. Only the two columns are kept, as UTF-8 bytes in one buffer per column,
in shared memory: no Python object per row, and the DataLoader workers map the same pages (a pickled
shared tensor is a file descriptor). Images are read when their row comes up, never held.

Bad input. A CSV that cannot be read, or lacks one of the two columns, is a `DataError` naming the
file, the missing key, the columns it has and the flag that fixes it. A row whose image file is
missing or undecodable, or whose path or caption is empty, is a counted skip (logged with the CSV,
the row and the image path) like a bad sample in a shard.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

import numpy as np
import torch
from PIL import Image

from .samples import DataError, Sample, SkipLog, error_text, to_rgb

if TYPE_CHECKING:
    import pandas as pd


class StringColumn:
    """Strings in one UTF-8 buffer with offsets: memory close to the text itself, shared with the workers."""

    def __init__(self, values: Iterable[str]) -> None:
        encoded = [value.encode() for value in values]
        offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(value) for value in encoded], out=offsets[1:])
        buffer = np.frombuffer(b"".join(encoded), dtype=np.uint8).copy()
        self.offsets = torch.from_numpy(offsets).share_memory_()
        self.buffer = torch.from_numpy(buffer).share_memory_()

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, row: int) -> str:
        start, end = self.offsets[row:row + 2].tolist()
        return self.buffer[start:end].numpy().tobytes().decode()


class CsvTable:
    """The image paths and captions of a CSV file; `sample(row)` opens row `row`'s image."""

    def __init__(self, path: str | Path, img_key: str = "filepath", caption_key: str = "title",
                 separator: str = "\t") -> None:
        self.path = str(path)
        caption_keys = [key.strip() for key in caption_key.split(",") if key.strip()]
        frame = _read_columns(self.path, img_key, caption_keys, separator)
        self.images = StringColumn(frame[img_key])
        self.caption_columns = [StringColumn(frame[key]) for key in caption_keys]

    def __len__(self) -> int:
        return len(self.images)

    def captions(self, row: int) -> tuple[str, ...]:
        """Row `row`'s captions: one per caption column, a cell holding a JSON list of strings giving each."""
        found: list[str] = []
        for column in self.caption_columns:
            cell = column[row].strip()
            found += cell_captions(cell)
        return tuple(found)

    def sample(self, row: int, skips: SkipLog) -> Sample | None:
        """Row `row` as a `Sample` with index `row`, or None (a recorded skip) when it cannot be used."""
        image_path, captions = self.images[row], self.captions(row)
        if not image_path or not captions:
            skips.record(f"CSV {self.path}", f"row {row} (empty {'image path' if not image_path else 'caption'})")
            return None
        try:
            with Image.open(image_path) as image:
                rgb = to_rgb(image)
        except (OSError, ValueError, Image.DecompressionBombError) as error:
            skips.record(f"CSV {self.path}", f"row {row} (image {image_path}: {error_text(error)})")
            return None
        return Sample(rgb, captions, row)


def cell_captions(cell: str) -> list[str]:
    """A caption cell's captions: a JSON list of strings (e.g. '["a dog", "a brown dog"]') gives each, any
    other text is one caption."""
    if cell.startswith("["):
        try:
            listed = json.loads(cell)
        except ValueError:
            listed = None
        if isinstance(listed, list) and all(isinstance(c, str) for c in listed):
            return [c.strip() for c in listed if c.strip()]
    return [cell] if cell else []


def _read_columns(path: str, img_key: str, caption_keys: list[str], separator: str) -> pd.DataFrame:
    """The image and caption columns as strings (empty cells as ""), or a `DataError` that says which flag to fix."""
    import pandas as pd  # here, not at the top: only CSV runs pay for its import (0.15 s of every start)

    def read(**kwargs: object) -> pd.DataFrame:
        try:
            return pd.read_csv(path, sep=separator, dtype=str, keep_default_na=False, **kwargs)
        except (OSError, ValueError) as error:  # pandas' parser and decoding errors are ValueErrors
            raise DataError(f"CSV {path} cannot be read ({error_text(error)}): fix the file or --csv-separator "
                            f"(now {separator!r})") from error

    columns = list(read(nrows=0).columns)
    wanted = [(img_key, "--csv-img-key", "image paths")] + [(key, "--csv-caption-key", "captions") for key in caption_keys]
    for key, flag, holds in wanted:
        if key not in columns:
            raise DataError(f"CSV {path} has no column {key!r} (columns: {columns}, split at {separator!r}): set "
                            f"{flag} to the column of the {holds}, or --csv-separator to the file's separator")
    return read(usecols=[img_key, *caption_keys])
