"""The shard index on real tars: counts, gaps and duplicates against the keys written, the cache, `auto`
sizes resolved by rank 0 of a real gloo group, and img2dataset's own shards through a FastCLIP-v3 run."""

from __future__ import annotations

import csv
import gzip
import json
import math
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import SEED_COMMANDS, available, scaled
from fastclip.checkpoint.sharded import MANIFEST
from fastclip.data import index
from fastclip.data.index import ShardIndexError, build_index
from fastclip.datasets.writer import encode_image, shard_sample, write_shard
from multiprocess import spawn

REPO = Path(__file__).resolve().parents[1]
IMAGE = encode_image(np.zeros((4, 4, 3), dtype=np.uint8))
Keys = list[int | None]  # per sample: its json key, or None for a sample without a .json


def write_keys(path: Path, keys: list[int | None]) -> Path:
    """A shard with one sample per entry of `keys`, the key written as img2dataset does ('000000123')."""

    def sample(position: int, key: int | None) -> dict:
        if key is None:
            return {"__key__": f"nojson{position:05d}", "png": IMAGE, "txt": "a sample without a .json"}
        return {**shard_sample(f"{key:09d}", IMAGE, f"caption {key}"), "__key__": f"s{position:05d}"}

    path.parent.mkdir(parents=True, exist_ok=True)
    write_shard(path, (sample(i, k) for i, k in enumerate(keys)))
    return path


def write_set(directory: Path, shards: list[Keys]) -> str:
    for i, keys in enumerate(shards):
        write_keys(directory / f"{i:05d}.tar", keys)
    return f"{directory}/{{00000..{len(shards) - 1:05d}}}.tar"


def brute_force(shards: list[Keys]) -> dict:
    """What the index must report, from the keys as written (Python sets: fine at test sizes)."""
    keys = [k for shard in shards for k in shard if k is not None]
    unique = set(keys)
    data_size = max(keys) + 1
    missing = [k for k in range(data_size) if k not in unique]
    return dict(
        shards=len(shards), samples=sum(len(s) for s in shards), without_key=sum(k is None for s in shards for k in s),
        min_key=min(keys), max_key=max(keys), unique_keys=len(unique), duplicates=len(keys) - len(unique),
        data_size=data_size, missing_keys=len(missing),
        gaps=sum(1 for i, k in enumerate(missing) if i == 0 or missing[i - 1] != k - 1),
    )


def assert_matches(report: index.IndexReport, shards: list[Keys]) -> None:
    expected = brute_force(shards)
    assert {name: report.to_dict()[name] for name in expected} == expected
    names = {f"{i:05d}.tar": shard for i, shard in enumerate(shards)}
    duplicated = {k for shard in shards for k in shard if k is not None and sum(s.count(k) for s in shards) > 1}
    assert bool(report.duplicate_examples) == bool(duplicated)
    for example in report.duplicate_examples:
        assert example["key"] in duplicated
        holders = [names[Path(url).name] for url in example["shards"]]
        assert all(example["key"] in keys for keys in holders)
        assert len(holders) > 1 or holders[0].count(example["key"]) > 1


HAND_MADE = [
    [0, 1, 2, 2, 4, None],  # a duplicate inside the shard, a gap (3), a sample without a .json
    [4, 7, 8],  # overlaps the first shard's range and repeats its key 4
    [20, 21, 21, 23],  # a separate range: the gap 9..19 between shards, 22 inside
]


def random_shards(seed: int) -> list[Keys]:
    """Shards with overlapping random key ranges, duplicates within and across shards, and keyless samples."""
    rng = np.random.default_rng(seed)
    shards = []
    for _ in range(6):
        start = int(rng.integers(0, 60))
        keys: Keys = [int(k) for k in rng.integers(start, start + 25, size=int(rng.integers(1, 15)))]
        keys += [None] * int(rng.integers(0, 2))
        shards.append([keys[i] for i in rng.permutation(len(keys))])
    return shards


@pytest.mark.parametrize("shards", [HAND_MADE, random_shards(0), random_shards(1)], ids=["hand-made", "random0", "random1"])
def test_counts_gaps_and_duplicates_match_the_keys_written(shards, tmp_path):
    report = build_index(write_set(tmp_path, shards), workers=1)
    assert_matches(report, shards)
    assert report.overlapping > 0  # every set here has shards whose key ranges overlap
    assert report.missing_fraction == pytest.approx(report.missing_keys / report.data_size)


