"""Context-parallel short causal convolution: ``subq.distributed.causal_conv1d``, the sequence split across ranks."""

from __future__ import annotations

import importlib

import torch
import torch.distributed as dist
import torch.nn.functional as F

from subq.distributed import _comm

# subq.ops re-exports the function under the module's name, so the module is fetched by its path.
_conv = importlib.import_module("subq.ops.causal_conv1d")


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
    initial_states: torch.Tensor | None = None,
    return_final_states: bool = False,
    activation: str | None = None,
    group: dist.ProcessGroup | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    r""":func:`subq.ops.causal_conv1d` over a sequence split across the ranks of ``group`` (context parallelism).

    Rank r holds positions ``[o_r, o_r + L_r)``, contiguous and in rank order: ``x (batch, dim, L_r)`` and
    ``seq_idx (batch, L_r)`` are this rank's shards. Every shard but the last rank's must hold at least W-1
    positions (W = ``weight.shape[1]``), so that one neighbour supplies the whole halo (shorter ones raise a
    ValueError; the last shard may be any length, even 0). The result is this rank's shard of the op's output on
    the whole sequence, same options and dtypes; ``group=None`` or a one-rank group is exactly the op.

    Method: each rank sends its last W-1 inputs to the next (one point-to-point send of batch·dim·(W-1) values,
    whatever L is), which uses them as its ``initial_states``; rank 0 uses the caller's ``initial_states``. With
    ``seq_idx`` the halo and its indices are prepended to the shard instead (the op takes no initial_states with
    seq_idx), so a sequence starting at the shard's first position does not see it; y is then a view into the
    longer output. The backward is autograd through the op and the send, whose backward sends the halo's gradient
    back to the previous rank.

    ``return_final_states``: the whole sequence's last W-1 inputs, the same on every rank (the last rank's, by an
    all-gather of batch·dim·(W-1) values per rank).

    Gradients: x gets its own shard's gradient. ``weight`` and ``bias`` (replicated) get on each rank a partial
    gradient whose sum over the ranks is the single-process gradient (DDP over the group sums them);
    ``initial_states`` is read on rank 0 only (every rank passes it or none does), and only rank 0's gets a gradient.
    Every rank must backpropagate through its ``y``: the backward runs collectives.
    """
    group = _comm.check_group(group)
    rank, world = _comm.rank_and_size(group)
    if world == 1:
        return _conv.causal_conv1d(x, weight, bias, seq_idx, initial_states, return_final_states, activation)
    _conv._silu(activation)
    _conv._check_weight_bias(x, weight, bias, "(batch, dim, seqlen)")
    if seq_idx is not None and initial_states is not None:
        raise ValueError("initial_states cannot be combined with seq_idx (packed sequences start from zeros)")
    batch, dim, seqlen = x.shape
    halo_len = weight.shape[1] - 1
    lengths = _comm.gather_shard_layout(seqlen, {
        "x's (batch, dim)": (batch, dim),
        "the width weight.shape[1]": weight.shape[1],
        "x.dtype": x.dtype,
        "whether bias, seq_idx, initial_states are given (0/1 each)":
            (bias is not None, seq_idx is not None, initial_states is not None),
        "activation (0: none, 1: silu)": activation is not None,
        "return_final_states": bool(return_final_states),
    }, x.device, group)
    for r, length in enumerate(lengths[:-1]):
        if length < halo_len:
            raise ValueError(f"every shard but the last must hold at least width - 1 = {halo_len} positions (the "
                             f"halo the next rank needs); rank {r}'s x has seqlen {length}")

    # The last rank sends nothing; its tail is padded only to give the receive buffer the halo's shape.
    halo = _comm.shift_to_next_rank(_last_columns(x, halo_len), group)
    if seq_idx is not None:
        halo_seq = _comm._shift(_last_columns(seq_idx, halo_len).contiguous(), group, +1)
    if rank == 0:
        y, final = _conv.causal_conv1d(x, weight, bias, seq_idx, initial_states, True, activation)
        y = _comm.attach(y, halo)  # rank 0 uses no halo, but must receive its gradient for rank 1
    elif seq_idx is None:
        y, final = _conv.causal_conv1d(x, weight, bias, None, halo, True, activation)
    else:
        y, final = _conv.causal_conv1d(torch.cat([halo, x], dim=-1), weight, bias,
                                       torch.cat([halo_seq, seq_idx], dim=-1), None, True, activation)
        y = y[..., halo_len:]
    if not return_final_states:
        return y
    finals = _comm.all_gather(final, group)
    # y reaches the gather too, so every rank runs its backward even where only y is used.
    return _comm.attach(y, finals), finals[-1]


def _last_columns(t: torch.Tensor, n: int) -> torch.Tensor:
    """t's last n entries along the last axis, zero-padded in front when t is shorter."""
    tail = t[..., max(t.shape[-1] - n, 0):]
    return F.pad(tail, (n - tail.shape[-1], 0)) if tail.shape[-1] < n else tail
