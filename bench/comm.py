"""Bytes per step per collective kind: measured at K = 2 (gloo), and analytic for b, d and K of real runs.

Measured, per variant (OpenCLIP `--local-loss --gather-with-grad`, FastCLIP-v0..v3), over real
`Trainer` steps of the tiny model on 2 processes, three ways:
- `fastclip.distributed.comm.COUNTER`, the project's own accounting (OpenCLIP's is computed by its
  objective, since open_clip's ClipLoss calls torch.distributed itself);
- every torch.distributed collective intercepted in the process (what really ran, kind included);
- DDP's gradient all-reduce, which neither sees (the C++ reducer), through a counting comm hook.
Bytes are the payload a rank contributes (COUNTER's convention): an all-gather's input, a
reduce-scatter's or all-reduce's whole input, a scatter root's list.

    python bench/comm.py           # full: b = 64, 128 measured; analytic table
    python bench/comm.py --quick   # b = 64, 1 step
"""

from __future__ import annotations

import argparse
import functools
import inspect
import itertools
import logging
from collections import Counter
from typing import Any, Callable

import open_clip
import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

from common import machine, markdown_table, write_report
from fastclip.distributed import comm
from ranks import (CC3M_DATA_SIZE, EMBED_DIM, FASTCLIP_VERSIONS, MODEL, OPENCLIP, build_trainer,
                   run_on_ranks, run_window, synthetic_batches)
from tables import human_bytes

WORLD = 2
FLOAT = 4  # bytes of a float32
MEASURED = (OPENCLIP, *FASTCLIP_VERSIONS)
KINDS = ("all_gather", "reduce_scatter", "all_reduce", "scatter", "DDP all_reduce")
# Per-sample columns: state (log_u1, log_u2; v2: u, bound, tau, exp_avg, exp_avg_sq per side) and
# the extra per-sample values term 2 needs (the positive; v2 also the two pre-update taus).
STATE_COLUMNS = {"fastclip-v0": 2, "fastclip-v1": 2, "fastclip-v2": 10, "fastclip-v3": 2}
EXTRA_COLUMNS = {"fastclip-v0": 1, "fastclip-v1": 1, "fastclip-v2": 3, "fastclip-v3": 1}
INDEX_COLUMNS = 2  # an int64 index travels as two float32 feature columns
REFERENCE_MODELS = {"RN50": 1024, "ViT-B-32": 512}  # for scale: their DDP gradient all-reduce


# ---- interception -------------------------------------------------------------------------------

def _nbytes(tensors: list[torch.Tensor] | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors or [])


# torch.distributed function -> (kind, payload this rank contributes, from its bound arguments)
_PAYLOAD: dict[str, tuple[str, Callable[[dict], int]]] = {
    "all_gather": ("all_gather", lambda a: _nbytes([a["tensor"]])),
    "all_gather_into_tensor": ("all_gather", lambda a: _nbytes([a["input_tensor"]])),
    "all_gather_single": ("all_gather", lambda a: _nbytes([a["input_tensor"]])),
    "reduce_scatter_single": ("reduce_scatter", lambda a: _nbytes([a["input"]])),
    "all_to_all_single": ("reduce_scatter", lambda a: _nbytes([a["input"]])),  # gloo's reduce-scatter
    "all_reduce": ("all_reduce", lambda a: _nbytes([a["tensor"]])),
    "reduce_scatter_tensor": ("reduce_scatter", lambda a: _nbytes([a["input"]])),
    "scatter": ("scatter", lambda a: _nbytes(a["scatter_list"])),  # only the root passes a list
}
INTERCEPTED: Counter = Counter()
_prefix = ""  # "DDP " while DDP's comm hook runs


def _counting(name: str, fn: Callable) -> Callable:
    kind, payload = _PAYLOAD[name]
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        INTERCEPTED[_prefix + kind] += payload(bound.arguments)
        INTERCEPTED[_prefix + kind + ":calls"] += 1
        return fn(*args, **kwargs)

    return wrapper


def intercept_collectives() -> None:
    """Route torch.distributed's collectives through counters (callers look them up at call time)."""
    for name in _PAYLOAD:
        if hasattr(dist, name):
            setattr(dist, name, _counting(name, getattr(dist, name)))


def _ddp_counting_hook(process_group, bucket):  # unannotated: DDP rejects string annotations
    """DDP's default all-reduce, its collective counted under 'DDP all_reduce'."""
    global _prefix
    _prefix = "DDP "
    try:
        return default_hooks.allreduce_hook(process_group, bucket)
    finally:
        _prefix = ""


# ---- measurement --------------------------------------------------------------------------------

