"""--remote-sync: mirror the run folder to a remote one while training, and bring checkpoints back.

A preemptible job can lose its local disk; the remote copy is what its restart resumes from. A plain
copy of the folder is not enough for FastCLIP's checkpoints: a `.pt` names a per-sample state folder
beside it, saves go through temporary files, and the run's lock file belongs to this host. So a sync
uploads everything else first, then for each checkpoint the state folder before the `.pt` that names
it (the remote never holds a `.pt` whose folder is incomplete), never uploads temporaries or the lock,
and deletes on the remote the checkpoints that this run deleted locally.

The protocols are open_clip_train's: `s3` drives the `aws` command line, `fsspec` copies with fsspec
to any URL it knows (or a local path). A file is uploaded when the remote lacks it, holds another
size, or holds a copy older than the local file (a re-saved epoch_latest.pt often keeps its size).
"""

from __future__ import annotations

import abc
import datetime
import fnmatch
import logging
import os
import posixpath
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import fsspec
from fsspec.implementations.local import LocalFileSystem

from ..checkpoint import files, sharded
from .lock import RunLock
from .log import WANDB_ID_FILE

logger = logging.getLogger("fastclip")
PROTOCOLS = ("s3", "fsspec")
CHECKPOINTS = "checkpoints"
TEMPORARIES = (f"*{files.TMP_MARK}*", "*.tmp")
COPY_CHUNK = 16 * 2**20
AWS_MISSING = ("--remote-sync-protocol s3 runs the aws command, which is not on PATH: install awscli "
               "(pip install awscli) or use --remote-sync-protocol fsspec")

RUN_FILES = (WANDB_ID_FILE,)  # small files of the run folder a resumed run reads, fetched with the checkpoints


class RemoteSyncError(RuntimeError):
    """A remote operation failed; the message is one line saying which and why."""


class _Replaced(Exception):
    """The checkpoint was re-saved or deleted while being synced; the next sync takes the new one."""


@dataclass(frozen=True)
class RemoteFile:
    size: int
    mtime: float | None  # seconds since the epoch; None where the store does not say


def remote_run_dir(remote: str, name: str) -> str:
    """The mirror of `<logs>/<name>`: `<remote>/<name>`, as open_clip_train names it."""
    return f"{remote.rstrip('/')}/{name}"


def first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), "")[:300]


def one_line(error: BaseException) -> str:
    """An error as one short line (aws and fsspec errors can span many)."""
    text = first_line(str(error))
    if isinstance(error, RemoteSyncError):
        return text
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def excluded(name: str, patterns: tuple[str, ...]) -> bool:
    """Whether a '/'-separated relative path matches a pattern (`*` spans '/', as in aws --exclude)."""
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def needs_upload(local: os.stat_result, remote: RemoteFile | None) -> bool:
    """Missing remotely, another size, or changed locally after the remote copy was written."""
    if remote is None or remote.size != local.st_size:
        return True
    return remote.mtime is not None and local.st_mtime > remote.mtime


def _join(rel: str, name: str) -> str:
    return f"{rel}/{name}" if rel else name


# ---- the remote side ----------------------------------------------------------------------------

