"""Slurm's compact host lists (SLURM_JOB_NODELIST) read in Python, so that finding rank 0's host needs no `scontrol`.

A list is comma-separated entries; each entry is literal text with bracket groups of numbers and
ranges, expanded as slurm does: `node[01-03,07]` is node01 node02 node03 node07 (a range keeps its
lower bound's width, so zero padding stays), `gpu-a[1-2],gpu-b3` is gpu-a1 gpu-a2 gpu-b3, and an
entry with several groups, `n[1-2]-ib[3-4]`, is every combination, the first group varying slowest.
"""

from __future__ import annotations

import itertools
import re

_GROUP = re.compile(r"\[([^\[\]]*)\]")
_RANGE = re.compile(r"([0-9]+)(?:-([0-9]+))?")


def expand_hostlist(text: str) -> list[str]:
    """Every host `text` names, in slurm's order: the first is where srun starts task 0.

    Raises ValueError naming `text` when it is not a host list.
    """
    try:
        return [host for entry in _entries(text) for host in _expand_entry(entry)]
    except ValueError as error:
        raise ValueError(f"not a slurm host list: {text!r} ({error})") from None


def _entries(text: str) -> list[str]:
    """The comma-separated entries of `text`; commas inside brackets belong to their entry."""
    entries, depth, start = [], 0, 0
    for position, char in enumerate(text):
        if char == "[":
            depth += 1
            if depth > 1:
                raise ValueError(f"nested '[' at position {position}")
        elif char == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"']' without '[' at position {position}")
        elif char == "," and depth == 0:
            entries.append(text[start:position])
            start = position + 1
    if depth:
        raise ValueError("'[' without ']'")
    entries.append(text[start:])
    return entries


def _expand_entry(entry: str) -> list[str]:
    """The hosts of one entry: its bracket groups' numbers combined with the text around them."""
    if not entry:
        raise ValueError("an empty host name")
    if any(char.isspace() for char in entry):
        raise ValueError(f"white space in {entry!r}")
    parts = _GROUP.split(entry)  # text, group, text, group, ..., text
    choices = [[part] if i % 2 == 0 else _numbers(part) for i, part in enumerate(parts)]
    return ["".join(combination) for combination in itertools.product(*choices)]


def _numbers(group: str) -> list[str]:
    """The numbers of a bracket group such as `01-04,07`, each as wide as its range's lower bound."""
    numbers = []
    for item in group.split(","):
        match = _RANGE.fullmatch(item)
        if match is None:
            raise ValueError(f"[{group}]: {item!r} is neither a number nor a range a-b")
        low, high = match.group(1), match.group(2) or match.group(1)
        if int(high) < int(low):
            raise ValueError(f"[{group}]: the range {item} runs backwards")
        numbers += [str(n).zfill(len(low)) for n in range(int(low), int(high) + 1)]
    return numbers
