"""`make bench`: run every benchmark and assemble docs/benchmarks.md from their sections.

Each benchmark writes bench/out/<name>.md (its tables) and .json (raw numbers); this script runs them
one after another (never in parallel: they time the same two cores) and joins the sections, after
the hand-written notes in bench/notes.md, into docs/benchmarks.md. `--only NAME ...` reruns some
benchmarks and reuses the other sections from bench/out/, or from docs/benchmarks.md itself where
bench/out/ lacks them (a fresh clone).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "out"
TARGET = ROOT / "docs" / "benchmarks.md"
NOTES = ROOT / "bench" / "notes.md"
# Each benchmark's section title up to its first ':', by which a published section is found again.
TITLES = {
    "throughput": "CPU throughput vs open_clip_train",
    "startup": "Start-up",
    "anatomy": "Step anatomy",
    "comm": "Communication per step",
    "memory": "Per-rank memory",
    "save_memory": "Saving and loading the per-sample state",
    "state_precision": "Per-sample state precision",
    "convergence": "Convergence at small batch",
    "fonts": "Unique captions",
    "fonts_study": "Unique captions, 4 epochs at 2x16",
    "long": "Many visits per pair",
    "long_study": "What it takes",
    "scale": "The regime map",
    "step_cost": "What makes a step of the regime map cheap",
    "threads": "CPU threads per rank",
}
BENCHMARKS = tuple(TITLES)


def run(name: str, quick: bool) -> None:
    command = [sys.executable, str(ROOT / "bench" / f"{name}.py")] + (["--quick"] if quick else [])
    started = time.time()
    print(f"== {name}: {' '.join(command[1:])}", flush=True)
    subprocess.run(command, cwd=ROOT, check=True)
    print(f"== {name}: {time.time() - started:.0f} s", flush=True)


def sections(text: str) -> list[str]:
    """The '## ' sections of a markdown text."""
    return ["## " + part.rstrip() for part in ("\n" + text).split("\n## ")[1:]]


def published_sections() -> list[str]:
    """The benchmarks' sections of the current docs/benchmarks.md (the hand-written notes' excluded)."""
    if not TARGET.exists():
        return []
    notes = {section.splitlines()[0] for section in sections(NOTES.read_text())}
    return [section for section in sections(TARGET.read_text()) if section.splitlines()[0] not in notes]


def assemble(names: tuple[str, ...]) -> str:
    parts = [NOTES.read_text().rstrip()]
    published = published_sections()
    for name in names:
        section = OUT / f"{name}.md"
        if section.exists():
            parts.append(section.read_text().rstrip())
            continue
        kept = [text for text in published if text.splitlines()[0][3:].split(":")[0] == TITLES[name]]
        parts.append(kept[0] if kept else f"## {TITLES[name]}\n\nNot run yet: `make bench`.")
    return "\n\n".join(parts) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", choices=BENCHMARKS, default=list(BENCHMARKS))
    parser.add_argument("--quick", action="store_true", help="smoke-test sizes (numbers are not meaningful)")
    args = parser.parse_args()
    for name in args.only:
        run(name, args.quick)
    TARGET.write_text(assemble(BENCHMARKS))
    print(f"wrote {TARGET.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