class Store(abc.ABC):
    """The remote run folder; `rel` paths are relative to it, '/'-separated."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")

    @abc.abstractmethod
    def listing(self, rel: str) -> dict[str, RemoteFile]:
        """Every file under `rel`, keyed by its path relative to `rel`; empty when there is none."""

    @abc.abstractmethod
    def put_tree(self, local: Path, rel: str, exclude: tuple[str, ...]) -> int:
        """Upload the files of `local` that `needs_upload`, except those matching `exclude`, to `rel`;
        deletes nothing remotely; returns how many it uploaded."""

    @abc.abstractmethod
    def put_file(self, handle: BinaryIO, rel: str) -> None:
        """Upload an open file whole: the remote shows the previous version or this one, never a part."""

    @abc.abstractmethod
    def remove(self, rel: str, folder: bool) -> None:
        """Delete a remote file, or a folder with all it holds."""

    @abc.abstractmethod
    def get_file(self, rel: str, local: Path) -> None:
        """Download one file to `local`."""

    @abc.abstractmethod
    def get_tree(self, rel: str, local: Path) -> None:
        """Download the folder `rel` into `local`, except temporaries."""


class FsspecStore(Store):
    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.fs, self.root = fsspec.core.url_to_fs(self.url)

    def _path(self, rel: str) -> str:
        return _join(self.root.rstrip("/"), rel) if rel else self.root

    def listing(self, rel: str) -> dict[str, RemoteFile]:
        base = self._path(rel).rstrip("/") + "/"
        found = self.fs.find(base, detail=True)
        return {path[len(base):]: RemoteFile(int(info["size"]), _info_mtime(info))
                for path, info in found.items() if path.startswith(base)}

    def put_tree(self, local: Path, rel: str, exclude: tuple[str, ...]) -> int:
        remote, sent = self.listing(rel), 0
        for path in sorted(local.rglob("*")):
            name = path.relative_to(local).as_posix()
            if excluded(name, exclude) or not path.is_file():
                continue
            try:
                with open(path, "rb") as handle:
                    if needs_upload(os.fstat(handle.fileno()), remote.get(name)):
                        self.put_file(handle, _join(rel, name))
                        sent += 1
            except FileNotFoundError:  # deleted since listed: nothing left to mirror
                continue
        return sent

    def put_file(self, handle: BinaryIO, rel: str) -> None:
        target = self._path(rel)
        if not isinstance(self.fs, LocalFileSystem):  # object stores publish an object once it is complete
            self._copy(handle, target)
            return
        # a file system shows a file while it is written: write beside it, then rename
        self.fs.makedirs(posixpath.dirname(target), exist_ok=True)
        partial = str(files.unique_tmp(Path(target)))
        try:
            self._copy(handle, partial)
            self.fs.mv(partial, target)
        finally:
            if self.fs.exists(partial):
                self.fs.rm_file(partial)

    def _copy(self, handle: BinaryIO, target: str) -> None:
        handle.seek(0)
        with self.fs.open(target, "wb") as out:
            shutil.copyfileobj(handle, out, COPY_CHUNK)

    def remove(self, rel: str, folder: bool) -> None:
        try:
            self.fs.rm(self._path(rel), recursive=folder)
        except FileNotFoundError:
            pass

    def get_file(self, rel: str, local: Path) -> None:
        local.parent.mkdir(parents=True, exist_ok=True)
        self.fs.get_file(self._path(rel), str(local))

    def get_tree(self, rel: str, local: Path) -> None:
        for name in self.listing(rel):
            if not excluded(name, TEMPORARIES):
                self.get_file(_join(rel, name), local / name)


def _info_mtime(info: dict) -> float | None:
    """The modification time in an fsspec listing entry; stores name and type it differently."""
    for key in ("mtime", "LastModified", "updated", "last_modified"):
        value = info.get(key)
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, datetime.datetime):
            return value.timestamp()
        if isinstance(value, str):
            try:
                return datetime.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
            except ValueError:
                continue
    return None


class AwsStore(Store):
    """`aws s3` commands; folders go with `aws s3 sync`, which compares sizes and times as `needs_upload`."""

    def _url(self, rel: str) -> str:
        return _join(self.url, rel) if rel else self.url

    def _run(self, *args: str, stdin: BinaryIO | None = None, empty_ok: bool = False) -> str:
        try:
            result = subprocess.run(["aws", "s3", *args], stdin=stdin, capture_output=True, text=True)
        except FileNotFoundError:
            raise RemoteSyncError(AWS_MISSING) from None
        if result.returncode == 0 or (empty_ok and result.returncode == 1 and not result.stderr.strip()):
            return result.stdout
        reason = first_line(result.stderr) or f"exit status {result.returncode}"
        raise RemoteSyncError(f"aws s3 {args[0]} failed: {reason}")

    def listing(self, rel: str) -> dict[str, RemoteFile]:
        prefix = self._url(rel) + "/"
        out = self._run("ls", "--recursive", prefix, empty_ok=True)  # exit 1, silent: nothing there
        key_prefix = prefix.removeprefix("s3://").partition("/")[2]
        found = {}
        for line in out.splitlines():
            parts = line.split(maxsplit=3)  # date, time (local), size, key from the bucket's root
            if len(parts) == 4 and parts[3].startswith(key_prefix) and not parts[3].endswith("/"):
                when = datetime.datetime.strptime(f"{parts[0]} {parts[1]}", "%Y-%m-%d %H:%M:%S").timestamp()
                found[parts[3][len(key_prefix):]] = RemoteFile(int(parts[2]), when)
        return found

    def put_tree(self, local: Path, rel: str, exclude: tuple[str, ...]) -> int:
        args = ["sync", str(local), self._url(rel), "--no-progress"]
        for pattern in exclude:
            args += ["--exclude", pattern]
        return sum(line.startswith("upload:") for line in self._run(*args).splitlines())

    def put_file(self, handle: BinaryIO, rel: str) -> None:
        handle.seek(0)
        size = os.fstat(handle.fileno()).st_size
        self._run("cp", "-", self._url(rel), "--expected-size", str(size), stdin=handle)

    def remove(self, rel: str, folder: bool) -> None:
        if folder:
            self._run("rm", "--recursive", self._url(rel) + "/")
        else:
            self._run("rm", self._url(rel))

    def get_file(self, rel: str, local: Path) -> None:
        self._run("cp", "--no-progress", self._url(rel), str(local))

    def get_tree(self, rel: str, local: Path) -> None:
        args = ["cp", "--recursive", "--no-progress", self._url(rel) + "/", str(local)]
        for pattern in TEMPORARIES:
            args += ["--exclude", pattern]
        self._run(*args)


def make_store(url: str, protocol: str) -> Store:
    if protocol == "s3":
        return AwsStore(url)
    if protocol == "fsspec":
        return FsspecStore(url)
    raise ValueError(f"--remote-sync-protocol {protocol}: unknown, use one of {', '.join(PROTOCOLS)}")


def check_remote(remote: str, protocol: str) -> str | None:
    """Why syncing to `remote` cannot work, in one line, or None: run once at start, so that a missing
    tool or a read-only remote stops the run before training rather than after it."""
    if protocol not in PROTOCOLS:
        return f"--remote-sync-protocol {protocol}: unknown, use one of {', '.join(PROTOCOLS)}"
    if protocol == "s3":
        if shutil.which("aws") is None:
            return AWS_MISSING
        if not remote.startswith("s3://"):
            return (f"--remote-sync {remote}: the s3 protocol needs an s3:// URL; use --remote-sync-protocol "
                    "fsspec for other places")
    probe = files.unique_tmp(Path(".remote-sync-probe")).name  # a temporary: never synced
    try:
        store = make_store(remote, protocol)
        with tempfile.TemporaryFile() as handle:
            handle.write(b"remote sync probe\n")
            store.put_file(handle, probe)
        store.remove(probe, folder=False)
    except Exception as error:  # any store's failure (missing package, permission, network) ends the same way
        return f"--remote-sync {remote}: cannot write there ({one_line(error)})"
    return None


# ---- syncing ------------------------------------------------------------------------------------

def _state_dirs(listing: dict[str, RemoteFile], stem: str) -> set[str]:
    """The remote per-sample folders of a checkpoint stem, from a listing of the checkpoints folder."""
    found = set()
    for name in listing:
        top, inside, _ = name.partition("/")
        match = files.PER_SAMPLE_DIR.match(top)
        if inside and match and match["stem"] == stem:
            found.add(top)
    return found


class RemoteSync:
    """Rank 0's mirror of the run folder: `start()` syncs every `every_s` seconds in a daemon thread,
    `close()` stops it and syncs once more. A failed sync is a warning, retried by the next one:
    training never stops for the remote.

    Deletion: a checkpoint (.pt and its per-sample folders) that this object saw locally and that is
    gone locally since (--delete-previous-checkpoint) is deleted remotely, .pt first; so are a
    checkpoint's superseded per-sample folders once the .pt naming the new one is uploaded. Nothing
    else is deleted remotely, so a fresh local disk never empties the remote.
    """

    def __init__(self, local_run_dir: Path, remote_run_dir: str, protocol: str, every_s: float) -> None:
        self.local = Path(local_run_dir)
        self.remote = remote_run_dir
        self.store = make_store(remote_run_dir, protocol)
        self.every_s = every_s
        lock = RunLock(self.local).path.relative_to(self.local).as_posix()
        self._exclude = (*TEMPORARIES, lock, f"{CHECKPOINTS}/*.pt", f"{CHECKPOINTS}/*.per_sample.*")
        self._seen: set[str] = set()  # checkpoint stems this run has held locally
        self._busy = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def from_flags(cls, run_dir: Path, remote: str, protocol: str, every_s: float) -> RemoteSync:
        """From --remote-sync, --remote-sync-protocol and --remote-sync-frequency, for `<logs>/<name>`."""
        return cls(run_dir, remote_run_dir(remote, Path(run_dir).name), protocol, every_s)

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="remote-sync", daemon=True)
        self._thread.start()

    def close(self) -> bool:
        """Stop the thread (after its sync in progress, if any), then sync once more; whether that worked."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
        ok = self.sync()
        if ok:
            logger.info("final remote sync to %s done", self.remote)
        return ok

    def sync(self) -> bool:
        """Sync now; a failure is logged as a warning with its reason and returns False."""
        with self._busy:
            try:
                uploaded, removed = self._sync()
            except Exception as error:  # a remote failure of any kind must not end training
                logger.warning("remote sync to %s failed, the next sync retries: %s", self.remote, one_line(error))
                return False
        if uploaded or removed:
            logger.info("remote sync to %s: %d files uploaded, %d checkpoints removed", self.remote, uploaded, removed)
        return True

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            self.sync()

    def _sync(self) -> tuple[int, int]:
        uploaded = self.store.put_tree(self.local, "", self._exclude)
        folder = self.local / CHECKPOINTS
        remote = self.store.listing(CHECKPOINTS)
        checkpoints = sorted(folder.glob("*.pt"))  # temporaries end in .tmp-HOST-PID, never in .pt
        stems = {p.stem for p in checkpoints}
        self._seen |= stems
        uploaded += sum(self._push(path, remote) for path in checkpoints)
        return uploaded, self._remove_deleted(stems, remote)

    def _push(self, path: Path, remote: dict[str, RemoteFile]) -> int:
        """One checkpoint: the state folder it names, then the .pt, then its stem's other remote folders.

        The .pt is uploaded from the handle opened first, so it is the version whose folder went up,
        even when a new save replaces the file meanwhile.
        """
        try:
            with open(path, "rb") as handle:
                return self._push_open(path, handle, remote)
        except (_Replaced, FileNotFoundError):
            logger.debug("%s changed during the remote sync; the next sync takes it", path)
            return 0

    def _push_open(self, path: Path, handle: BinaryIO, remote: dict[str, RemoteFile]) -> int:
        try:
            state = files.peek(path).get("per_sample_dir")
        finally:
            _check_current(path, handle)  # what peek read is what `handle` holds (or it was replaced)
        uploaded = 0
        if state is not None:
            if not (path.parent / state / sharded.MANIFEST).is_file():
                _check_current(path, handle)  # superseded and deleted just now: not an error
                raise files.CheckpointError(f"{path} names the per-sample folder {state}, which is not complete")
            uploaded += self.store.put_tree(path.parent / state, f"{CHECKPOINTS}/{state}", TEMPORARIES)
            _check_current(path, handle)  # not superseded (and deleted) while it was uploaded
        if needs_upload(os.fstat(handle.fileno()), remote.get(path.name)):
            self.store.put_file(handle, f"{CHECKPOINTS}/{path.name}")
            uploaded += 1
        for old in sorted(_state_dirs(remote, path.stem) - {state}):
            self.store.remove(f"{CHECKPOINTS}/{old}", folder=True)
        return uploaded

    def _remove_deleted(self, stems: set[str], remote: dict[str, RemoteFile]) -> int:
        """Delete remotely the checkpoints seen locally before and gone now: .pt first, then its folders."""
        removed = 0
        for stem in sorted(self._seen - stems):
            if f"{stem}.pt" in remote:
                self.store.remove(f"{CHECKPOINTS}/{stem}.pt", folder=False)
                removed += 1
            for state in sorted(_state_dirs(remote, stem)):
                self.store.remove(f"{CHECKPOINTS}/{state}", folder=True)
            self._seen.discard(stem)
        return removed


