"""Context-parallel FLASH attention: ``subq.distributed.flash_chunk_attention``, the sequence split across ranks."""

from __future__ import annotations

import torch
import torch.distributed as dist

from subq._utils import autocast_inputs, check_bool, check_int_choice
from subq.distributed import _comm
from subq.ops import flash as _flash
from subq.ops.flash import CHUNK_SIZES


def flash_chunk_attention(
    q_quad: torch.Tensor,
    k_quad: torch.Tensor,
    q_lin: torch.Tensor,
    k_lin: torch.Tensor,
    v: torch.Tensor,
    u: torch.Tensor | None = None,
    rel_bias: torch.Tensor | None = None,
    chunk_size: int = 256,
    causal: bool = False,
    quad_scale: float | None = None,
    lin_scale: float | None = None,
    group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    r""":func:`subq.ops.flash_chunk_attention` over a sequence split across the ranks of ``group``.

    Rank r holds positions ``[o_r, o_r + L_r)``, contiguous and in rank order: ``q_quad, k_quad, q_lin, k_lin, v``
    and ``u`` are this rank's shards ``(batch, L_r, ...)``. The shards are cut at chunk boundaries: every shard but
    the last rank's must be a multiple of ``chunk_size`` (the last may be any length, so the sequence's last chunk
    may be short, as in the op). The result is this rank's shard of the op's output on the whole sequence, with the
    same options and dtypes; ``group=None`` or a one-rank group is exactly the op. ``lin_scale`` defaults to 1/L of
    the whole sequence, L = Σ L_r.

    Method: chunks never straddle ranks, so the quadratic (in-chunk) part is local, and the linear part needs only
    the ranks' sums ``Σ K_linᵀV (batch, S, E)``. Each rank runs the op on its shard (its own chunks' linear terms
    included) and adds ``lin_scale · Q_lin · K`` (⊙ u) in float32 (float64 for float64), where K is the exclusive
    prefix over ranks of those sums when ``causal`` (an all-gather) and their sum over the other ranks when
    bidirectional (an all-reduce, minus its own). Communication O(batch·S·E) per rank, whatever L is, plus one tiny
    all-gather of the shard lengths and shapes (a host sync). The backward is autograd through both.

    Gradients: the sharded inputs get their own shard's gradient; ``rel_bias`` (replicated) gets a partial gradient
    on each rank whose sum over the ranks is the single-process gradient (DDP over the group sums it). Every rank
    must backpropagate through its output: the backward runs collectives.
    """
    group = _comm.check_group(group)
    rank, world = _comm.rank_and_size(group)
    if world == 1:
        return _flash.flash_chunk_attention(q_quad, k_quad, q_lin, k_lin, v, u, rel_bias, chunk_size, causal,
                                            quad_scale, lin_scale)
    q_quad, k_quad, q_lin, k_lin, v, u = autocast_inputs(q_quad, k_quad, q_lin, k_lin, v, u)
    chunk_size = check_int_choice(chunk_size, "chunk_size", CHUNK_SIZES)
    causal = check_bool(causal, "causal")
    _flash._check_features((q_quad, k_quad, q_lin, k_lin), ("q_quad", "k_quad", "q_lin", "k_lin"), v, u)
    batch, seqlen, qk_dim = q_lin.shape
    lengths = _comm.gather_shard_layout(seqlen, {
        "the batch size": batch,
        "the feature sizes (S, E)": (qk_dim, v.shape[-1]),
        "v.dtype": v.dtype,
        "chunk_size": chunk_size,
        "causal": causal,
        "whether u, rel_bias are given (0/1 each)": (u is not None, rel_bias is not None),
    }, v.device, group)
    for r, length in enumerate(lengths[:-1]):
        if length % chunk_size:
            raise ValueError(f"every shard but the last must be a multiple of chunk_size ({chunk_size}) so chunks do "
                             f"not straddle ranks; rank {r}'s shard has length {length}")
    if lin_scale is None:
        lin_scale = 1.0 / max(sum(lengths), 1)
    out = _flash.flash_chunk_attention(q_quad, k_quad, q_lin, k_lin, v, u, rel_bias, chunk_size, causal,
                                       quad_scale, lin_scale)
    lin_scale = float(lin_scale)  # the op has checked it

    with torch.autocast(v.device.type, enabled=False):  # the correction in float32 (float64), as the op
        return _add_linear_context(out, q_lin, k_lin, v, u, lin_scale, causal, rank, group)


def _add_linear_context(out, q_lin, k_lin, v, u, lin_scale, causal, rank, group):
    cdtype = torch.float64 if v.dtype == torch.float64 else torch.float32
    kv = torch.einsum("bls,ble->bse", k_lin.to(cdtype), v.to(cdtype))     # this shard's Σ K_linᵀV
    if causal:
        gathered = _comm.all_gather(kv, group)                              # (W, b, S, E)
        if rank == 0:  # nothing earlier; the backward's all-reduce still needs this rank
            return _comm.attach(out, gathered)
        context = gathered[:rank].sum(0)
    else:
        context = _comm.all_reduce_sum(kv, group) - kv
    corr = lin_scale * torch.einsum("bls,bse->ble", q_lin.to(cdtype), context)
    if u is not None:
        corr = corr * u.to(cdtype)
    return (out.to(cdtype) + corr).to(v.dtype)
