"""Per-rank memory: the sharded per-sample state (measured, then by formula at dataset scale) and the
peak resident memory of short OpenCLIP and FastCLIP-v3 training runs.

The state is measured on real processes (K = 1, 2, 3): the bytes of each rank's ShardedState table
as FastCLIPObjective allocates it, against ceil(n/K) * C * 4 (C = 2 float32 columns per pair for
v0/v1/v3: log u1, log u2; 10 for v2: u, bound, tau, Adam m and v per side). The reference keeps
a full copy on every rank: 8n bytes (v0/v1/v3: u1, u2) or 40n (v2). The peak-memory runs train
OpenCLIP and FastCLIP-v3 at CC3M's data_size, and FastCLIP-v3 again at LAION-400M's.

    python bench/memory.py           # full run
    python bench/memory.py --quick   # smoke run, < 1 min
    python bench/memory.py --device cuda   # peak RSS runs on GPU also report peak CUDA memory
"""

from __future__ import annotations

import argparse
import itertools
import math
from dataclasses import dataclass

import torch

from common import current_rss, machine, markdown_table, peak_rss, write_report
from fastclip.distributed import comm
from fastclip.losses.fastclip import FastCLIPConfig, FastCLIPObjective
from ranks import CC3M_DATA_SIZE, OPENCLIP, build_trainer, rank_device, run_on_ranks, run_window
from ranks import synthetic_batches
from tables import human_bytes

FLOAT = 4
SCHEMES = {"v0/v1/v3": ("global_learnable", 2), "v2": ("individual_learnable", 10)}  # scheme, columns C
REFERENCE_BYTES_PER_PAIR = {"v0/v1/v3": 8, "v2": 40}  # full replica on every rank
LAION_DATA_SIZE = 400_000_000
DATASETS = {"CC3M 3.3M": CC3M_DATA_SIZE, "CC12M 12M": 12_000_000, "LAION 400M": LAION_DATA_SIZE}
FORMULA_WORLDS = (8, 16, 32)
RSS_VARIANTS = (OPENCLIP, "fastclip-v3")


@dataclass(frozen=True)
class Plan:
    state_worlds: tuple[int, ...]
    state_sizes: tuple[int, ...]
    rss_worlds: tuple[int, ...]
    rss_batch: int
    rss_steps: int
    rss_data_sizes: tuple[int, ...]  # OpenCLIP runs at the first only: it keeps no per-sample state
    device: str


def state_formula(n: int, k: int, columns: int) -> int:
    return math.ceil(n / k) * columns * FLOAT


# ---- measured state -----------------------------------------------------------------------------

def rank_state_bytes(sizes: tuple[int, ...]) -> dict:
    """On each rank: {scheme: {n: (table bytes, allocated bytes)}} of FastCLIPObjective's ShardedState."""
    result: dict[str, dict] = {}
    for label, (scheme, _) in SCHEMES.items():
        result[label] = {}
        for n in sizes:
            table = FastCLIPObjective(FastCLIPConfig(data_size=n, temperature_scheme=scheme), "cpu").state.table
            result[label][str(n)] = [table.numel() * table.element_size(), table.untyped_storage().nbytes()]
    return result


def state_rows(world: int, per_rank: list[dict]) -> list[list[str]]:
    rows = []
    for label, (_, columns) in SCHEMES.items():
        for n in per_rank[0][label]:
            measured = [r[label][n] for r in per_rank]
            expected = state_formula(int(n), world, columns)
            rows.append([str(world), n, label, str(columns), " / ".join(str(t) for t, _ in measured), str(expected),
                         " / ".join(str(a) for _, a in measured),
                         "yes" if all(t == expected for t, _ in measured) else "NO"])
    return rows


def state_table(rows: list[list[str]]) -> str:
    headers = ["K", "n", "versions", "C", "table bytes per rank (r0 / r1 / ...)", "ceil(n/K)*C*4",
               "allocated (+1 spare row)", "table = formula"]
    return markdown_table(headers, rows)


def formula_table() -> str:
    rows = []
    for (name, n), k in itertools.product(DATASETS.items(), FORMULA_WORLDS):
        cells = []
        for label, (_, columns) in SCHEMES.items():
            ours, reference = state_formula(n, k, columns), REFERENCE_BYTES_PER_PAIR[label] * n
            cells += [human_bytes(ours), human_bytes(reference), f"{reference / ours:.1f}x"]
        rows.append([name, str(k), *cells])
    headers = ["dataset n", "K", "ours v0/v1/v3 (8 B/pair / K)", "reference (8n)", "saving",
               "ours v2 (40 B/pair / K)", "reference v2 (40n)", "saving"]
    return markdown_table(headers, rows)


# ---- peak memory of short runs ------------------------------------------------------------------

