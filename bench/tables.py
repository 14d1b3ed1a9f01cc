"""Formatting that anatomy.py, comm.py and memory.py share and bench/common.py does not have (yet):
candidates to move there."""

from __future__ import annotations

from common import Summary


def ms(summary: Summary) -> str:
    """Seconds shown as 'median [min-max]' milliseconds: the median is compared, min/max show the noise."""
    return f"{1e3 * summary.median:.1f} [{1e3 * summary.min:.1f}-{1e3 * summary.max:.1f}]"


def human_bytes(n: float) -> str:
    """Binary units, three significant digits: tables that span bytes to gigabytes stay readable."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1000:
            return f"{n:.3g} {unit}"
        n /= 1024
    return f"{n:.3g} TiB"
