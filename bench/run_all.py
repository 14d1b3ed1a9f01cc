"""`make bench`: run every benchmark and assemble docs/benchmarks.md from their sections.

Each benchmark writes bench/out/<name>.md (its tables) and .json (raw numbers); this script runs them
one after another (never in parallel: they time the same two cores) and joins the sections, after
the hand-written notes in bench/notes.md, into docs/benchmarks.md. `--only NAME ...` reruns some
benchmarks and reuses the other sections from bench/out/.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "out"
BENCHMARKS = ("throughput", "anatomy", "comm", "memory", "save_memory", "convergence", "threads")


def run(name: str, quick: bool) -> None:
    command = [sys.executable, str(ROOT / "bench" / f"{name}.py")] + (["--quick"] if quick else [])
    started = time.time()
    print(f"== {name}: {' '.join(command[1:])}", flush=True)
    subprocess.run(command, cwd=ROOT, check=True)
    print(f"== {name}: {time.time() - started:.0f} s", flush=True)


def assemble(names: tuple[str, ...]) -> str:
    parts = [(ROOT / "bench" / "notes.md").read_text().rstrip()]
    for name in names:
        section = OUT / f"{name}.md"
        parts.append(section.read_text().rstrip() if section.exists() else f"## {name}\n\nNot run yet: `make bench`.")
    return "\n\n".join(parts) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", choices=BENCHMARKS, default=list(BENCHMARKS))
    parser.add_argument("--quick", action="store_true", help="smoke-test sizes (numbers are not meaningful)")
    args = parser.parse_args()
    for name in args.only:
        run(name, args.quick)
    target = ROOT / "docs" / "benchmarks.md"
    target.write_text(assemble(BENCHMARKS))
    print(f"wrote {target.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
