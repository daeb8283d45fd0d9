"""The collectives subq's parallel layers use: ``torch.distributed`` calls made differentiable, plus a byte counter.

Every collective here runs on NCCL (CUDA tensors) and gloo (CPU tensors) alike; nothing is home-made transport.
``bytes_sent()`` counts what this process sends under the ring algorithms both backends use: an all-gather of an
n-byte piece sends (W-1)·n bytes, an all-reduce of n bytes 2·(W-1)/W·n, a send n. Tests use it to prove that the
communication of a context-parallel layer does not grow with the sequence length.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.distributed as dist

_SENT = {"bytes": 0}


def bytes_sent() -> int:
    """Bytes this process has sent through subq's collectives since the last ``reset_bytes_sent``."""
    return _SENT["bytes"]


def reset_bytes_sent() -> None:
    _SENT["bytes"] = 0


@contextmanager
def counting_bytes():
    """``with counting_bytes() as sent: ...`` then ``sent()`` is the bytes sent inside the block (fwd and bwd)."""
    start = _SENT["bytes"]
    end = []
    try:
        yield lambda: (end[0] if end else _SENT["bytes"]) - start
    finally:
        end.append(_SENT["bytes"])


def rank_and_size(group: dist.ProcessGroup | None) -> tuple[int, int]:
    """This process's rank in ``group`` and the group's size; (0, 1) when there is no group to split over."""
    if group is None or not dist.is_available() or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def check_group(group: object, name: str = "group") -> dist.ProcessGroup | None:
    """A process group (or None: one process). Raises if torch.distributed is not initialised."""
    if group is None:
        return None
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"{name} must be a torch.distributed ProcessGroup or None, got {type(group).__name__}")
    if not dist.is_initialized():
        raise RuntimeError(f"{name} was given but torch.distributed is not initialised "
                           "(call torch.distributed.init_process_group first)")
    return group


def _count(nbytes: float) -> None:
    _SENT["bytes"] += int(nbytes)


def _all_gather(x: torch.Tensor, group) -> torch.Tensor:
    size = dist.get_world_size(group)
    x = x.contiguous()
    out = torch.empty((size,) + tuple(x.shape), dtype=x.dtype, device=x.device)
    dist.all_gather(list(out.unbind(0)), x, group=group)
    _count((size - 1) * x.numel() * x.element_size())
    return out


def _all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    size = dist.get_world_size(group)
    x = x.contiguous().clone()
    dist.all_reduce(x, group=group)
    _count(2 * (size - 1) / size * x.numel() * x.element_size())
    return x


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_gather(x, group)

    @staticmethod
    def backward(ctx, grad):
        # Rank r's piece was used by every rank: its gradient is the sum of their gradients for slot r. An
        # all-reduce of the stacked gradients (gloo has no reduce-scatter) and this rank's slot.
        return _all_reduce(grad, ctx.group)[dist.get_rank(ctx.group)], None


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad, ctx.group), None


class _CopyToParallel(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad, ctx.group), None


class _ReduceFromParallel(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _ShiftToNext(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _shift(x, group, +1)

    @staticmethod
    def backward(ctx, grad):
        return _shift(grad, ctx.group, -1), None


def _shift(x: torch.Tensor, group, step: int) -> torch.Tensor:
    """Rank r sends x to rank r+step and returns what rank r-step sent (zeros where there is no such rank)."""
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    x = x.contiguous()
    out = torch.zeros_like(x)
    ops = []
    if 0 <= rank + step < size:
        ops.append(dist.P2POp(dist.isend, x, dist.get_global_rank(group, rank + step), group))
        _count(x.numel() * x.element_size())
    if 0 <= rank - step < size:
        ops.append(dist.P2POp(dist.irecv, out, dist.get_global_rank(group, rank - step), group))
    if ops:
        for work in dist.batch_isend_irecv(ops):
            work.wait()
    return out


def all_gather(x: torch.Tensor, group) -> torch.Tensor:
    """Every rank's x stacked along a new first dim, (W, *x.shape); the backward sums each slot's gradients."""
    return _AllGather.apply(x, group)


def all_reduce_sum(x: torch.Tensor, group) -> torch.Tensor:
    """The sum of x over the group, where each rank uses the sum in its own way (its gradient is all-reduced)."""
    return _AllReduceSum.apply(x, group)


def copy_to_parallel(x: torch.Tensor, group) -> torch.Tensor:
    """Megatron's f: identity forward; the backward all-reduces (x feeds each rank's slice of a parallel layer)."""
    return _CopyToParallel.apply(x, group)


def reduce_from_parallel(x: torch.Tensor, group) -> torch.Tensor:
    """Megatron's g: all-reduce forward; identity backward (every rank continues with the same sum)."""
    return _ReduceFromParallel.apply(x, group)


def shift_to_next_rank(x: torch.Tensor, group) -> torch.Tensor:
    """Rank r gets rank r-1's x (rank 0 gets zeros): a halo from the previous shard; the gradient is sent back."""
    return _ShiftToNext.apply(x, group)