def rank_training_memory(variant: str, plan: Plan, data_size: int) -> dict:
    """A fresh process per run, so that the peak is this run's: RSS after building, peak RSS after
    the steps, and on a GPU the peak CUDA allocation."""
    device = rank_device(plan.device)
    trainer = build_trainer(variant, plan.rss_batch, data_size, device)
    batches = itertools.cycle(synthetic_batches(plan.rss_batch, 2, data_size, device))
    built = current_rss()
    run_window(trainer, batches, plan.rss_steps)
    state = getattr(trainer.objective, "state", None)
    state_bytes = 0 if state is None else state.table.numel() * state.table.element_size()
    result = {"rss_built": built, "rss_peak": peak_rss(), "state": state_bytes, "rank": comm.rank()}
    if device.type == "cuda":
        result["cuda_peak"] = torch.cuda.max_memory_allocated(device)
    return result


def training_memory(plan: Plan) -> list[dict]:
    backend = "nccl" if plan.device == "cuda" else "gloo"
    runs = []
    for world, data_size, variant in itertools.product(plan.rss_worlds, plan.rss_data_sizes, RSS_VARIANTS):
        if variant == OPENCLIP and data_size != plan.rss_data_sizes[0]:
            continue
        per_rank = run_on_ranks(world, rank_training_memory, variant, plan, data_size, backend=backend)
        runs.append({"K": world, "data_size": data_size, "variant": variant, "ranks": per_rank})
    return runs


def training_table(runs: list[dict]) -> str:
    rows = []
    for run in runs:
        peak = max(r["rss_peak"] for r in run["ranks"])
        built = max(r["rss_built"] for r in run["ranks"])
        cuda = max((r.get("cuda_peak", 0) for r in run["ranks"]), default=0)
        state = max(r["state"] for r in run["ranks"])
        rows.append([str(run["K"]), f"{run['data_size']:,}", run["variant"], human_bytes(built), human_bytes(peak),
                     human_bytes(state), human_bytes(cuda) if cuda else "-"])
    headers = ["K", "data_size", "variant", "RSS after build (max over ranks)", "peak RSS (max over ranks)",
               "state table per rank", "peak CUDA allocated"]
    return markdown_table(headers, rows)


# ---- main ---------------------------------------------------------------------------------------

def parse(argv: list[str] | None) -> Plan:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="state at K=2 for two sizes; one 2-step run per variant")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=5)
    args = p.parse_args(argv)
    gpus = torch.cuda.device_count() if args.device == "cuda" else 2
    rss_worlds = tuple(k for k in (1, 2) if k <= gpus)  # one GPU per rank under NCCL
    if args.quick:
        return Plan((2,), (1000, 100_003), (1,), args.batch_size, 2, (CC3M_DATA_SIZE,), args.device)
    return Plan((1, 2, 3), (1000, 100_003, CC3M_DATA_SIZE), rss_worlds, args.batch_size, args.steps,
                (CC3M_DATA_SIZE, LAION_DATA_SIZE), args.device)


def main(argv: list[str] | None = None) -> None:
    plan = parse(argv)
    info = machine()
    measured = {k: run_on_ranks(k, rank_state_bytes, plan.state_sizes) for k in plan.state_worlds}
    rows = [row for k, per_rank in measured.items() for row in state_rows(k, per_rank)]
    runs = training_memory(plan)
    body = "\n\n".join([
        "### Per-sample state, measured on real gloo processes",
        "Bytes of each rank's ShardedState table as FastCLIPObjective allocates it; pair i lives on rank i % K "
        "at slot i // K, so every rank holds ceil(n/K) rows (plus one spare row that absorbs the writes of "
        "rows it does not own).",
        state_table(rows),
        "### Per-sample state at dataset scale: ceil(n/K) * C * 4 bytes per rank vs the reference's replica",
        "Bytes per pair per rank: 8 / K for v0/v1/v3 (log u1, log u2 in float32: the reference's 2 floats), "
        "40 / K for v2 (the reference's 10 floats); the reference keeps all n pairs on every rank (8 and 40 "
        "bytes per pair per rank), so the saving is K for every version.",
        formula_table(),
        f"### Peak memory of short training runs ({plan.device}, b={plan.rss_batch}, {plan.rss_steps} steps, "
        "fresh process per run)",
        "RSS includes the Python interpreter, torch and open_clip (~hundreds of MiB) and the model, its "
        "gradients and AdamW moments; FastCLIP-v3 adds its state table (its own column), allocated once "
        "at start: a step adds nothing that grows with data_size.",
        training_table(runs),
    ])
    data = {"plan": plan.__dict__, "state_measured": {str(k): v for k, v in measured.items()}, "runs": runs}
    path = write_report("memory", "Per-rank memory: sharded per-sample state and peak RSS", body, data, info)
    print(path.read_text())


if __name__ == "__main__":
    main()
