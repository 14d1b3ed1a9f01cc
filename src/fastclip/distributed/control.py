"""Host-side agreement between ranks: small CPU messages on a gloo group, never a GPU synchronisation.

Training collectives (NCCL on GPUs) carry tensors; decisions that every rank must take at the same
step (stop on a signal, save now, give up after non-finite steps, which checkpoint to resume) travel
here as a few integers or small Python objects. At world size 1 every call is local.
"""

from __future__ import annotations

import datetime
import enum
import io
from typing import Any

import torch
import torch.distributed as dist

from . import comm

_group: Any = None


def init_control_group(timeout: datetime.timedelta) -> None:
    """Create the CPU group (collective: every rank calls it right after the process group starts).

    A gloo default group serves as it is; an NCCL job gets a gloo group beside it.
    """
    global _group
    if comm.world_size() > 1 and dist.get_backend() != "gloo":
        _group = dist.new_group(backend="gloo", timeout=timeout)


def close_control_group() -> None:
    global _group
    _group = None


def broadcast_from_master(value: Any) -> Any:
    """Rank 0's `value` on every rank."""
    if comm.world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0, group=_group)
    return box[0]


def gather_to_master(value: Any) -> list[Any] | None:
    """Every rank's `value`, in rank order, on rank 0 (None elsewhere). K small objects, never O(n).

    Values travel as torch.save bytes and are read back with weights_only (tensors inside, such as RNG
    states, do not survive gather_object's own unpickling in every torch release).
    """
    if comm.world_size() == 1:
        return [value]
    buffer = io.BytesIO()
    torch.save(value, buffer)
    out = [None] * comm.world_size() if comm.rank() == 0 else None
    dist.gather_object(buffer.getvalue(), out, dst=0, group=_group)
    return None if out is None else [torch.load(io.BytesIO(b), weights_only=True) for b in out]


def all_ranks(ok: bool) -> bool:
    """True when `ok` holds on every rank."""
    if comm.world_size() == 1:
        return ok
    flag = torch.tensor([int(ok)], dtype=torch.int32)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=_group)
    return bool(flag.item())


def first_error(error: str | None) -> str | None:
    """The first rank's error message (by rank order), if any rank has one: every rank raises alike."""
    if comm.world_size() == 1:
        return error
    errors = [None] * comm.world_size()
    dist.all_gather_object(errors, error, group=_group)
    return next((e for e in errors if e is not None), None)


_PEER_FAILURE_TEXT = ("timed out", "timeout", "connection closed", "connection reset", "broken pipe")


def is_peer_failure(error: BaseException) -> bool:
    """Whether a collective failed because another rank hung or died (gloo raises plain RuntimeErrors)."""
    if isinstance(error, dist.DistError):
        return True
    return isinstance(error, RuntimeError) and any(text in str(error).lower() for text in _PEER_FAILURE_TEXT)


class Request(enum.IntFlag):
    """Why a rank wants the run to do something at the next agreed step."""

    NONE = 0
    STOP_SIGNAL = 1  # SIGTERM, SIGUSR1 or SIGINT: save and exit
    SAVE = 2  # --save-every-minutes: rank 0's clock says a checkpoint is due
    NON_FINITE = 4  # --max-bad-steps consecutive non-finite steps


_REQUEST_BITS = 8


class StopAgreement:
    """Every rank learns at the same step what any rank requested, with one step of delay.

    Each step starts an all-reduce (max per request bit) of this rank's requests on the CPU group and
    reads the one started at the previous step, which has long arrived: no rank waits for a round
    trip, and no GPU stream is synchronised. All ranks read the same combined value at the same step.
    """

    def __init__(self) -> None:
        self._pending: tuple[Any, torch.Tensor] | None = None

    def poll(self, requests: Request) -> Request:
        """Send this step's requests; return those every rank sent at the previous step."""
        if comm.world_size() == 1:
            return requests
        agreed = self._take()
        bits = torch.tensor([(int(requests) >> i) & 1 for i in range(_REQUEST_BITS)], dtype=torch.int32)
        self._pending = (dist.all_reduce(bits, op=dist.ReduceOp.MAX, group=_group, async_op=True), bits)
        return agreed

    def _take(self) -> Request:
        if self._pending is None:
            return Request.NONE
        work, bits = self._pending
        self._pending = None
        work.wait()
        return Request(sum(int(bit) << i for i, bit in enumerate(bits.tolist())))

    def drain(self) -> None:
        """Complete the last exchange (before the process group goes away)."""
        self._take()