def test_overlapping_shards_are_merged_in_bounded_buckets(tmp_path, monkeypatch):
    """With buckets of a few keys, the cross-shard merge runs bucket by bucket and finds the same union."""
    shards = random_shards(2)
    pattern = write_set(tmp_path, shards)
    monkeypatch.setattr(index, "BUCKET_KEYS", 4)
    assert_matches(build_index(pattern, workers=2), shards)


def test_disjoint_key_ranges_need_no_second_reading(tmp_path):
    """img2dataset's layout (shard s holds keys from s * 10^k on): no shard is read a second time."""
    shards = [[s * 100 + i for i in range(0, 90, 3)] for s in range(4)]
    report = build_index(write_set(tmp_path, shards), workers=1)
    assert report.overlapping == 0
    assert_matches(report, shards)


def _bytes_read() -> int:
    return int(dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())["rchar"])


def test_local_tars_are_indexed_without_reading_image_bytes(tmp_path):
    images = 6 * [os.urandom(1 << 20)]  # never decoded: only their size matters
    samples = ({**shard_sample(f"{k:09d}", image, "caption", extension="jpg"), "__key__": f"{k:09d}"}
               for k, image in enumerate(images))
    write_shard(tmp_path / "00000.tar", samples)
    before = _bytes_read()
    report = build_index(f"{tmp_path}/00000.tar", workers=1)
    assert _bytes_read() - before < (1 << 20)  # the headers, the .json members and the cache, not 6 MiB of images
    assert report.samples == 6 and report.streamed == 0


def test_second_run_reads_the_cache_and_a_changed_shard_is_read_again(tmp_path):
    shards = [[0, 1, 2], [10, 11], [20, 22]]
    pattern = write_set(tmp_path, shards)
    first = build_index(pattern, workers=1)
    assert first.scanned == 3 and first.cache_files == [str(tmp_path / index.INDEX_FILE)]
    again = build_index(pattern, workers=1)
    assert again.scanned == 0
    assert {**again.to_dict(), "scanned": 3} == first.to_dict()

    shards[1] = [10, 11, 12, 14, None]
    write_keys(tmp_path / "00001.tar", shards[1])
    changed = build_index(pattern, workers=1)
    assert changed.scanned == 1
    assert_matches(changed, shards)
    assert build_index(pattern, workers=1, refresh=True).scanned == 3


def test_unwritable_shard_folder_caches_under_the_home_cache(tmp_path, monkeypatch):
    shards = [[0, 1], [5, 6]]
    pattern = write_set(tmp_path / "shards", shards)
    (tmp_path / "shards" / index.INDEX_FILE).mkdir()  # the cache file cannot be written there
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "home-cache"))
    first = build_index(pattern, workers=1)
    [cache_file] = first.cache_files
    assert Path(cache_file).is_file() and Path(cache_file).is_relative_to(tmp_path / "home-cache" / "fastclip")
    assert any("not writable" in note and cache_file in note for note in first.notes)
    again = build_index(pattern, workers=1)
    assert again.scanned == 0 and again.cache_files == [cache_file]
    assert_matches(again, shards)


def test_compressed_shards_are_streamed(tmp_path):
    shards = [[0, 1, 2, None], [3, 5]]
    plain = build_index(write_set(tmp_path / "plain", shards), workers=1)
    for i in range(len(shards)):
        source = tmp_path / "plain" / f"{i:05d}.tar"
        (tmp_path / "gz" / f"{i:05d}.tar.gz").parent.mkdir(exist_ok=True)
        (tmp_path / "gz" / f"{i:05d}.tar.gz").write_bytes(gzip.compress(source.read_bytes()))
    streamed = build_index(f"{tmp_path}/gz/{{00000..00001}}.tar.gz", workers=1)
    assert streamed.streamed == 2 and plain.streamed == 0
    assert_matches(streamed, shards)


def test_command_line_prints_a_table_or_json(tmp_path, capsys):
    shards = [[0, 1, 3], [10, 11, None], [12, 12]]
    pattern = write_set(tmp_path, shards)
    index.main([pattern, "--json", "--workers", "2"])  # a real process pool
    printed = json.loads(capsys.readouterr().out)
    assert {k: printed[k] for k in brute_force(shards)} == brute_force(shards)
    index.main([pattern])
    table = capsys.readouterr().out
    expected = brute_force(shards)
    assert f"--data_size            {expected['data_size']}" in table
    assert f"--train-num-samples {expected['samples']}" in table
    assert f"e.g. key 12 in {tmp_path}/00002.tar" in table


