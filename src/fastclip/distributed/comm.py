"""The collectives the training step needs, as no-ops at world size 1, with a byte count per kind.

Benchmarks read `COUNTER` to report the bytes each collective kind moves per step (payload sent by
this rank, i.e. the size of the tensor it contributes).
"""

from __future__ import annotations

from collections import Counter

import torch
import torch.distributed as dist

COUNTER: Counter = Counter()



def _collective(new_name: str, old_name: str):
    """torch 2.14 renamed the tensor-to-tensor collectives; older releases only have the old names.
    Looked up at each call, so that tools which wrap torch.distributed functions see our calls."""
    return getattr(dist, new_name, None) or getattr(dist, old_name)


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _count(kind: str, tensor: torch.Tensor) -> None:
    COUNTER[kind] += tensor.numel() * tensor.element_size()
    COUNTER[kind + ":calls"] += 1


def all_gather_no_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's `tensor` along dim 0 (rank order); the result carries no gradient."""
    k = world_size()
    tensor = tensor.detach()
    if k == 1:
        return tensor
    tensor = tensor.contiguous()
    _count("all_gather", tensor)
    out = torch.empty((k * tensor.shape[0], *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
    _collective("all_gather_single", "all_gather_into_tensor")(out, tensor)
    return out


def reduce_scatter_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over ranks and hand rank k the k-th of K equal chunks along dim 0."""
    k = world_size()
    if k == 1:
        return tensor
    tensor = tensor.contiguous()
    _count("reduce_scatter", tensor)
    out = torch.empty((tensor.shape[0] // k, *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
    if dist.get_backend() == "gloo":
        # gloo has no reduce_scatter: exchanging the chunks (all-to-all) and summing what arrives
        # moves the same bytes as a reduce-scatter, half those of an all-reduce.
        received = torch.empty_like(tensor)
        dist.all_to_all_single(received, tensor)
        torch.sum(received.view(k, *out.shape), dim=0, out=out)
    else:
        _collective("reduce_scatter_single", "reduce_scatter_tensor")(out, tensor)
    return out


def gather_to_all(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """All-gather several same-length tensors in one collective by packing them side by side.

    Each tensor has shape (b,) or (b, c); they are packed into one (b, total) float tensor, so a
    step pays one collective however many per-sample arrays it moves.
    """
    packed = torch.cat([t.reshape(t.shape[0], -1) for t in tensors], dim=1)
    gathered = all_gather_no_grad(packed)
    out, col = [], 0
    for t in tensors:
        width = t[0].numel() if t.dim() > 1 else 1
        piece = gathered[:, col : col + width]
        out.append(piece.reshape(gathered.shape[0], *t.shape[1:]))
        col += width
    return out


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` summed over ranks, in place (unchanged at world size 1)."""
    if world_size() > 1:
        _count("all_reduce", tensor)
        dist.all_reduce(tensor)
    return tensor


def gather_rows(rows: torch.Tensor) -> torch.Tensor:
    """Every rank's rows joined in rank order on every rank; ranks may hold different numbers of rows
    (padded in transit). A rank without rows may pass a (0, 0) tensor: the others give the row shape."""
    if world_size() == 1:
        return rows
    shapes = all_gather_no_grad(torch.tensor([list(rows.shape)], device=rows.device)).tolist()
    padded_shape = [max(column) for column in zip(*shapes)]
    padded = rows.new_zeros(padded_shape)
    if len(rows):
        padded[: len(rows)] = rows
    gathered = all_gather_no_grad(padded)
    block = padded_shape[0]
    return torch.cat([gathered[r * block : r * block + shape[0]] for r, shape in enumerate(shapes)])
