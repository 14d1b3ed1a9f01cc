"""The data of a run from its flags: the training loader of this rank, its share of the validation set,
and the sizes that `auto` and a CSV leave open (`--train-num-samples`, `--data_size`)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Iterable

from fastclip.data.coverage import coverage_report
from fastclip.data.csv import CsvTable
from fastclip.data.index import ShardIndexError, build_index
from fastclip.data.loader import (
    TrainLoader,
    build_csv_train_loader,
    build_csv_val_loader,
    build_train_loader,
    build_val_loader,
)
from fastclip.data.samples import DataError
from fastclip.data.shards import expand_shards, local_path
from fastclip.datasets.synthetic import build_synthetic_loader
from fastclip.distributed import DistEnv, control
from fastclip.models import ModelBundle
from fastclip.train.optim import unwrap
from training.config import Config, DataConfig
from training.params import AUTO

logger = logging.getLogger("fastclip")


@dataclass
class DataBundle:
    train: TrainLoader | None  # set_epoch(e), then iterate: exactly len() batches on every rank
    val: Callable[[], Iterable[dict]] | None  # a fresh pass over this rank's share of the retrieval set
    train_subset: Callable[[], Iterable[dict]] | None = None  # the same over the first training pairs


def build_data(config: Config, env: DistEnv, bundle: ModelBundle, csv_table: CsvTable | None = None) -> DataBundle:
    """The training loader of this rank (webdataset, csv or synthetic) and its share of the validation set.

    `config` is settled (`settle_sizes`); `csv_table` is the --train-data CSV it read."""
    data, evaluation, seed = config.data, config.eval, config.run.seed
    pin = env.device.type == "cuda"
    common = dict(preprocess=bundle.preprocess_train, tokenizer=bundle.tokenizer, batch_size=data.batch_size,
                  seed=seed, rank=env.rank, world_size=env.world_size, workers=data.workers, pin_memory=pin)
    train = None
    if csv_table is not None:
        train = build_csv_train_loader(csv_table, num_samples=data.train_num_samples, data_size=data.data_size,
                                       **common)
    elif data.dataset_type == "webdataset" and data.train_data:
        try:
            train = build_train_loader(data.train_data, num_samples=data.train_num_samples, data_size=data.data_size,
                                       dataset_resampled=data.dataset_resampled,
                                       train_data_upsampling_factors=data.train_data_upsampling_factors,
                                       captions_per_line=data.captions_per_line, **common)
        except ValueError as error:
            raise SystemExit(f"error: {error}") from None
        if env.is_master and not data.dataset_resampled:
            warning = coverage_report(len(train.dataset.shards), env.world_size, data.workers, train.num_samples)
            if warning:
                logger.warning("%s", warning)
    elif data.dataset_type == "synthetic":
        size = unwrap(bundle.model).visual.image_size
        train = build_synthetic_loader(data.train_num_samples, image_size=size if isinstance(size, int) else size[0],
                                       **common)
    val = evaluation_set(config, env, bundle, evaluation.val_data, evaluation.val_num_samples)
    train_subset = evaluation_set(config, env, bundle, data.train_data, evaluation.train_eval_num_samples or None,
                                  csv_table) if evaluation.train_eval_num_samples else None
    return DataBundle(train, val, train_subset)


def evaluation_set(config: Config, env: DistEnv, bundle: ModelBundle, source: str | None, limit: int | None,
                   csv_table: CsvTable | None = None) -> Callable[[], Iterable[dict]] | None:
    """Fresh passes over this rank's share of the first `limit` pairs (all: None) of `source`, shards or a CSV,
    unshuffled and with the validation preprocessing; None without a source."""
    if not source:
        return None
    data = config.data
    table = (csv_table or read_csv(data, source)) if data.dataset_type == "csv" else None
    pin = env.device.type == "cuda"

    def passes() -> Iterable[dict]:
        shared = dict(workers=data.workers, pin_memory=pin, rank=env.rank, world_size=env.world_size, limit=limit)
        if table is not None:
            return build_csv_val_loader(table, bundle.preprocess_val, bundle.tokenizer, data.batch_size, **shared)
        return build_val_loader(source, bundle.preprocess_val, bundle.tokenizer, data.batch_size,
                                captions_per_line=data.captions_per_line, **shared)

    return passes


def read_csv(data: DataConfig, path: str) -> CsvTable:
    """The CSV `path` read with the --csv-* flags."""
    return CsvTable(path, data.csv_img_key, data.csv_caption_key, data.csv_separator)


_SIZE_FLAGS = {"train_num_samples": "--train-num-samples", "data_size": "--data_size"}


def settle_sizes(config: Config, env: DistEnv) -> tuple[Config, CsvTable | None]:
    """The sizes `auto` and a CSV leave open (`--train-num-samples`, `--data_size`), filled in; and the
    --train-data CSV, read here once per process (its rows are the sample indices)."""
    data = config.data
    if data.dataset_type == "csv" and data.train_data and config.trains:
        table = read_csv(data, data.train_data)
        filled = {dest: len(table) for dest in _SIZE_FLAGS if getattr(data, dest) in (None, AUTO)}
        config = config.replace(**filled)
        logger.info("--train-data %s: %d rows; --train-num-samples %d, --data_size %d", data.train_data, len(table),
                    config.data.train_num_samples, config.data.data_size)
        return config, table
    return resolve_auto_sizes(config, env), None


def resolve_auto_sizes(config: Config, env: DistEnv) -> Config:
    """`--train-num-samples auto` / `--data_size auto`: the numbers from the index of the --train-data shards.

    Only rank 0 reads the index (its cache, or the shards' .json members where the cache is stale), so
    nothing proportional to the data set runs on every rank; the others receive the numbers or the error.
    """
    data = config.data
    wanted = [dest for dest in _SIZE_FLAGS if getattr(data, dest) == AUTO]
    if not wanted or data.dataset_type != "webdataset" or not config.trains:
        return config
    found = control.broadcast_from_master(_indexed_sizes(data) if env.is_master else None)
    if isinstance(found, str):
        raise SystemExit(found)
    logger.info("from the index of --train-data: %s", ", ".join(f"{_SIZE_FLAGS[d]} {found[d]}" for d in wanted))
    return config.replace(**{dest: found[dest] for dest in wanted})


def _indexed_sizes(data: DataConfig) -> dict[str, int] | str:
    """Rank 0: the sample count and data_size of --train-data, or the one-line error every rank raises."""
    try:
        remote = [url for url in expand_shards(data.train_data) if local_path(url) is None]
        if remote:
            return (f"error: auto sizes need local shards, and {remote[0]} is remote (it would be read whole at "
                    "every start while the other ranks wait): run python -m fastclip.data.index on it once and "
                    "pass the --train-num-samples and --data_size it prints")
        report = build_index(data.train_data)
    except (DataError, ShardIndexError) as error:
        return f"error: --train-data: {error}"
    for note in report.notes:
        logger.info("index: %s", note)
    logger.info("--train-data: %d shards (%d read now, the others from the index cache), %d samples, keys %s..%s, "
                "%d of [0, %d) unused (%.1f%%), %d duplicate keys, %d samples without a key", report.shards,
                report.scanned, report.samples, report.min_key, report.max_key, report.missing_keys,
                report.data_size, 100 * report.missing_fraction, report.duplicates, report.without_key)
    if report.samples == 0:
        return f"error: the --train-data shards {data.train_data!r} hold no sample: nothing to count for auto"
    if data.data_size == AUTO and report.without_key:
        return (f"error: --data_size auto: {report.without_key} samples of --train-data have no non-negative "
                "integer 'key' in their .json, and FastCLIP keeps state per key: rewrite those shards with "
                "img2dataset's .json "
                "(python -m fastclip.data.index shows the counts)")
    if report.duplicates:
        logger.warning("%d samples of --train-data share their key with another (e.g. %s): such samples share "
                       "one row of FastCLIP's per-sample state", report.duplicates, report.duplicate_examples[:2])
    return {"train_num_samples": report.samples, "data_size": report.data_size}