def test_pattern_matching_nothing_is_a_one_line_error(tmp_path):
    with pytest.raises(SystemExit) as stop:
        index.main([f"{tmp_path}/{{00000..00003}}.tar"])
    message = str(stop.value.code)
    assert message.startswith("error: no shard file matches") and str(tmp_path) in message and "\n" not in message


def _last_member_end(path: Path) -> int:
    with tarfile.open(path) as tar:
        last = tar.getmembers()[-1]
    return last.offset_data + math.ceil(last.size / tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE


@pytest.mark.parametrize("cut", ["inside a member", "before the end marker", "garbage header"])
def test_damaged_shard_is_an_error_naming_it(cut, tmp_path):
    pattern = write_set(tmp_path, [[0, 1, 2], [3, 4, 5]])
    damaged = tmp_path / "00001.tar"
    data = damaged.read_bytes()
    end = _last_member_end(damaged)
    damaged.write_bytes({"inside a member": data[: end - 700], "before the end marker": data[:end],
                         "garbage header": data[:end] + b"\x01" * 512 + bytes(2048)}[cut])
    with pytest.raises(ShardIndexError, match=f"shard {damaged}"):
        build_index(pattern, workers=1)
    with pytest.raises(SystemExit) as stop:
        index.main([pattern])
    assert str(stop.value.code).startswith(f"error: shard {damaged}")


# ------------------------------------------------------------------------------- --... auto in training


def _resolve_on_rank(pattern: str, keyless_pattern: str, out: str) -> None:
    """On each gloo rank: resolve `auto` once for good shards, once for shards lacking keys; record what
    the rank saw and how often it called the index."""
    import torch.distributed as dist

    from fastclip.distributed import DistEnv
    from training import data_setup
    from training.config import Config
    from training.params import parse_args

    calls = []
    real = data_setup.build_index

    def counted(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    data_setup.build_index = counted
    env = DistEnv(rank=dist.get_rank(), world_size=dist.get_world_size())
    flags = ["--train-num-samples", "auto", "--data_size", "auto", "--fastclip", "--model", "ViT-Tiny-32px"]
    config = data_setup.resolve_auto_sizes(Config.from_args(parse_args(["--train-data", pattern, *flags])), env)
    try:
        data_setup.resolve_auto_sizes(Config.from_args(parse_args(["--train-data", keyless_pattern, *flags])), env)
        error = None
    except SystemExit as stop:
        error = str(stop.code)
    record = {"calls": len(calls), "train_num_samples": config.data.train_num_samples, "data_size": config.data.data_size,
              "error": error}
    Path(out, f"rank{env.rank}.json").write_text(json.dumps(record))


def test_two_ranks_resolve_auto_from_rank_0s_index(tmp_path):
    shards = [[0, 1, 2, 4], [10, 13]]
    pattern = write_set(tmp_path / "good", shards)
    keyless = write_set(tmp_path / "keyless", [[0, None]])
    spawn(2, _resolve_on_rank, pattern, keyless, str(tmp_path))
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    expected = brute_force(shards)
    assert [r["calls"] for r in ranks] == [2, 0]  # only rank 0 reads the index
    for record in ranks:
        assert (record["train_num_samples"], record["data_size"]) == (expected["samples"], expected["data_size"])
        assert record["error"].startswith("error: --data_size auto: 1 samples of --train-data have no non-negative integer 'key'")


def test_auto_flags_parse_and_synthetic_data_has_no_count():
    from training.params import AUTO, parse_args

    args = parse_args(["--train-data", "x.tar", "--train-num-samples", "auto", "--data_size", "auto", "--fastclip"])
    assert (args.train_num_samples, args.data_size) == (AUTO, AUTO)
    synthetic = parse_args(["--dataset-type", "synthetic", "--train-num-samples", "96", "--data_size", "auto",
                            "--fastclip"])
    assert synthetic.data_size == 96
    with pytest.raises(SystemExit, match="synthetic pairs have no count"):
        parse_args(["--dataset-type", "synthetic", "--train-num-samples", "auto"])
    with pytest.raises(SystemExit):
        parse_args(["--train-data", "x.tar", "--train-num-samples", "many"])


# --------------------------------------------------------------------------- img2dataset's own output

IMG2DATASET_PATH = Path(os.environ.get("FASTCLIP_IMG2DATASET_PATH", REPO / ".venv" / "img2dataset"))
IMAGES, PER_SHARD, MISSING = 30, 8, 5  # 4 shards of up to 8; download number 5 fails (no such file)


def _run_img2dataset(urls: Path, out: Path) -> subprocess.CompletedProcess:
    """img2dataset pins webdataset 0.2, so it is installed apart (pip install --target) and put behind the
    venv's packages on sys.path: it writes its shards with the venv's webdataset."""
    code = (f"import sys; sys.path.append({str(IMG2DATASET_PATH)!r}); from img2dataset import download; "
            f"download(url_list={str(urls)!r}, input_format='csv', url_col='url', caption_col='caption', "
            f"output_format='webdataset', output_folder={str(out)!r}, processes_count=1, thread_count=2, "
            f"number_sample_per_shard={PER_SHARD}, image_size=32, resize_mode='no', "
            "distributor='multiprocessing', enable_wandb=False)")
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)


@pytest.fixture(scope="session")
def img2dataset_shards(tmp_path_factory) -> Path:
    """Shards img2dataset downloads from file:// URLs of Fashion-MNIST PNGs, one URL pointing nowhere."""
    probe = subprocess.run([sys.executable, "-c", f"import sys; sys.path.append({str(IMG2DATASET_PATH)!r}); "
                            "import img2dataset"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"img2dataset cannot be imported from {IMG2DATASET_PATH} (set FASTCLIP_IMG2DATASET_PATH, or "
                    f"`pip install --target {IMG2DATASET_PATH} img2dataset`): {probe.stderr.strip()[-300:]}")
    from fastclip.datasets.demo import CLASS_NAMES, FILES, find_fashion_mnist, read_idx

    root = tmp_path_factory.mktemp("img2dataset")
    source = available(find_fashion_mnist)
    images, labels = (read_idx(source / name)[:IMAGES] for name in FILES["test"])
    (root / "images").mkdir()
    with open(root / "urls.csv", "w", newline="") as f:
        rows = csv.writer(f)
        rows.writerow(["url", "caption"])
        for i, (image, label) in enumerate(zip(images, labels)):
            path = root / "images" / f"{i}.png"
            Image.fromarray(image).save(path)
            rows.writerow([(path.with_name("absent.png") if i == MISSING else path).as_uri(),
                           f"a photo of a {CLASS_NAMES[label]}"])
    done = _run_img2dataset(root / "urls.csv", root / "shards")
    assert done.returncode == 0, done.stderr[-3000:]
    return root / "shards"


def _keys_read_whole(shards: list[Path]) -> list[list[int]]:
    """Every shard's keys, every member read with tarfile: an oracle independent of the index."""
    keys = []
    for shard in shards:
        with tarfile.open(shard) as tar:
            keys.append([int(json.load(tar.extractfile(m))["key"]) for m in tar if m.name.endswith(".json")])
    return keys


def test_index_of_img2dataset_shards(img2dataset_shards):
    tars = sorted(img2dataset_shards.glob("*.tar"))
    assert len(tars) == math.ceil(IMAGES / PER_SHARD)
    shards = _keys_read_whole(tars)
    assert sum(map(len, shards)) == IMAGES - 1  # the failed download left a gap
    report = build_index(f"{img2dataset_shards}/{{00000..{len(tars) - 1:05d}}}.tar")
    assert_matches(report, shards)
    assert report.missing_keys > 0 and report.duplicates == 0 and report.without_key == 0


def test_fastclip_v3_trains_on_img2dataset_shards_with_auto_sizes(img2dataset_shards, tmp_path):
    from training.main import main

    shutil.copytree(img2dataset_shards, tmp_path / "shards", ignore=shutil.ignore_patterns(index.INDEX_FILE))
    pattern = f"{tmp_path}/shards/{{00000..00003}}.tar"
    argv = scaled(SEED_COMMANDS["fastclip-v3"], train_data=pattern, train_num_samples="auto", data_size="auto",
                  warmup=1, batch_size=8, epochs=1, workers=0, model="ViT-Tiny-32px", name="auto",
                  logs_dir=str(tmp_path / "logs"), gamma_decay_epochs=1, log_every_n_steps=1)
    main(argv)
    report = build_index(pattern)
    assert report.scanned == 0  # the run read the shards and left their index beside them
    run_dir = tmp_path / "logs" / "auto"
    params = json.loads((run_dir / "params.json").read_text())
    assert (params["train_num_samples"], params["data_size"]) == (report.samples, report.data_size)
    [state] = (run_dir / "checkpoints").glob("epoch_1.per_sample.*")
    assert json.loads((state / MANIFEST).read_text())["data_size"] == report.data_size
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1]["step"] == math.ceil(report.samples / 8)
    assert all(math.isfinite(value) for step in steps for key, value in step.items() if "loss" in key)
