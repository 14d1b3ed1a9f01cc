"""--remote-sync with a local folder as the remote: what goes up, in which order, what is deleted,
the background thread, restoring checkpoints on a fresh disk, and the one-line start-up errors."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import pytest
import torch

from fastclip.checkpoint import files, sharded
from fastclip.run.remote_sync import (FsspecStore, RemoteSync, check_remote, fetch_checkpoints, remote_run_dir)
from fastclip.run.lock import RunLock


def save_checkpoint(run: Path, stem: str, token: str | None, step: int = 1) -> Path:
    """A checkpoint as the Checkpointer lays it out: the per-sample folder complete, then the .pt."""
    folder = run / "checkpoints"
    state = None
    if token is not None:
        state = folder / f"{stem}.per_sample.{token}"
        state.mkdir(parents=True)
        (state / "rank00000-of-00001.bin").write_bytes(os.urandom(64))
        (state / sharded.MANIFEST).write_text('{"shards": []}')
    payload = {"epoch": 1, "step": step, "state_dict": {"w": torch.ones(4)},
               "per_sample_dir": None if state is None else state.name}
    files.save_atomic(payload, folder / f"{stem}.pt")
    files.remove_superseded_state(folder / f"{stem}.pt", keep=state)
    return folder / f"{stem}.pt"


def names(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


@pytest.fixture
def run(tmp_path: Path) -> Path:
    folder = tmp_path / "logs" / "myrun"
    folder.mkdir(parents=True)
    return folder


@pytest.fixture
def remote(tmp_path: Path) -> Path:
    return tmp_path / "bucket" / "myrun"


def syncer(run: Path, remote: Path, every_s: float = 300) -> RemoteSync:
    return RemoteSync.from_flags(run, str(remote.parent), "fsspec", every_s)


def test_remote_run_dir_is_remote_slash_name(run, remote):
    assert remote_run_dir("s3://b/x/", "myrun") == "s3://b/x/myrun"
    assert syncer(run, remote).remote == str(remote)


def test_sync_uploads_new_and_changed_files_but_not_temporaries_or_the_lock(run, remote):
    lock = RunLock(run)
    lock.acquire()
    (run / "out.log").write_text("one\n")
    (run / "tensorboard").mkdir()
    (run / "tensorboard" / "events").write_bytes(b"e")
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / f"epoch_1.pt{files.TMP_MARK}host-1").write_bytes(b"half a save")
    (run / "scratch.tmp").write_text("x")
    sync = syncer(run, remote)
    assert sync.sync()
    assert names(remote) == {"out.log", "tensorboard/events"}
    with open(run / "out.log", "a") as f:
        f.write("two\n")
    assert sync.sync()
    assert (remote / "out.log").read_text() == "one\ntwo\n"
    lock.release()


def test_checkpoint_goes_up_after_its_per_sample_folder(run, remote):
    order = []

    class Recording(FsspecStore):
        def put_file(self, handle, rel):
            order.append(rel)
            super().put_file(handle, rel)

    save_checkpoint(run, "epoch_1", "1-aa")
    sync = syncer(run, remote)
    sync.store = Recording(sync.remote)
    assert sync.sync()
    assert order == ["checkpoints/epoch_1.per_sample.1-aa/manifest.json",
                     "checkpoints/epoch_1.per_sample.1-aa/rank00000-of-00001.bin",
                     "checkpoints/epoch_1.pt"]
    assert files.peek(remote / "checkpoints" / "epoch_1.pt")["per_sample_dir"] == "epoch_1.per_sample.1-aa"


def test_interrupted_folder_upload_leaves_no_checkpoint_remotely(run, remote):
    save_checkpoint(run, "epoch_1", "1-aa")
    (remote / "checkpoints").mkdir(parents=True)
    (remote / "checkpoints" / "epoch_1.per_sample.1-aa").write_text("in the way")  # the folder cannot be made
    sync = syncer(run, remote)
    assert not sync.sync()
    assert not (remote / "checkpoints" / "epoch_1.pt").exists()
    (remote / "checkpoints" / "epoch_1.per_sample.1-aa").unlink()
    assert sync.sync()
    assert (remote / "checkpoints" / "epoch_1.pt").is_file()


def test_checkpoint_resaved_during_its_upload_waits_for_the_next_sync(run, remote):
    save_checkpoint(run, "epoch_latest", "1-aa", step=1)

    class ResaveDuringUpload(FsspecStore):
        def put_tree(self, local, rel, exclude):
            if rel.startswith("checkpoints/") and "1-aa" in rel:
                save_checkpoint(run, "epoch_latest", "2-bb", step=2)  # replaces the .pt, deletes 1-aa
            return super().put_tree(local, rel, exclude)

    sync = syncer(run, remote)
    sync.store = ResaveDuringUpload(sync.remote)
    assert sync.sync()
    assert not (remote / "checkpoints" / "epoch_latest.pt").exists()
    assert sync.sync()
    latest = remote / "checkpoints" / "epoch_latest.pt"
    assert files.peek(latest)["step"] == 2
    assert names(remote / "checkpoints") == {"epoch_latest.pt", "epoch_latest.per_sample.2-bb/manifest.json",
                                             "epoch_latest.per_sample.2-bb/rank00000-of-00001.bin"}


def test_resaved_checkpoint_of_the_same_size_replaces_the_remote_one_and_its_folder(run, remote):
    save_checkpoint(run, "epoch_latest", "1-aa", step=1)
    sync = syncer(run, remote)
    assert sync.sync()
    save_checkpoint(run, "epoch_latest", "2-bb", step=2)
    assert sync.sync()
    checkpoints = remote / "checkpoints"
    assert files.peek(checkpoints / "epoch_latest.pt")["step"] == 2
    assert sorted(p.name for p in checkpoints.iterdir()) == ["epoch_latest.per_sample.2-bb", "epoch_latest.pt"]


def test_checkpoints_deleted_locally_are_deleted_remotely_others_kept(run, remote):
    (remote / "checkpoints" / "epoch_0.per_sample.0-zz").mkdir(parents=True)  # from an earlier life of the run
    files.save_atomic({"epoch": 0, "step": 0, "state_dict": {}, "per_sample_dir": "epoch_0.per_sample.0-zz"},
                      remote / "checkpoints" / "epoch_0.pt")
    first = save_checkpoint(run, "epoch_1", "1-aa")
    sync = syncer(run, remote)
    assert sync.sync()
    second = save_checkpoint(run, "epoch_2", "2-bb", step=2)
    files.prune_previous(first.parent, keep=second)  # --delete-previous-checkpoint
    assert sync.sync()
    left = sorted(p.name for p in (remote / "checkpoints").iterdir())
    assert left == ["epoch_0.per_sample.0-zz", "epoch_0.pt", "epoch_2.per_sample.2-bb", "epoch_2.pt"]


def test_thread_syncs_periodically_and_close_syncs_once_more(run, remote):
    sync = syncer(run, remote, every_s=0.2)
    sync.start()
    (run / "out.log").write_text("early\n")
    deadline = time.monotonic() + 10
    while not (remote / "out.log").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert (remote / "out.log").read_text() == "early\n"
    save_checkpoint(run, "epoch_1", "1-aa")
    (run / "out.log").write_text("early\nlate\n")
    assert sync.close()
    assert (remote / "out.log").read_text() == "early\nlate\n"
    assert (remote / "checkpoints" / "epoch_1.pt").is_file()


def test_failed_sync_is_a_one_line_warning_and_the_next_one_retries(run, remote, caplog):
    (run / "out.log").write_text("x")
    remote.parent.mkdir(parents=True)
    remote.write_text("a file where the remote folder should be")
    sync = syncer(run, remote)
    with caplog.at_level(logging.WARNING, logger="fastclip"):
        assert not sync.sync()
    [record] = caplog.records
    assert "remote sync to" in record.getMessage() and "\n" not in record.getMessage()
    remote.unlink()
    assert sync.sync()
    assert (remote / "out.log").read_text() == "x"


def test_fetch_restores_checkpoints_for_resume_latest(run, remote, tmp_path):
    save_checkpoint(run, "epoch_1", "1-aa", step=1)
    save_checkpoint(run, "epoch_latest", "5-bb", step=5)
    (run / "wandb_id.txt").write_text("0123456789abcdef\n")  # the wandb run a resumed job continues
    assert syncer(run, remote).sync()
    (remote / "checkpoints" / "epoch_2.per_sample.2-cc").mkdir()  # an incomplete remote checkpoint
    files.save_atomic({"epoch": 2, "step": 2, "state_dict": {}, "per_sample_dir": "epoch_2.per_sample.2-cc"},
                      remote / "checkpoints" / "epoch_2.pt")
    fresh = tmp_path / "fresh" / "myrun"
    fetched = fetch_checkpoints(str(remote), fresh, "fsspec")
    assert fetched == ["epoch_1.pt", "epoch_latest.pt"]
    newest, problems = files.newest_first(fresh / "checkpoints")
    assert [p.name for p in newest] == ["epoch_latest.pt", "epoch_1.pt"] and not problems
    state = files.per_sample_dir(newest[0], files.peek(newest[0]))
    assert names(state) == {"manifest.json", "rank00000-of-00001.bin"}
    assert files.remove_leftovers(fresh / "checkpoints") == []
    assert (fresh / "wandb_id.txt").read_text() == "0123456789abcdef\n"
    assert fetch_checkpoints(str(remote), fresh, "fsspec") == []  # the local folder has checkpoints now


def test_check_remote_accepts_a_writable_folder_and_leaves_nothing(remote):
    assert check_remote(str(remote), "fsspec") is None
    assert list(remote.iterdir()) == []


def test_check_remote_unwritable_is_one_line(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    error = check_remote(str(blocker / "run"), "fsspec")
    assert error.startswith(f"--remote-sync {blocker / 'run'}: cannot write there") and "\n" not in error


def test_s3_without_aws_on_path_fails_at_start_and_never_kills_a_sync(run, monkeypatch, tmp_path):
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    error = check_remote("s3://bucket/runs/myrun", "s3")
    assert "install awscli" in error and "--remote-sync-protocol fsspec" in error and "\n" not in error
    assert not RemoteSync.from_flags(run, "s3://bucket/runs", "s3", 300).sync()


def test_unknown_protocol_is_one_line():
    assert check_remote("/tmp/x", "ftp") == "--remote-sync-protocol ftp: unknown, use one of s3, fsspec"
