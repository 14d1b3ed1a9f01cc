"""Unicode characters drawn in real fonts, each captioned with its own name: every pair is unique.

Fashion-MNIST and the digits have ten classes, so most in-batch negatives share the positive's caption.
Here every character is one pair: a 32x32 image (black on white, the glyph's ink centred, drawn at
24 px and scaled down only when it would not fit) and its lower-cased Unicode name, e.g. "latin small
letter a with acute". Each character is drawn once, in one training font: of the training fonts whose
character map has it, the one at its code point modulo their number (the next one when that glyph is
blank or the font's .notdef box), which spreads the characters over the fonts.

Training fonts: the Regular Noto fonts (fonts-noto-core), FreeSans, FreeSerif and FreeMono
(fonts-freefont-ttf), Unifont and Unifont Upper (fonts-unifont). The test split draws a fixed, seeded
sample of training characters in DejaVu Sans (fonts-dejavu-core), a font never used for training, so
retrieval on it (`--val-data`) measures whether a model learnt names from glyph shapes, not pixels.
Skipped: characters without a name in Python's Unicode database, names that only repeat the code point
("cjk unified ideograph-4e00"), controls, format characters, spaces, combining marks, and glyphs
without ink or identical to the font's .notdef.

    python -m fastclip.datasets.fonts --out data/fonts [--train-pairs N] [--test-pairs 2000] [--seed 0]
    python -m fastclip.datasets.fonts --check    # only whether the fonts are installed

Writes train/ and test/ shards (KEY.png, KEY.txt, KEY.json with "key", "codepoint" and "font") with
img2dataset's keys, and fonts.json: the settings, counts, fonts and skipped characters by reason. The
same arguments on the same fonts give the same files. Needs fontTools (`pip install fonttools`).
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing
import os
import unicodedata
from collections import Counter, deque
from concurrent.futures import ProcessPoolExecutor
from contextlib import closing
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .demo import build_manifest_once
from .packages import FONT_ROOT, FONTS, MissingData, install_hint
from .writer import encode_image, shard_sample, write_shards

# Debian package -> a file (under the font root) that it installs
PACKAGES = {package.name: package.marker.relative_to(FONT_ROOT).as_posix() for package in FONTS}
TEST_FONT = "truetype/dejavu/DejaVuSans.ttf"
IMAGE_SIZE = 32
FONT_SIZE = 24  # px per em: Latin capitals about 17 px high, most glyphs fit without scaling
MANIFEST = "fonts.json"
SKIPPED_CATEGORIES = {
    "Cc": "control, format or space", "Cf": "control, format or space", "Zs": "control, format or space",
    "Zl": "control, format or space", "Zp": "control, format or space",
    "Mn": "combining mark", "Me": "combining mark",
}
BLANK, NOTDEF = "blank glyph", ".notdef glyph"
CHUNK = 500  # characters per task of the process pool


class MissingFonts(MissingData):
    """Some of the Debian font packages are not installed; the message has the apt-get line."""


@dataclass(frozen=True)
class FontsData:
    train_shards: str  # brace pattern for --train-data
    data_size: int  # largest key + 1, for --data_size
    num_samples: int  # training pairs, for --train-num-samples
    test_shards: str  # brace pattern for --val-data
    test_samples: int
    train_fonts: dict[str, int]  # font file under the font root -> training pairs drawn in it
    test_font: str
    skipped: dict[str, int]  # reason -> characters of the training fonts' maps left out


def check_fonts(root: Path = FONT_ROOT) -> None:
    """Raise `MissingFonts` naming the packages whose files are missing under `root`."""
    missing = [package for package, path in PACKAGES.items() if not (root / path).is_file()]
    if missing:
        raise MissingFonts(f"fonts missing under {root}: Debian packages {', '.join(missing)} are not installed; "
                           f"install them with: {install_hint([p for p in FONTS if p.name in missing])}")


def training_fonts(root: Path = FONT_ROOT) -> list[str]:
    """The training fonts' files, relative to `root`, sorted (their order picks each character's font)."""
    noto = sorted(p.relative_to(root).as_posix() for p in (root / "truetype/noto").glob("*-Regular.ttf"))
    free = [f"truetype/freefont/Free{face}.ttf" for face in ("Sans", "Serif", "Mono")]
    unifont = ["opentype/unifont/unifont.otf", "opentype/unifont/unifont_upper.otf"]
    return sorted(path for path in noto + free + unifont if (root / path).is_file())


def character_map(path: Path) -> set[int]:
    from fontTools.ttLib import TTFont

    with TTFont(str(path), lazy=True) as font:
        return set(font.getBestCmap())


def caption(code_point: int) -> str:
    return unicodedata.name(chr(code_point)).lower()


def name_problem(code_point: int) -> str | None:
    """Why a character's name or category rules it out, or None."""
    name = unicodedata.name(chr(code_point), "")
    if not name:
        return "no name"
    if f"{code_point:04X}" in name.replace("-", " ").split():
        return "name repeats the code point"
    return SKIPPED_CATEGORIES.get(unicodedata.category(chr(code_point)))


