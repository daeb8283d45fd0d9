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
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError("this process is not a member of the process group it was given")
    return rank, dist.get_world_size(group)


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


class _Attach(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, *anchors):
        ctx.anchors = [(a.shape, a.dtype, a.device) for a in anchors]
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return (grad, *(torch.zeros(shape, dtype=dtype, device=device) for shape, dtype, device in ctx.anchors))


def attach(x: torch.Tensor, *anchors: torch.Tensor) -> torch.Tensor:
    """x itself, whose backward also reaches ``anchors`` (with zero gradient).

    A collective's backward is a collective too, so every rank must run it, and autograd runs a node only when the
    loss reaches it. An output that does not depend on what a collective returned on this rank (rank 0 of a causal
    scan, say) is attached to it, so that every rank's backward runs the same collectives. Autograd runs the nodes
    of one device in reverse creation order, so the ranks also run them in the same order.
    """
    anchors = tuple(a for a in anchors if a.requires_grad)
    return _Attach.apply(x, *anchors) if anchors else x


def gather_shard_layout(length: int, invariants: dict[str, object], device: torch.device,
                        group: dist.ProcessGroup) -> list[int]:
    """Every rank's shard length, after checking that ``invariants`` (sizes, dtypes, which options are given) agree.

    One tiny all-gather of int64s (and a host sync: the lengths decide what the op computes). A mismatch raises the
    same ValueError on every rank, naming the value and the ranks, instead of a collective hanging on mismatched
    sizes later.
    """
    names, codes, decoders = [], [], []
    for name, value in invariants.items():
        if isinstance(value, torch.dtype):
            code, decode = [_DTYPES.index(value)], (lambda c: str(_DTYPES[c[0]]))
        elif isinstance(value, (tuple, list)):
            code, decode = [int(v) for v in value], tuple
        else:
            code, decode = [int(value)], (lambda c: c[0])
        names.append((name, len(code)))
        codes.extend(code)
        decoders.append(decode)
    mine = torch.tensor([int(length), *codes], dtype=torch.int64, device=device)
    rows = _all_gather(mine, group).tolist()
    offset = 1
    for (name, width), decode in zip(names, decoders, strict=True):
        values = [tuple(row[offset:offset + width]) for row in rows]
        for rank, value in enumerate(values):
            if value != values[0]:
                raise ValueError(f"{name} must agree across the ranks of the context-parallel group: rank 0 has "
                                 f"{decode(values[0])}, rank {rank} has {decode(value)}")
        offset += width
    return [row[0] for row in rows]


_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int32, torch.int64)
