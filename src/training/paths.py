"""Relative path flags under both launch conventions of the seed's commands.

`srun python -u src/training/main.py` runs from the project root, `cd src && torchrun -m training.main`
from its `src/` folder, with the same flags (`./datasets/...`, `./logs/...`). Run from this project's own
`src/` folder, relative paths therefore mean the project root; from anywhere else they mean the working
directory, as usual.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import training

PATH_FLAGS = ("train_data", "val_data", "logs", "resume", "imagenet_val", "zeroshot_classnames")
SHARD_LIST_SEPARATOR = "::"
NOT_A_PATH = {"resume": ("latest",)}


def project_root_if_in_src(cwd: Path | None = None) -> Path | None:
    """The project root when `cwd` is the `src/` folder holding the imported `training` package and
    the folder above it is the project (it has setup.py); None otherwise."""
    src = Path(training.__file__).resolve().parent.parent
    here = (cwd or Path.cwd()).resolve()
    if here == src and (src.parent / "setup.py").is_file():
        return src.parent
    return None


def _rebase(path: str, root: Path) -> str:
    """`path` against `root` when it is a local path relative to the project (`./x`, `x`); absolute
    paths, `~` paths, URLs and `../x` (already written from `src/`) keep their meaning."""
    if not path or "://" in path or path.startswith("pipe:") or path.startswith(".."):
        return path
    if Path(path).expanduser().is_absolute():
        return path
    return str(root / path)


def rebased_paths(values: Mapping[str, Any], cwd: Path | None = None) -> dict[str, Any]:
    """The path flags of `values` (by dest) resolved against the project root when run from its `src/`
    folder, and `paths_relative_to`, that base (None when paths keep their usual meaning)."""
    root = project_root_if_in_src(cwd)
    changes: dict[str, Any] = {"paths_relative_to": str(root) if root is not None else None}
    if root is None:
        return changes
    for flag in PATH_FLAGS:
        value = values.get(flag)
        if value is None or value in NOT_A_PATH.get(flag, ()):
            continue
        parts = value.split(SHARD_LIST_SEPARATOR)
        changes[flag] = SHARD_LIST_SEPARATOR.join(_rebase(part, root) for part in parts)
    return changes