def _check_current(path: Path, handle: BinaryIO) -> None:
    """Raise `_Replaced` unless `path` still is the file `handle` opened. Saves replace files by rename,
    and the open handle keeps its inode from being reused, so the same inode means the same version."""
    try:
        same = os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino
    except FileNotFoundError:
        same = False
    if not same:
        raise _Replaced(path)


# ---- restoring ----------------------------------------------------------------------------------

def fetch_checkpoints(remote_run_dir: str, local_run_dir: Path, protocol: str) -> list[str]:
    """When the local checkpoints folder holds no checkpoint (a restart on a fresh disk), download the
    remote's, each .pt after its per-sample folder, so that --resume latest finds them; returns the
    names of the .pt files fetched. A remote checkpoint that cannot be read or whose folder is incomplete
    is skipped with a warning. Raises `RemoteSyncError` when the remote cannot be read."""
    folder = Path(local_run_dir) / CHECKPOINTS
    if files.checkpoint_files(folder):
        return []
    try:
        store = make_store(remote_run_dir, protocol)
        remote = store.listing(CHECKPOINTS)
        names = sorted(name for name in remote
                       if "/" not in name and (files.EPOCH_FILE.match(name) or name == files.LATEST))
        fetched = [name for name in names if _fetch_one(store, name, remote, folder)]
        if fetched:
            _fetch_run_files(store, Path(local_run_dir))
        return fetched
    except RemoteSyncError:
        raise
    except Exception as error:
        raise RemoteSyncError(f"fetching checkpoints from {remote_run_dir}: {one_line(error)}") from error