def rank_bytes(batch_sizes: tuple[int, ...], steps: int) -> dict:
    """On each rank: {b: {variant: {"counter", "intercepted": bytes/calls per step, "grad_params"}}}."""
    intercept_collectives()
    cpu = torch.device("cpu")
    results: dict[str, dict] = {}
    for b in batch_sizes:
        batches = itertools.cycle(synthetic_batches(b, 2, CC3M_DATA_SIZE, cpu))
        results[str(b)] = {}
        for variant in MEASURED:
            trainer = build_trainer(variant, b, CC3M_DATA_SIZE, cpu)
            trainer.model.register_comm_hook(None, _ddp_counting_hook)
            run_window(trainer, batches, 1)
            comm.COUNTER.clear()
            INTERCEPTED.clear()
            run_window(trainer, batches, steps)
            results[str(b)][variant] = {
                "counter": {k: v / steps for k, v in comm.COUNTER.items()},
                "intercepted": {k: v / steps for k, v in INTERCEPTED.items()},
                "grad_params": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
            }
    return results


# ---- formulas -----------------------------------------------------------------------------------

def payload_formula(variant: str, b: int, d: int, k: int) -> dict[str, int]:
    """Bytes a rank contributes per step, by COUNTER's kinds (what `rank_bytes` measures).

    FastCLIP: all-gather of features + index, 4b(2d + 2), and of the new per-sample values,
    4b(C + extra); one reduce-scatter over the gathered batch's state, 4KbC.
    OpenCLIP: all-gather of both feature sets, 2 * 4bd; backward reduction of their gradients,
    2 * 4Kbd (COUNTER calls it all_reduce; gloo runs it as K scatters, NCCL as a reduce-scatter).
    """
    if variant == OPENCLIP:
        return {"all_gather": 2 * FLOAT * b * d, "all_reduce": 2 * FLOAT * k * b * d}
    columns = STATE_COLUMNS[variant]
    return {"all_gather": FLOAT * b * (2 * d + INDEX_COLUMNS + columns + EXTRA_COLUMNS[variant]),
            "reduce_scatter": FLOAT * k * b * columns}


def wire_formula(variant: str, b: int, d: int, k: int) -> float:
    """Bytes a rank sends per step with bandwidth-optimal (ring) collectives.

    all-gather of x bytes per rank: (K-1) x; reduce-scatter of y bytes: (K-1)/K y;
    all-reduce of y bytes: 2 (K-1)/K y. Hence
    OpenCLIP: 2 (K-1) 4bd + 2 (K-1)/K 4Kbd = 16 bd (K-1);
    FastCLIP: (K-1) 4b (2d + 2) + (K-1) 4bC + (K-1) 4b (C + extra) = 4b (K-1) (2d + 2 + 2C + extra).
    """
    if variant == OPENCLIP:
        return 16 * b * d * (k - 1)
    columns = STATE_COLUMNS[variant]
    return FLOAT * b * (k - 1) * (2 * d + INDEX_COLUMNS + 2 * columns + EXTRA_COLUMNS[variant])


def ring_bytes_from_counter(counter: dict[str, float], k: int) -> float:
    """What the measured payloads cost with ring collectives: all-gathers (K-1) x, reductions that
    hand each rank a slice (the reduce-scatter, OpenCLIP's gradient reduction) (K-1)/K y."""
    reductions = counter.get("reduce_scatter", 0) + counter.get("all_reduce", 0)
    return counter.get("all_gather", 0) * (k - 1) + reductions * (k - 1) / k


def ddp_wire_bytes(params: int, k: int) -> float:
    """Ring all-reduce of the gradients, whatever the objective: 2 (K-1)/K 4P."""
    return 2 * (k - 1) / k * FLOAT * params


def reference_params() -> dict[str, int]:
    """Parameter counts of open_clip models of the analytic table's d, built on the meta device (no memory)."""
    logging.disable(logging.WARNING)  # "no pretrained weights loaded": none wanted
    try:
        with torch.device("meta"):
            return {name: sum(p.numel() for p in open_clip.create_model(name, device="meta").parameters())
                    for name in REFERENCE_MODELS}
    finally:
        logging.disable(logging.NOTSET)


# ---- tables -------------------------------------------------------------------------------------

def measured_rows(b: int, variant: str, measured: dict) -> list[list[str]]:
    """Rows COUNTER / intercepted / formula of one variant: bytes per step by kind, and whether the
    three agree (objective total; DDP intercepted vs 4P; COUNTER's kinds vs the formula's)."""
    formula = payload_formula(variant, b, EMBED_DIM, WORLD)
    formula["DDP all_reduce"] = FLOAT * measured["grad_params"]
    sources = {"COUNTER": measured["counter"], "intercepted torch.distributed": measured["intercepted"],
               "formula (DDP: 4P)": formula}
    totals = {source: sum(values.get(kind, 0) for kind in KINDS[:-1]) for source, values in sources.items()}
    agree = (len(set(totals.values())) == 1
             and measured["intercepted"].get("DDP all_reduce") == formula["DDP all_reduce"]
             and all(measured["counter"].get(kind, 0) == formula.get(kind, 0) for kind in KINDS[:-1]))
    rows = [[str(b), variant, source, *(_cell(values, kind) for kind in KINDS), human_bytes(totals[source]), ""]
            for source, values in sources.items()]
    rows[-1][-1] = "yes" if agree else "NO"
    return rows