# ---------------------------------------------------------------------------------------- drawing

Font = tuple[str, int]  # a font file and a code point it does not map (for its .notdef glyph)
# A task: (code point, its candidate training fonts in trying order, the test font or None).
Task = tuple[int, tuple[Font, ...], "Font | None"]
# Its outcome: (code point, training font file or why none draws it, PNG, test PNG or why not, or None).
Drawn = tuple[int, str, "bytes | None", "bytes | str | None"]


def unmapped_code_point(cmap: set[int]) -> int:
    """A code point the font does not map, so that it draws its .notdef glyph for it."""
    return next(cp for cp in range(0x10FFFD, 0, -1) if cp not in cmap)


@lru_cache(maxsize=None)
def _load(font: Font) -> tuple[ImageFont.FreeTypeFont, bytes]:
    """The font at FONT_SIZE (no shaping: one code point, one glyph) and the ink of its .notdef glyph."""
    path, unmapped = font
    loaded = ImageFont.truetype(path, FONT_SIZE, layout_engine=ImageFont.Layout.BASIC)
    return loaded, _ink(loaded, unmapped).tobytes()


def _ink(font: ImageFont.FreeTypeFont, code_point: int) -> Image.Image:
    """The glyph's ink, white on black, cropped to its bounding box (no ink: a 0x0 image)."""
    left, top, right, bottom = font.getbbox(chr(code_point))
    canvas = Image.new("L", (max(right - left, 1), max(bottom - top, 1)), 0)
    ImageDraw.Draw(canvas).text((-left, -top), chr(code_point), fill=255, font=font)
    box = canvas.getbbox()
    return canvas.crop(box) if box else Image.new("L", (0, 0))


