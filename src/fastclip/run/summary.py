"""The block rank 0 logs before the first step, and the silencing of known start-up noise.

Set-up (model, data, process group) takes minutes on a large run; the summary says at once what is
about to run and what it will cost, so that a wrong flag is seen before the first epoch, not after.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

# FutureWarnings that torch raises once per rank for calls made on our behalf: DDP's constructor
# argument `broadcast_buffers`, and open_clip's gathers for --gather-with-grad. Neither is ours to fix.
KNOWN_NOISE = (
    r"`broadcast_buffers` is deprecated",
    r"torch\.distributed\.nn\.functional\.all_gather is deprecated",
)


def silence_known_warnings() -> None:
    """Hide the FutureWarnings of KNOWN_NOISE (by message, so every other warning still shows)."""
    for message in KNOWN_NOISE:
        warnings.filterwarnings("ignore", message=message, category=FutureWarning)


def version_name(fastclip: bool, temperature_scheme: str, multiply_tau: bool, siglip: bool = False) -> str:
    """The paper's name of the objective the flags select (README, "Training")."""
    if not fastclip:
        return "SigLIP" if siglip else "OpenCLIP"
    if multiply_tau:
        return "FastCLIP-v3"
    return {"global_learnable": "FastCLIP-v0", "global_constant": "FastCLIP-v1",
            "individual_learnable": "FastCLIP-v2"}[temperature_scheme]


def format_bytes(size: int) -> str:
    if size < 1024:
        return f"{size} B"
    exponent = min(int(math.log(size, 1024)), 3)
    return f"{size / 1024 ** exponent:.1f} {('KiB', 'MiB', 'GiB')[exponent - 1]}"


@dataclass(frozen=True)
class RunFacts:
    """What a run will do, gathered at the end of set-up; `steps_per_epoch` 0 when it only evaluates."""

    version: str
    world_size: int
    local_ranks: int
    device: str
    precision: str
    model: str
    parameters: int
    batch_size: int  # per rank
    steps_per_epoch: int
    epochs: int
    stop_epochs: int
    data_size: int | None
    state_bytes_per_sample: int  # per-sample state row; 0 for OpenCLIP
    state_rows_per_rank: int
    cpu_threads: str  # the line of fastclip.distributed.threads.configure_cpu_threads
    output: str
    paths_relative_to: str | None


def format_summary(facts: RunFacts) -> str:
    """The start-up block: one line per fact, aligned."""
    global_batch = facts.batch_size * facts.world_size
    nodes = math.ceil(facts.world_size / max(1, facts.local_ranks))
    rows = [
        ("version", facts.version),
        ("ranks", f"{facts.world_size} on {nodes} node{'s' if nodes != 1 else ''}, device {facts.device}"),
        ("precision", facts.precision),
        ("model", f"{facts.model} ({facts.parameters:,} parameters)"),
        ("global batch", f"{global_batch} ({facts.batch_size} per rank)"),
    ]
    if facts.steps_per_epoch:
        epochs = f"{facts.epochs} epoch{'s' if facts.epochs != 1 else ''}"
        stop = "" if facts.stop_epochs == facts.epochs else f", stopping after epoch {facts.stop_epochs}"
        rows += [
            ("epoch", f"{facts.steps_per_epoch * global_batch:,} samples, {facts.steps_per_epoch:,} steps"),
            ("schedule", f"{epochs}, {facts.steps_per_epoch * facts.epochs:,} steps{stop}"),
        ]
    else:
        rows.append(("training", "none (evaluation only)"))
    if facts.data_size is not None:
        rows.append(("data size", f"{facts.data_size:,} sample keys"))
    if facts.state_bytes_per_sample:
        per_rank = facts.state_bytes_per_sample * facts.state_rows_per_rank
        rows.append(("per-sample state", f"{format_bytes(per_rank)} per rank ({facts.state_bytes_per_sample} B "
                                         f"x {facts.state_rows_per_rank:,} rows)"))
    rows.append(("CPU threads per rank", facts.cpu_threads.removeprefix("CPU threads per rank: ")))
    rows.append(("output", facts.output))
    if facts.paths_relative_to is not None:
        rows.append(("relative paths", f"resolved against {facts.paths_relative_to} (run from its src/ folder)"))
    width = max(len(label) for label, _ in rows)
    return "\n".join(["start-up summary"] + [f"  {label:<{width}}  {value}" for label, value in rows])
