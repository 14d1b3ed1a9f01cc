"""The system packages the project's data come from: which ones each use needs, how to tell whether
they are installed, and how to install them.

Fashion-MNIST (the demo and most end-to-end tests) comes from Debian's dataset-fashion-mnist, or from its
original download where the package cannot be installed (see `demo.find_fashion_mnist`). The fonts data
set (its tests and `make bench-fonts`) needs four Debian font packages and has no download.

    python -m fastclip.datasets.packages install demo|test|fonts   # what `make demo` / `make test` run
    python -m fastclip.datasets.packages check demo|test|fonts     # only say what is missing (exit 1)

`install` uses apt-get as root, or through `sudo` where it asks no password. Elsewhere, or when apt-get
fails, it prints one line: what is missing, what that means for the command at hand, and the command
that installs it. It never fails the make target: the demo then downloads, the tests then skip.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

FONT_ROOT = Path("/usr/share/fonts")
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


@dataclass(frozen=True)
class Package:
    name: str  # the Debian package
    marker: Path  # a file it installs: the package counts as installed when this file exists
    supplies: str  # what the project takes from it


FASHION_MNIST = Package("dataset-fashion-mnist", FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz",
                        "Fashion-MNIST, for the demo and the end-to-end tests")
FONTS = (
    Package("fonts-noto-core", FONT_ROOT / "truetype/noto/NotoSans-Regular.ttf", "training fonts of the fonts data set"),
    Package("fonts-unifont", FONT_ROOT / "opentype/unifont/unifont.otf", "training fonts of the fonts data set"),
    Package("fonts-freefont-ttf", FONT_ROOT / "truetype/freefont/FreeSans.ttf", "training fonts of the fonts data set"),
    Package("fonts-dejavu-core", FONT_ROOT / "truetype/dejavu/DejaVuSans.ttf", "the test font of the fonts data set"),
)
NEEDS = {
    "demo": (FASHION_MNIST,),
    "fonts": FONTS,
    "test": (FASHION_MNIST, *FONTS),
}
# what a use does without its packages
WITHOUT = {
    "demo": "the demo downloads Fashion-MNIST instead",
    "fonts": "the fonts data set cannot be built",
    "test": "the tests that need them are skipped",
}


class MissingData(FileNotFoundError):
    """A data set's files are not on this machine and cannot be had; the message says how to get them."""


def missing(packages: Sequence[Package], root: Path = Path("/")) -> list[Package]:
    """The packages whose marker file is absent (under `root`, for tests of another file system)."""
    return [p for p in packages if not (root / p.marker.relative_to("/")).is_file()]


def install_hint(packages: Sequence[Package]) -> str:
    """The command a person runs to install `packages`."""
    sudo = "" if os.geteuid() == 0 else "sudo "
    return f"{sudo}apt-get install -y {' '.join(p.name for p in packages)}"


def apt_get() -> list[str] | None:
    """How this process runs apt-get: directly as root, through `sudo` that asks no password, or not at all."""
    if shutil.which("apt-get") is None:
        return None
    if os.geteuid() == 0:
        return ["apt-get"]
    if shutil.which("sudo") and subprocess.run(["sudo", "-n", "true"], capture_output=True).returncode == 0:
        return ["sudo", "-n", "apt-get"]
    return None


def _them(packages: Sequence[Package]) -> str:
    return "it" if len(packages) == 1 else "them"


def not_installed(absent: Sequence[Package], use: str, reason: str = "") -> str:
    """The one line for packages that are not there: why (`reason`, if any), what follows for `use`, and the
    command that installs them."""
    because = f" and {reason}" if reason else ""
    return (f"{', '.join(p.name for p in absent)} not installed{because}: {WITHOUT[use]}; install {_them(absent)} "
            f"with: {install_hint(absent)}")


def _run(command: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    return subprocess.run(command, capture_output=True, text=True, env=env)


def install(use: str, root: Path = Path("/")) -> str | None:
    """Install the packages `use` needs that are missing. Returns None when they are all there afterwards,
    else one line saying what is missing, what follows for `use`, and the command that installs it."""
    absent = missing(NEEDS[use], root)
    if not absent:
        return None
    names = ", ".join(p.name for p in absent)
    command = apt_get()
    if command is None:
        return not_installed(absent, use, "apt-get is not available" if shutil.which("apt-get") is None
                             else f"installing {_them(absent)} needs root")
    print(f"data: installing {names} with apt-get", flush=True)
    for step in (["update", "-qq"], ["install", "-y", "-qq", *(p.name for p in absent)]):
        result = _run([*command, *step])
        if result.returncode != 0:
            last = (result.stderr.strip() or result.stdout.strip() or "no output").splitlines()[-1]
            return (f"{names} not installed: apt-get {step[0]} failed ({last}): {WITHOUT[use]}; "
                    f"try: {install_hint(absent)}")
    still = missing(absent, root)
    if still:
        return (f"{', '.join(p.name for p in still)} installed by apt-get, but their files are missing "
                f"({', '.join(str(p.marker) for p in still)}): {WITHOUT[use]}")
    return None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=("install", "check"))
    parser.add_argument("use", choices=sorted(NEEDS), help="what the packages are needed for")
    parser.add_argument("--root", type=Path, default=Path("/"), help=argparse.SUPPRESS)  # tests: another file system
    args = parser.parse_args(argv)
    if args.action == "check":
        absent = missing(NEEDS[args.use], args.root)
        line = not_installed(absent, args.use) if absent else None
    else:
        line = install(args.use, args.root)
    if line:
        print(f"data: {line}", flush=True)
    return 1 if line and args.action == "check" else 0


if __name__ == "__main__":
    raise SystemExit(main())
