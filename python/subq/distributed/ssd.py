"""Context-parallel SSD: ``subq.distributed.ssd_chunk_scan``, the sequence split across the ranks of a group."""

from __future__ import annotations

import torch
import torch.distributed as dist

from subq.distributed import _comm
from subq.ops import ssd as _ssd
from subq.reference.ssd import process_dt

NO_LIMIT = _ssd.NO_LIMIT


def ssd_chunk_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int = 256,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = NO_LIMIT,
    initial_states: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
    return_final_states: bool = False,
    group: dist.ProcessGroup | None = None,
    cu_seqlens: torch.Tensor | None = None,
    return_varlen_states: bool = False,
):
    r""":func:`subq.ops.ssd_chunk_scan` over a sequence split across the ranks of ``group`` (context parallelism).

    Rank r holds positions ``[o_r, o_r + L_r)`` of every sequence, contiguous and in rank order: ``x, dt, B, C, z``
    and ``seq_idx`` are this rank's shards ``(batch, L_r, ...)``; any ``L_r ≥ 1``, chunk multiple or not, and the
    shards may differ in length. The result is this rank's shard of what :func:`subq.ops.ssd_chunk_scan` gives on the
    whole sequence, with the same options and dtypes. ``group=None`` or a one-rank group is exactly that op.

    Method (state passing, the Mamba-2 paper §8.2): a shard's SSD map is affine in the state entering it,
    ``S_out = a · S_in + S_local``, with ``a = exp(A · Σ dt)`` over the shard per (batch, head) (0 when a
    ``seq_idx`` boundary falls inside the shard or at its start). Each rank runs the op on its shard from a zero
    state, all-gathers ``(S_local, a)``, O(batch·nheads·headdim·dstate) per rank whatever L is, finds its entering
    state by an exclusive scan over the ranks (rank 0 enters with ``initial_states`` or zero) and adds
    ``C_t · exp(A · Σ_{s≤t} dt_s) · S_in`` (times silu(z_t)) to its outputs before its first sequence boundary, in
    float32 (float64 for float64 inputs). The backward is autograd through the op, the all-gather (whose backward
    all-reduces the summaries' gradients) and the correction: the reverse scan over ranks. Besides the gather, one
    tiny all-gather checks the ranks' shapes and options agree (a host sync), and with ``seq_idx`` each rank sends
    its last index to the next (``batch`` integers).

    ``seq_idx (batch, L_r)`` is the global packed-sequence index, sharded like x (non-decreasing along the whole
    sequence); a boundary may fall on a shard boundary. ``cu_seqlens`` and ``return_varlen_states`` are not
    supported across ranks (pass seq_idx instead). ``return_final_states`` returns the state after the whole
    sequence, the same on every rank.

    Gradients: the sharded inputs get their own shard's gradient. The replicated inputs (``A, D, dt_bias,
    initial_states``, identical on every rank) get on each rank a partial gradient; their sum over the ranks is the
    single-process gradient (DDP over the context-parallel group sums them). A loss that uses ``final_states`` on
    several ranks counts each use. Every rank must backpropagate through its ``y``: the backward runs collectives.
    """
    group = _comm.check_group(group)
    rank, world = _comm.rank_and_size(group)
    if world == 1:
        return _ssd.ssd_chunk_scan(x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_softplus, dt_limit, initial_states,
                                   seq_idx, cu_seqlens, return_final_states, return_varlen_states)
    if cu_seqlens is not None or return_varlen_states:
        raise ValueError("cu_seqlens and return_varlen_states are not supported by the context-parallel "
                         "ssd_chunk_scan; pass seq_idx (the packed-sequence index, sharded like x) instead")
    # Zero entering state: the local op checks every argument and gives S_local as its final state.
    y_local, s_local = _ssd.ssd_chunk_scan(x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_softplus, dt_limit, None,
                                           seq_idx, return_final_states=True)
    batch, seqlen, nheads, headdim = x.shape
    lengths = _comm.gather_shard_layout(seqlen, {
        "x's (batch, nheads, headdim)": (batch, nheads, headdim),
        "B and C's (ngroups, dstate)": tuple(B.shape[2:]),
        "x.dtype": x.dtype,
        "chunk_size": chunk_size,
        "whether D, z, dt_bias, initial_states, seq_idx are given (0/1 each)":
            tuple(t is not None for t in (D, z, dt_bias, initial_states, seq_idx)),
        "seq_idx.dtype": seq_idx.dtype if seq_idx is not None else torch.int64,
        "dt_softplus": bool(dt_softplus),
        "return_final_states": bool(return_final_states),
    }, x.device, group)
    for r, length in enumerate(lengths):
        if length == 0:
            raise ValueError(f"every shard must hold at least one position; rank {r}'s x has seqlen 0")

    with torch.autocast(x.device.type, enabled=False):  # the correction in float32 (float64), as the op
        return _pass_states(x, dt, A, C, z, dt_bias, dt_softplus, dt_limit, initial_states, seq_idx,
                            return_final_states, group, y_local, s_local)


