"""Install torch and torchvision into the running interpreter, the CPU-only build on a machine without an
NVIDIA GPU.

PyPI's default Linux torch wheel bundles the CUDA libraries (a ~6 GB environment); a laptop or a CPU
cluster node needs none of it. Without a GPU this installs from PyTorch's CPU wheel index, within the
version bounds of requirements-training.txt. When that index cannot be reached (an offline mirror
that serves only the package registry), it says so and leaves torch to the normal install.

Usage: python scripts/install_torch.py [--index URL]   (TORCH_INDEX=none skips the CPU index)
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

CPU_INDEX = "https://download.pytorch.org/whl/cpu"
REQUIREMENTS = Path(__file__).resolve().parents[1] / "requirements-training.txt"


def has_nvidia_gpu() -> bool:
    """An NVIDIA driver that lists at least one GPU."""
    if shutil.which("nvidia-smi") is None:
        return False
    try:
        result = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:  # a hung driver: no GPU this install can use
        return False
    return result.returncode == 0 and "GPU" in result.stdout


def reachable(url: str, timeout_s: float = 5.0) -> bool:
    try:
        with urllib.request.urlopen(url + "/torch/", timeout=timeout_s):
            return True
    except OSError:
        return False


def torch_requirements() -> list[str]:
    """The torch and torchvision lines of requirements-training.txt, bounds included."""
    lines = [line.strip() for line in REQUIREMENTS.read_text().splitlines()]
    return [line for line in lines if line.split("<")[0].split(">")[0].split("=")[0] in ("torch", "torchvision")]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--index", default=os.environ.get("TORCH_INDEX", CPU_INDEX),
                        help="wheel index of the CPU build ('none': leave torch to the normal install)")
    args = parser.parse_args()
    if importlib.util.find_spec("torch") is not None:
        return 0
    if has_nvidia_gpu():
        print("install_torch: NVIDIA GPU found: the default (CUDA) torch build will be installed")
        return 0
    if args.index == "none" or not reachable(args.index):
        print(f"install_torch: no GPU, but the CPU wheel index {args.index} is not reachable: the default torch "
              "build (with CUDA libraries, ~6 GB) will be installed. It runs on the CPU all the same.")
        return 0
    print(f"install_torch: no GPU: installing the CPU-only torch build from {args.index}")
    # --index-url replaces pip's index: the CPU index serves torch's dependencies too
    command = [sys.executable, "-m", "pip", "install", "--quiet", "--index-url", args.index, *torch_requirements()]
    return subprocess.call(command)


if __name__ == "__main__":
    raise SystemExit(main())
