"""open_clip_train users' flags in real training runs on real shards: resampled data, the coverage
warning, the logs (v2's temperature spread, tensorboard's train/ tags), --log-local and --remote-sync."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch

from conftest import SEED_COMMANDS, scaled, tiny_run
from fastclip.run.log import setup_logging
from training.main import main


def records(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_uneven_shards_warn_with_the_share_an_epoch_sees(demo_data, tmp_path):
    """4 shards over 1 rank x 3 workers: one worker reads 2 shards while the others reread theirs."""
    main(scaled(SEED_COMMANDS["openclip"], **{**tiny_run(demo_data, tmp_path, "uneven", epochs=1), "workers": 3}))
    log = (tmp_path / "uneven" / "out.log").read_text()
    assert "4 shards over 1 rank x 3 workers = 3 worker slots" in log
    assert "distinct samples" in log and "--dataset-resampled" in log
    main(scaled(SEED_COMMANDS["openclip"], **{**tiny_run(demo_data, tmp_path, "even", epochs=1), "workers": 2}))
    assert "worker slots" not in (tmp_path / "even" / "out.log").read_text()


def test_resampled_fastclip_v2_run_logs_its_temperature_spread(demo_data, tmp_path):
    """--dataset-resampled with FastCLIP-v2: pairs drawn twice are fine; the log shows the per-sample taus'
    min / median / max and the share at the floor, and no frozen logit scale; tensorboard has train/ tags."""
    run = tiny_run(demo_data, tmp_path, "v2", epochs=2)
    main([*scaled(SEED_COMMANDS["fastclip-v2"], **run, report_to="tensorboard"), "--dataset-resampled"])
    run_dir = tmp_path / "v2"
    logged = records(run_dir)
    for r in logged:
        assert 0.01 - 1e-6 <= r["tau_min"] <= r["tau_median"] <= r["tau_max"] and 0 <= r["tau_at_floor"] <= 1
        assert "logit_scale" not in r
    # this tiny run drives the per-sample temperatures from 0.03 to the floor: the log shows it
    assert logged[0]["tau_at_floor"] == 0 and logged[-1]["tau_at_floor"] > 0.5
    log = (run_dir / "out.log").read_text()
    assert "tau_median" in log and "Logit Scale" not in log
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = EventAccumulator(str(run_dir / "tensorboard"))
    board.Reload()
    tags = set(board.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/tau_median", "train/tau_at_floor", "train/samples_per_second",
            "train/samples_per_second_per_gpu"} <= tags
    assert all(tag.startswith("train/") for tag in tags)


def test_a_resumed_run_continues_the_same_wandb_run(demo_data, tmp_path, monkeypatch):
    """wandb in offline mode (no network): a run stopped after epoch 1 and its --resume latest log to one
    wandb run, whose id is kept in the run folder (open_clip_train resumes its wandb run the same way)."""
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tiny_run(demo_data, tmp_path, "tracked", epochs=2)
    main([*scaled(SEED_COMMANDS["fastclip-v3"], **run, report_to="wandb"), "--stop_epochs", "1"])
    run_dir = tmp_path / "tracked"
    run_id = (run_dir / "wandb_id.txt").read_text().strip()
    main([*scaled(SEED_COMMANDS["fastclip-v3"], **run, report_to="wandb"), "--resume", "latest"])
    assert (run_dir / "wandb_id.txt").read_text().strip() == run_id
    offline = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 2 and all(folder.name.endswith(f"-{run_id}") for folder in offline)


def test_openclip_run_shows_its_learnable_logit_scale_as_open_clip_tags_it(demo_data, tmp_path):
    main(scaled(SEED_COMMANDS["openclip"], **tiny_run(demo_data, tmp_path, "openclip", epochs=1),
                report_to="tensorboard"))
    assert "logit_scale" in records(tmp_path / "openclip")[-1]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = EventAccumulator(str(tmp_path / "openclip" / "tensorboard"))
    board.Reload()
    assert "train/scale" in board.Tags()["scalars"]


def test_log_local_makes_the_first_rank_of_each_node_log(tmp_path):
    logger = setup_logging(tmp_path / "out.log", rank=4, local_rank=0, log_local=True)
    logger.info("from node 1")
    setup_logging(tmp_path / "out.log", rank=5, local_rank=1, log_local=True).info("from rank 5")
    setup_logging(tmp_path / "out.log", rank=4, local_rank=0).info("not without --log-local")
    for handler in logging.getLogger("fastclip").handlers:
        handler.close()
    assert (tmp_path / "out-4.log").read_text().count("rank 4 | INFO | from node 1") == 1
    assert not (tmp_path / "out-5.log").exists() and not (tmp_path / "out.log").exists()


def test_remote_sync_lets_a_run_continue_on_a_fresh_disk(demo_data, tmp_path):
    """Epoch 1 mirrored to a "remote" folder; the local disk is lost; --resume latest fetches the
    checkpoint (with its per-sample state) and epoch 2 continues from it."""
    remote, logs = tmp_path / "bucket", tmp_path / "logs"
    remote.mkdir()
    sync = dict(remote_sync=str(remote), remote_sync_protocol="fsspec", remote_sync_frequency="1")
    command = scaled(SEED_COMMANDS["fastclip-v3"], **tiny_run(demo_data, logs, "v3", epochs=2), **sync)
    main([*command, "--stop_epochs", "1"])
    mirrored = remote / "v3"
    assert (mirrored / "checkpoints" / "epoch_1.pt").is_file() and (mirrored / "params.json").is_file()
    assert any(p.name.startswith("epoch_1.per_sample") for p in (mirrored / "checkpoints").iterdir())
    shutil.rmtree(logs)
    main([*command, "--resume", "latest"])
    log = (logs / "v3" / "out.log").read_text()
    assert "fetched 1 checkpoints" in log and "resumed from" in log and "at epoch 1" in log
    assert (mirrored / "checkpoints" / "epoch_2.pt").is_file()  # the last sync ran at the end
    weights = torch.load(mirrored / "checkpoints" / "epoch_2.pt", weights_only=True)["epoch"]
    assert weights == 2


def test_remote_sync_that_cannot_work_stops_at_start(demo_data, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", "")
    command = scaled(SEED_COMMANDS["openclip"], **tiny_run(demo_data, tmp_path, "s3", epochs=1),
                     remote_sync="s3://bucket/runs")
    with pytest.raises(SystemExit, match="error: --remote-sync: .*aws"):
        main(command)