def _pass_states(x, dt, A, C, z, dt_bias, dt_softplus, dt_limit, initial_states, seq_idx, return_final_states,
                 group, y_local, s_local):
    """The entering state from the gathered shard summaries, and the outputs' correction (the docstring's method)."""
    rank, world = _comm.rank_and_size(group)
    batch, seqlen, nheads, headdim = x.shape
    ngroups, dstate = C.shape[2:]
    cdtype = s_local.dtype  # float32, float64 for float64 inputs
    dt_eff = process_dt(dt.to(cdtype), None if dt_bias is None else dt_bias.to(cdtype), dt_softplus, dt_limit)
    log_decay = torch.cumsum(dt_eff, dim=1) * A.to(cdtype)                  # (b, L_r, H): A · Σ_{s≤t} dt_s
    entering = None
    if seq_idx is not None:
        # The positions still in the sequence that entered the shard: those with the previous shard's last index
        # (rank 0: its own first, as initial_states belongs to the first sequence).
        prev_last = _comm._shift(seq_idx[:, -1:].contiguous(), group, +1)
        if rank == 0:
            prev_last = seq_idx[:, :1]
        entering = (seq_idx == prev_last).to(cdtype)                         # (b, L_r)
    decay_total = torch.exp(log_decay[:, -1])                                # a: (b, H)
    if entering is not None:
        decay_total = decay_total * entering[:, -1:]

    summary = torch.cat([s_local.reshape(-1), decay_total.reshape(-1)])
    gathered = _comm.all_gather(summary, group)                              # (W, n): O(B·H·P·N), not L
    states = gathered[:, :s_local.numel()].reshape(world, *s_local.shape)
    decays = gathered[:, s_local.numel():].reshape(world, batch, nheads, 1, 1)
    state = initial_states.to(cdtype) if initial_states is not None else torch.zeros_like(s_local)
    for r in range(world):
        if r == rank:
            state_in = state
            if not return_final_states:
                break
        state = decays[r] * state + states[r]

    y = y_local
    if rank > 0 or initial_states is not None:
        # y_t += C_t · exp(A Σ_{s≤t} dt_s) · S_in, each group's C serving its H/G heads
        per_group = state_in.reshape(batch, ngroups, nheads // ngroups, headdim, dstate)
        corr = torch.einsum("blgn,bgkpn->blgkp", C.to(cdtype), per_group).reshape(batch, seqlen, nheads, headdim)
        decay_in = torch.exp(log_decay)
        if entering is not None:
            decay_in = decay_in * entering[..., None]
        corr = corr * decay_in[..., None]
        if z is not None:
            corr = corr * torch.nn.functional.silu(z.to(cdtype))
        y = (y_local.to(cdtype) + corr).to(x.dtype)
    if rank == 0:  # y does not depend on the gather here, but the backward's all-reduce needs every rank
        y = _comm.attach(y, gathered)
    return (y, state) if return_final_states else y