def draw(font: Font, code_point: int) -> Image.Image | str:
    """The character in a font as a 32x32 image, black on white, its ink centred and scaled down only
    when it would not fit (sizes stay comparable: a small letter stays smaller than its capital); or
    why not (BLANK, NOTDEF)."""
    loaded, notdef = _load(font)
    ink = _ink(loaded, code_point)
    if ink.width == 0:
        return BLANK
    if ink.tobytes() == notdef:
        return NOTDEF
    if max(ink.size) > IMAGE_SIZE:
        scale = IMAGE_SIZE / max(ink.size)
        ink = ink.resize((max(1, round(ink.width * scale)), max(1, round(ink.height * scale))),
                         Image.Resampling.LANCZOS)
    image = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 255)
    image.paste(0, ((IMAGE_SIZE - ink.width) // 2, (IMAGE_SIZE - ink.height) // 2), mask=ink)  # black where the ink is
    return image


def draw_task(task: Task) -> Drawn:
    """The first candidate font that draws the character (else NOTDEF when one of them drew its .notdef,
    BLANK otherwise), and the character in the test font when one is given."""
    code_point, candidates, test_font = task
    reasons = set()
    for font in candidates:
        image = draw(font, code_point)
        if isinstance(image, str):
            reasons.add(image)
            continue
        test = None if test_font is None else draw(test_font, code_point)
        return code_point, font[0], encode_image(image), encode_image(test) if isinstance(test, Image.Image) else test
    return code_point, NOTDEF if NOTDEF in reasons else BLANK, None, None


def _draw_chunk(tasks: list[Task]) -> list[Drawn]:
    return [draw_task(task) for task in tasks]


def draw_all(tasks: Iterable[Task], processes: int) -> Iterator[Drawn]:
    """draw_task over `tasks`, in their order, in `processes` processes. At most two chunks per process
    are drawn ahead of the consumer, so closing the iterator early leaves the rest of `tasks` untouched.
    A drawing process that dies (the OOM killer, a crash in a font library) stops the build with
    BrokenProcessPool: a multiprocessing.Pool would replace it and wait for its lost chunk for ever."""
    tasks = iter(tasks)
    chunks = iter(lambda: list(itertools.islice(tasks, CHUNK)), [])
    if processes <= 1:
        for chunk in chunks:
            yield from _draw_chunk(chunk)
        return
    spawn = multiprocessing.get_context("spawn")  # not forked from a torch process
    with ProcessPoolExecutor(processes, mp_context=spawn) as pool:
        pending: deque = deque()
        try:
            for chunk in chunks:
                pending.append(pool.submit(_draw_chunk, chunk))
                if len(pending) > 2 * processes:
                    yield from pending.popleft().result()
            while pending:
                yield from pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()


# --------------------------------------------------------------------------------------- choosing


@dataclass
class Selection:
    train: list[tuple[int, str, bytes]]  # (code point, font file, PNG)
    test: list[tuple[int, bytes]]  # (code point, PNG in the test font)
    skipped: Counter  # reason -> characters of the training fonts' maps
    test_skipped: Counter  # reason -> test candidates the test font does not draw


def select(root: Path, fonts: Sequence[str], train_pairs: int | None, test_pairs: int, seed: int,
           processes: int) -> Selection:
    """The test characters (a seeded sample of those that both a training font and the test font draw),
    then the training characters: the test ones plus a seeded sample of the others (all of them when
    `train_pairs` is None). Characters are drawn in a seeded order until there are enough, so a small
    limit builds fast; the drawing-related skips count the characters drawn."""
    if train_pairs is not None and train_pairs < test_pairs:
        raise ValueError(f"--train-pairs {train_pairs} cannot hold the {test_pairs} test characters")
    maps = [character_map(root / font) for font in fonts]
    loaded = [(str(root / font), unmapped_code_point(cmap)) for font, cmap in zip(fonts, maps)]
    test_map = character_map(root / TEST_FONT)
    test_font = (str(root / TEST_FONT), unmapped_code_point(test_map))
    selection = Selection([], [], Counter(), Counter())
    eligible = []
    for code_point in sorted(set().union(*maps)):
        problem = name_problem(code_point)
        if problem:
            selection.skipped[problem] += 1
        else:
            eligible.append(code_point)
    order = [int(cp) for cp in np.random.default_rng(seed).permutation(eligible)]

    def task(code_point: int, test: bool) -> Task:
        candidates = [font for font, cmap in zip(loaded, maps) if code_point in cmap]
        start = code_point % len(candidates)  # spreads neighbouring characters over the fonts
        return code_point, tuple(candidates[start:] + candidates[:start]), test_font if test else None

    relative = {str(root / font): font for font in fonts}
    undrawn = set()
    with closing(draw_all((task(cp, True) for cp in order if cp in test_map), processes)) as drawn:
        for code_point, font, png, test_png in drawn:
            if png is None:
                selection.skipped[font] += 1
                undrawn.add(code_point)
            elif isinstance(test_png, bytes):
                selection.train.append((code_point, relative[font], png))
                selection.test.append((code_point, test_png))
                if len(selection.test) == test_pairs:
                    break
            else:
                selection.test_skipped[f"{test_png} in the test font"] += 1
    if len(selection.test) < test_pairs:
        raise ValueError(f"only {len(selection.test)} characters are drawn by both a training font and the test "
                         f"font, fewer than --test-pairs {test_pairs}")
    if len(selection.train) == train_pairs:
        return selection
    done = undrawn | {cp for cp, _ in selection.test}
    with closing(draw_all((task(cp, False) for cp in order if cp not in done), processes)) as drawn:
        for code_point, font, png, _ in drawn:
            if png is None:
                selection.skipped[font] += 1
                continue
            selection.train.append((code_point, relative[font], png))
            if len(selection.train) == train_pairs:
                break
    return selection


# ---------------------------------------------------------------------------------------- writing


def write_split(pairs: Sequence[tuple[int, str, bytes]], directory: Path, samples_per_shard: int) -> tuple[str, int]:
    """(code point, font, PNG) pairs as shards; returns their file-name brace pattern and data_size."""
    def sample(key: str, i: int) -> dict:
        code_point, font, png = pairs[i]
        return shard_sample(key, png, caption(code_point), meta={"codepoint": f"U+{code_point:04X}", "font": font})

    return write_shards(len(pairs), sample, directory, samples_per_shard)


def build_fonts(out: str | Path, train_pairs: int | None = None, test_pairs: int = 2000, samples_per_shard: int = 1000,
                seed: int = 0, processes: int | None = None, root: str | Path = FONT_ROOT) -> FontsData:
    """Build the fonts data under `out` once (see `build_manifest_once`): train/ and test/ shards, and
    fonts.json. `processes` (default: the usable cores) only changes the speed, not the files."""
    root = Path(root)
    check_fonts(root)
    if processes is None:
        processes = len(os.sched_getaffinity(0))

    def write(staging: Path) -> dict:
        fonts = training_fonts(root)
        selection = select(root, fonts, train_pairs, test_pairs, seed, processes)
        train = [selection.train[i] for i in np.random.default_rng(seed).permutation(len(selection.train))]
        train_pattern, data_size = write_split(train, staging / "train", samples_per_shard)
        test = [(cp, TEST_FONT, png) for cp, png in selection.test]
        test_pattern, _ = write_split(test, staging / "test", samples_per_shard)
        used = Counter(font for _, font, _ in train)
        return {"train_shards": f"train/{train_pattern}", "data_size": data_size, "num_samples": len(train),
                "test_shards": f"test/{test_pattern}", "test_samples": len(test),
                "train_fonts": {font: used[font] for font in fonts if used[font]}, "test_font": TEST_FONT,
                "skipped": dict(sorted(selection.skipped.items())),
                "test_skipped": dict(sorted(selection.test_skipped.items())),
                "unicode_version": unicodedata.unidata_version}

    settings = {"train_pairs": train_pairs, "test_pairs": test_pairs, "samples_per_shard": samples_per_shard,
                "seed": seed, "root": str(root.resolve()), "unicode_version": unicodedata.unidata_version}
    out = Path(out).resolve()
    result = build_manifest_once(out, MANIFEST, settings, write)
    return FontsData(str(out / result["train_shards"]), result["data_size"], result["num_samples"],
                     str(out / result["test_shards"]), result["test_samples"], result["train_fonts"],
                     result["test_font"], result["skipped"])


def main(argv: Sequence[str] | None = None) -> FontsData | None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="output directory")
    parser.add_argument("--check", action="store_true", help="only check that the fonts are installed")
    parser.add_argument("--train-pairs", type=int, default=None, help="training pairs (default: every character)")
    parser.add_argument("--test-pairs", type=int, default=2000, help="training characters drawn in the test font")
    parser.add_argument("--samples-per-shard", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0, help="seed of the test sample, training sample and order")
    parser.add_argument("--processes", type=int, default=None, help="drawing processes (default: usable cores)")
    parser.add_argument("--font-root", type=Path, default=FONT_ROOT)
    args = parser.parse_args(argv)
    try:
        check_fonts(args.font_root)
        if args.check:
            print(f"fonts: all of {', '.join(PACKAGES)} are installed")
            return None
        if args.out is None:
            parser.error("--out is required (or --check)")
        data = build_fonts(args.out, args.train_pairs, args.test_pairs, args.samples_per_shard, args.seed,
                           args.processes, args.font_root)
    except MissingFonts as error:
        raise SystemExit(f"error: {error}") from None
    print(json.dumps({**asdict(data), "train_fonts": f"{len(data.train_fonts)} fonts (see {MANIFEST})"}, indent=1))
    return data


if __name__ == "__main__":
    main()