def _fetch_run_files(store: Store, run_dir: Path) -> None:
    """The run folder's small files that a resumed run reads (the wandb run id), where the remote has them."""
    for name in RUN_FILES:
        target = run_dir / name
        if target.exists():
            continue
        partial = files.unique_tmp(target)
        try:
            store.get_file(name, partial)
            os.replace(partial, target)
        except Exception as error:  # absent remotely (each store says so its own way): nothing to bring back
            logger.info("--remote-sync: %s not fetched (%s)", name, one_line(error))
        finally:
            partial.unlink(missing_ok=True)


def _fetch_one(store: Store, name: str, remote: dict[str, RemoteFile], folder: Path) -> bool:
    """Download one checkpoint: the .pt to a temporary name, its folder, then the rename that makes the
    .pt visible (locally too, a .pt never names a missing folder)."""
    target = folder / name
    partial = files.unique_tmp(target)
    try:
        store.get_file(f"{CHECKPOINTS}/{name}", partial)
        state = files.peek(partial).get("per_sample_dir")
        if state is not None:
            if f"{state}/{sharded.MANIFEST}" not in remote:
                logger.warning("remote %s names the per-sample folder %s, which is incomplete there; not fetched",
                               name, state)
                return False
            store.get_tree(f"{CHECKPOINTS}/{state}", folder / state)
        os.replace(partial, target)
    except files.CheckpointError as error:
        logger.warning("remote checkpoint not fetched: %s", error)
        return False
    finally:
        partial.unlink(missing_ok=True)
    return True
