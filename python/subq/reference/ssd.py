"""Mamba-2's SSD (state-space dual) layer: the sequential recurrence and a minimal chunked form.

For batch b and head h (group g = h // (H // G) supplies B and C), with processed step sizes dt:

    h_t = exp(dt_t * A_h) * h_{t-1} + dt_t * x_t ⊗ B_t        (state (P, N))
    y_t = h_t @ C_t + D_h * x_t,   then y_t *= silu(z_t) when z is given

Packed sequences (``seq_idx``): the state restarts from zero where the index changes; ``initial_states`` is the
state before position 0, so it belongs to the first sequence.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

NO_LIMIT = (0.0, math.inf)


def process_dt(dt, dt_bias=None, dt_softplus=False, dt_limit=NO_LIMIT):
    """dt' = clamp(softplus(dt + dt_bias)) with each step optional, as in Mamba-2."""
    if dt_bias is not None:
        dt = dt + dt_bias
    if dt_softplus:
        dt = F.softplus(dt)
    if tuple(dt_limit) != NO_LIMIT:
        dt = dt.clamp(min=dt_limit[0], max=dt_limit[1])
    return dt


def _heads(t, nheads):
    """(..., G, N) -> (..., H, N): each group serves H // G consecutive heads."""
    return t.repeat_interleave(nheads // t.shape[-2], dim=-2)


def _skip(x, D):
    if D is None:
        return 0
    return x * (D[:, None] if D.dim() == 1 else D)


def seq_idx_from_cu_seqlens(cu_seqlens, seqlen):
    """The packed-sequence index of each position: seq_idx[t] = i for cu_seqlens[i] <= t < cu_seqlens[i+1]."""
    positions = torch.arange(seqlen, device=cu_seqlens.device)
    return (torch.searchsorted(cu_seqlens[1:].contiguous(), positions, right=True)).to(torch.int32)[None]


def ssd_ref(x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False, dt_limit=NO_LIMIT,
            initial_states=None, seq_idx=None, cu_seqlens=None):
    """The recurrence, one position at a time. Returns (y, final_states), plus the state at the end of each packed
    sequence when ``cu_seqlens (S+1,)`` is given (batch 1). Runs in the inputs' dtype: pass float64."""
    batch, seqlen, nheads, headdim = x.shape
    dt = process_dt(dt, dt_bias, dt_softplus, dt_limit)
    Bh, Ch = _heads(B, nheads), _heads(C, nheads)
    if cu_seqlens is not None and seq_idx is None:
        seq_idx = seq_idx_from_cu_seqlens(cu_seqlens, seqlen)
    state = x.new_zeros(batch, nheads, headdim, B.shape[-1])
    if initial_states is not None:
        state = state + initial_states
    states, ys = [], []
    for t in range(seqlen):
        if seq_idx is not None and t > 0:
            same = (seq_idx[:, t] == seq_idx[:, t - 1]).to(x.dtype)
            state = state * same[:, None, None, None]
        decay = torch.exp(dt[:, t] * A)[:, :, None, None]
        state = decay * state + (dt[:, t, :, None] * x[:, t])[..., None] * Bh[:, t, :, None, :]
        states.append(state)
        ys.append(torch.einsum("bhpn,bhn->bhp", state, Ch[:, t]))
    y = torch.stack(ys, dim=1) + _skip(x, D)
    if z is not None:
        y = y * F.silu(z)
    if cu_seqlens is None:
        return y, state
    ends = [int(e) for e in cu_seqlens[1:]]
    starts = [int(s) for s in cu_seqlens[:-1]]
    varlen = [states[e - 1][0] if e > s else torch.zeros_like(state[0]) for s, e in zip(starts, ends, strict=True)]
    return y, state, torch.stack(varlen)


def ssd_chunked_ref(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, dt_softplus=False,
                    dt_limit=NO_LIMIT, initial_states=None, seq_idx=None):
    """The SSD chunk algorithm in plain PyTorch (after ssd_minimal.py in state-spaces/mamba): intra-chunk quadratic
    form, chunk states, state passing, state to output. Returns (y, final_states). It materialises a chunk square
    per head, so it is also the "plain PyTorch" baseline of the tests and benchmarks."""
    batch, seqlen, nheads, headdim = x.shape
    dtype = x.dtype
    # Decays (dt, cumulative sums, exp) in float32 at least; the matmuls in the input dtype.
    ddtype = torch.float64 if dtype == torch.float64 else torch.float32
    nchunks = -(-seqlen // chunk_size)
    pad = nchunks * chunk_size - seqlen
    dt = process_dt(dt.to(ddtype), dt_bias, dt_softplus, dt_limit)

    def chunks(t):  # (b, L, ...) -> (b, c, Q, ...), zero-padded: a padded step has dt = 0, so it changes nothing
        t = F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad))
        return t.reshape(batch, nchunks, chunk_size, *t.shape[2:])

    xc, dtc = chunks(x), chunks(dt)
    Bc, Cc = chunks(_heads(B, nheads)), chunks(_heads(C, nheads))
    cum = torch.cumsum(dtc * A.to(ddtype), dim=2)                           # (b, c, Q, H)
    if seq_idx is None:
        seq_idx = torch.zeros(batch, seqlen, dtype=torch.int64, device=x.device)
    # padded positions continue the last sequence
    seq = torch.cat([seq_idx.long(), seq_idx[:, -1:].long().expand(batch, pad)], dim=1)
    seq = seq.reshape(batch, nchunks, chunk_size)
    last_seq = seq[:, :, -1]                                                # (b, c)
    prev_seq = torch.cat([seq[:, :1, 0], last_seq[:, :-1]], dim=1)          # sequence entering each chunk

    # 1. intra-chunk: y_t = sum_{s<=t, same sequence} C_t.B_s exp(cum_t - cum_s) dt_s x_s
    causal = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=x.device).tril()
    mask = causal & (seq[..., :, None] == seq[..., None, :])                # (b, c, t, s)
    cum_h = cum.permute(0, 1, 3, 2)                                         # (b, c, H, Q)
    segsum = cum_h[..., :, None] - cum_h[..., None, :]                      # (b, c, H, t, s)
    decay = torch.exp(segsum.masked_fill(~mask[:, :, None], -math.inf))     # never exp of a positive number
    scores = torch.einsum("bcthn,bcshn->bchts", Cc, Bc) * decay.to(dtype)
    y = torch.einsum("bchts,bcshp->bcthp", scores, xc * dtc[..., None].to(dtype))

    # 2. chunk states: the state each chunk leaves behind, from its own inputs only
    to_end = torch.exp(cum[:, :, -1:] - cum) * (seq == last_seq[..., None])[..., None]
    chunk_states = torch.einsum("bcshn,bcshp->bchpn", Bc, xc * (dtc * to_end)[..., None].to(dtype))

    # 3. state passing: h_c = exp(sum of a over chunk c) h_{c-1} + chunk_states_c, reset between sequences
    carry = torch.exp(cum[:, :, -1]) * (last_seq == prev_seq)[..., None]   # (b, c, H)
    state = x.new_zeros(batch, nheads, headdim, B.shape[-1], dtype=ddtype)
    if initial_states is not None:
        state = state + initial_states
    entering = []
    for c in range(nchunks):
        entering.append(state)
        state = carry[:, c, :, None, None] * state + chunk_states[:, c]
    entering = torch.stack(entering, dim=1)                                 # (b, c, H, P, N)

    # 4. state to output: y_t += exp(cum_t) C_t . h_{c-1}, where t is still in the entering sequence
    from_start = torch.exp(cum) * (seq == prev_seq[..., None])[..., None]
    y = y + torch.einsum("bcthn,bchpn->bcthp", Cc, entering.to(dtype)) * from_start[..., None].to(dtype)

    y = y.reshape(batch, nchunks * chunk_size, nheads, headdim)[:, :seqlen] + _skip(x, D)
    if z is not None:
        y = y * F.silu(z)
    return y.to(dtype), state