def _cell(values: dict, kind: str) -> str:
    if kind not in values:
        return "-"
    calls = values.get(kind + ":calls")
    return f"{values[kind]:.0f} B ({calls:g} calls)" if calls else f"{values[kind]:.0f} B"


def measured_table(results: dict) -> str:
    rows = [row for b, per_variant in results.items() for variant, measured in per_variant.items()
            for row in measured_rows(int(b), variant, measured)]
    headers = ["b", "variant", "source", *KINDS, "objective total", "all agree"]
    return markdown_table(headers, rows)


def ring_check_table(results: dict) -> str:
    """The ring formula against the measured payloads converted to ring bytes, at K = WORLD."""
    rows = []
    for b, per_variant in results.items():
        for variant, measured in per_variant.items():
            converted = ring_bytes_from_counter(measured["counter"], WORLD)
            formula = wire_formula(variant, int(b), EMBED_DIM, WORLD)
            rows.append([b, variant, f"{converted:.0f} B", f"{formula:.0f} B", "yes" if converted == formula else "NO"])
    return markdown_table(["b", "variant", "measured COUNTER as ring bytes", "ring formula", "equal"], rows)


def analytic_table(batch_sizes: tuple[int, ...], dims: tuple[int, ...], worlds: tuple[int, ...]) -> str:
    rows = []
    for b, d, k in itertools.product(batch_sizes, dims, worlds):
        openclip, v3, v2 = (wire_formula(v, b, d, k) for v in (OPENCLIP, "fastclip-v3", "fastclip-v2"))
        rows.append([str(b), str(d), str(k), human_bytes(openclip), human_bytes(v3), human_bytes(v2),
                     f"{v3 / openclip:.3f}"])
    headers = ["b", "d", "K", "OpenCLIP gather-with-grad", "FastCLIP v0/v1/v3", "FastCLIP v2", "v3 / OpenCLIP"]
    return markdown_table(headers, rows)


def ddp_table(worlds: tuple[int, ...]) -> str:
    params = reference_params()
    rows = [[name, str(REFERENCE_MODELS[name]), f"{p / 1e6:.1f}M", *(human_bytes(ddp_wire_bytes(p, k)) for k in worlds)]
            for name, p in params.items()]
    return markdown_table(["model", "d", "parameters P", *(f"K={k}" for k in worlds)], rows)


def report(results: dict, steps: int) -> str:
    worlds = (2, 4, 8, 16, 32, 64)
    return "\n\n".join([
        f"### Measured at K={WORLD} (gloo, {steps} steps, {MODEL} d={EMBED_DIM}), bytes per rank per step",
        "Payload a rank contributes (COUNTER's convention). OpenCLIP's COUNTER rows come from its objective's "
        "own estimate (open_clip calls torch.distributed directly); the intercepted rows are what ran: on gloo "
        "the backward of the gather-with-grad is K scatters per feature set, and the project's reduce_scatter "
        "is an all_to_all_single followed by a local sum (gloo has no reduce-scatter; this sends the same bytes "
        "as one). DDP's gradient all-reduce is counted by a comm hook, the same for every objective (v1 freezes "
        "logit_scale: one float less).",
        measured_table(results),
        "### Analytic, bytes sent per rank per step (ring collectives), objective only",
        wire_formula.__doc__.strip().replace("\n    ", "\n"),
        f"Check against the measurement (K={WORLD}, d={EMBED_DIM}):",
        ring_check_table(results),
        "C = 2 state columns for v0/v1/v3 (log_u1, log_u2) and 10 for v2; extra = 1 gathered column "
        "(the positive), 3 for v2 (positive, tau1, tau2); the index travels as 2 float32 columns.",
        analytic_table((128, 256), (512, 1024), worlds),
        "For scale, DDP's gradient all-reduce (every objective, independent of b), bytes sent per rank per step:",
        ddp_table(worlds),
    ])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="b = 64, 1 measured step")
    p.add_argument("--steps", type=int, default=3)
    args = p.parse_args(argv)
    batch_sizes, steps = ((64,), 1) if args.quick else ((64, 128), args.steps)
    info = machine()
    results = run_on_ranks(WORLD, rank_bytes, batch_sizes, steps)[0]
    path = write_report("comm", "Communication per step: measured at K = 2, analytic to K = 64",
                        report(results, steps), {"steps": steps, "measured": results}, info)
    print(path.read_text())


if __name__ == "__main__":
    main()
