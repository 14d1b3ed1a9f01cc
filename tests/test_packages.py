"""The data the project needs from the system: what counts as installed, the one-line answer where it cannot be
installed, and Fashion-MNIST's download fallback (a loopback HTTP server standing in for the original host)."""

from __future__ import annotations

import functools
import gzip
import http.server
import os
import shutil
import struct
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from conftest import free_port
from fastclip.datasets import demo, packages
from fastclip.datasets.packages import FASHION_MNIST, FONTS, NEEDS, MissingData


def plant(root: Path, chosen) -> None:
    """The marker files of `chosen` packages under a stand-in file system root."""
    for package in chosen:
        marker = root / package.marker.relative_to("/")
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_bytes(b"")


def test_a_package_counts_as_installed_by_its_marker_file(tmp_path):
    assert packages.missing(NEEDS["test"], tmp_path) == [FASHION_MNIST, *FONTS]
    plant(tmp_path, FONTS[:2])
    assert packages.missing(NEEDS["test"], tmp_path) == [FASHION_MNIST, *FONTS[2:]]
    assert packages.missing(NEEDS["demo"], tmp_path) == [FASHION_MNIST]
    plant(tmp_path, NEEDS["test"])
    assert packages.missing(NEEDS["test"], tmp_path) == []
    assert packages.install("test", tmp_path) is None  # nothing missing: apt-get is not run


def run_module(*args: str, user: int | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "fastclip.datasets.packages", *args]
    if user is not None:
        command = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *command]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=60)


def test_check_says_in_one_line_what_is_missing_and_how_to_install_it(tmp_path):
    plant(tmp_path, FONTS)
    result = run_module("check", "demo", "--root", str(tmp_path / "empty"))
    assert result.returncode == 1 and result.stderr == ""
    assert result.stdout.count("\n") == 1
    assert "dataset-fashion-mnist not installed: the demo downloads Fashion-MNIST instead" in result.stdout
    assert result.stdout.rstrip().endswith("apt-get install -y dataset-fashion-mnist")
    assert run_module("check", "fonts", "--root", str(tmp_path)).returncode == 0


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root and setpriv "
                    "to run the install step as another user")
def test_without_root_install_prints_one_line_and_does_not_fail_the_make_target():
    empty_root = "/nonexistent/fastclip-test-root"  # pytest's tmp_path is not readable by another user
    result = run_module("install", "test", "--root", empty_root, user=65534)  # nobody: no root, no sudo
    assert result.returncode == 0, result.stderr
    assert result.stderr == "" and result.stdout.count("\n") == 1
    line = result.stdout.strip()
    assert "installing them needs root: the tests that need them are skipped" in line
    names = " ".join(p.name for p in NEEDS["test"])
    assert line.endswith(f"install them with: sudo apt-get install -y {names}")


def write_idx(path: Path, array: np.ndarray) -> None:
    header = b"\0\0\x08" + bytes([array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def mirror(tmp_path):
    """A loopback HTTP server holding the four Fashion-MNIST files (tiny, made here); yields its URL."""
    served = tmp_path / "served"
    served.mkdir()
    rng = np.random.default_rng(0)
    for split, count in (("train", 12), ("test", 5)):
        images, labels = demo.FILES[split]
        write_idx(served / images, rng.integers(0, 256, (count, 28, 28)))
        write_idx(served / labels, rng.integers(0, 10, count))
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()


def test_without_the_package_the_files_are_downloaded_once_into_the_cache(tmp_path, mirror, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    found = demo.find_fashion_mnist(system_dir=tmp_path / "no-package", base_url=mirror)
    assert found == tmp_path / "cache" / "fastclip" / "fashion-mnist"
    assert sorted(p.name for p in found.iterdir()) == sorted(n for pair in demo.FILES.values() for n in pair)
    assert demo.read_idx(found / demo.FILES["train"][0]).shape == (12, 28, 28)
    # the cache answers from now on: an unreachable host no longer matters
    assert demo.find_fashion_mnist(system_dir=tmp_path / "no-package", base_url="http://127.0.0.1:1/") == found


def test_neither_package_nor_download_is_one_line_with_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    url = f"http://127.0.0.1:{free_port()}/"  # nothing listens there
    with pytest.raises(MissingData) as raised:
        demo.find_fashion_mnist(system_dir=tmp_path / "no-package", base_url=url)
    message = str(raised.value)
    assert "\n" not in message
    assert f"dataset-fashion-mnist is not installed and downloading {url}train-images-idx3-ubyte.gz failed" in message
    assert message.endswith("apt-get install -y dataset-fashion-mnist")
    assert not list((tmp_path / "cache").rglob("*.partial"))  # no half-written file is left to be taken for data
