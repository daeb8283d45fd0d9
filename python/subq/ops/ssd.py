"""Mamba-2's SSD layer computed by the chunk algorithm: ``subq.ops.ssd_chunk_scan``.

Backed by ``torch.ops.subq.ssd_chunk_scan_fwd/bwd`` (csrc/torch/ssd_chunk_scan.cpp).
"""

from __future__ import annotations

import math

import torch

from subq import _C  # noqa: F401  (registers the torch.ops.subq schemas and kernels)
from subq._utils import (
    check_bool,
    check_device,
    check_dtype_in,
    check_int_choice,
    check_param,
    check_real,
    check_tensor,
)

CHUNK_SIZES = (64, 128, 256)
MAX_HEADDIM = 128
MAX_DSTATE = 256
NO_LIMIT = (0.0, math.inf)


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
    cu_seqlens: torch.Tensor | None = None,
    return_final_states: bool = False,
    return_varlen_states: bool = False,
):
    r"""The selective SSM of Mamba-2 (scalar-times-identity ``A`` per head), by the SSD chunk algorithm.

    For batch b, head h (using group ``g = h // (H // G)`` of ``B`` and ``C``) and position t::

        dt_t = clamp(softplus(dt_t + dt_bias))          # each step optional: dt_bias, dt_softplus, dt_limit
        h_t  = exp(dt_t * A_h) * h_{t-1} + dt_t * x_t ⊗ B_t       # state (P, N), fp32
        y_t  = h_t @ C_t + D_h * x_t;   y_t *= silu(z_t) when z is given

    Shapes: ``x (B, L, H, P)``, ``dt (B, L, H)``, ``A (H,)``, ``B``/``C (B, L, G, N)`` with G dividing H,
    ``D (H,)`` or ``(H, P)``, ``z`` like x, ``dt_bias (H,)``, ``initial_states (B, H, P, N)`` (the state before
    position 0). ``chunk_size`` is 64, 128 or 256; L need not be a multiple of it. P ≤ 128, N ≤ 256.

    Packed sequences: ``seq_idx (B, L)`` (int32/int64, non-decreasing along L) restarts the state from zero where
    the index changes; ``initial_states`` belongs to the first sequence. ``cu_seqlens (S+1,)`` (batch 1; gives
    ``seq_idx`` when that is not passed) with ``return_varlen_states`` also returns the state after the last
    position of each sequence, ``(S, H, P, N)`` (zero for an empty sequence); those states carry no gradient.
    Positions past ``cu_seqlens[-1]`` (padding) form one more sequence. The values are checked without a host sync
    (``cu_seqlens`` must start at 0, never decrease and end at most at L; ``seq_idx`` must not decrease): a bad one
    raises RuntimeError on the CPU and is a device-side assertion on CUDA.

    Dtypes: x, B, C, z in float16, bfloat16, float32 or float64; dt, A, D, dt_bias, initial_states in x's dtype
    or float32. Decays, states and accumulation in float32 (float64 for float64 inputs); y in x's dtype, states in
    float32 (float64). Segment sums are differences of cumulative sums inside one chunk, masked before the exp, so
    no exp of a positive number is taken when A ≤ 0. NaN/Inf policy: a NaN or Inf input at position t makes the
    outputs NaN from the start of t's chunk on (a chunk's matmuls mix its positions); earlier chunks are untouched.

    Returns ``y``, then ``final_states`` if ``return_final_states``, then ``varlen_states`` if
    ``return_varlen_states``. Differentiable in every tensor input except seq_idx and cu_seqlens.
    """
    chunk_size, (lo, hi) = _check_args(x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_limit, initial_states, seq_idx,
                                       cu_seqlens)
    dt_softplus = check_bool(dt_softplus, "dt_softplus")
    return_final_states = check_bool(return_final_states, "return_final_states")
    return_varlen_states = check_bool(return_varlen_states, "return_varlen_states")
    if return_varlen_states and cu_seqlens is None:
        raise ValueError("return_varlen_states=True needs cu_seqlens (the packed sequence boundaries)")
    if cu_seqlens is not None and seq_idx is None:
        seq_idx = _seq_idx_from_cu_seqlens(cu_seqlens, x.shape[1])
    y, final_states, varlen_states = torch.ops.subq.ssd_chunk_scan_fwd(
        x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, cu_seqlens if return_varlen_states else None,
        chunk_size, dt_softplus, lo, hi,
    )
    out = (y,)
    if return_final_states:
        out += (final_states,)
    if return_varlen_states:
        out += (varlen_states,)
    return out[0] if len(out) == 1 else out


def _seq_idx_from_cu_seqlens(cu_seqlens: torch.Tensor, seqlen: int) -> torch.Tensor:
    positions = torch.arange(seqlen, device=cu_seqlens.device)
    return torch.searchsorted(cu_seqlens[1:].contiguous(), positions, right=True).to(torch.int32)[None]


def _check_args(x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_limit, initial_states, seq_idx, cu_seqlens):
    check_tensor(x, "x")
    if x.dim() != 4:
        raise ValueError(f"x must be 4-D (batch, seqlen, nheads, headdim), got shape {tuple(x.shape)}")
    batch, seqlen, nheads, headdim = x.shape
    for name, t in (("B", B), ("C", C)):
        check_tensor(t, name)
        if t.dim() != 4 or t.shape[:2] != x.shape[:2]:
            raise ValueError(
                f"{name} must have shape (batch, seqlen, ngroups, dstate) = ({batch}, {seqlen}, G, N), "
                f"got {tuple(t.shape)}"
            )
        check_dtype_in(t, name, (x.dtype,), "x's dtype")
        check_device(t, x, name)
    ngroups, dstate = B.shape[2:]
    if C.shape != B.shape:
        raise ValueError(f"C must have B's shape {tuple(B.shape)}, got {tuple(C.shape)}")
    if ngroups == 0 or nheads % ngroups:
        raise ValueError(f"B and C's ngroups ({ngroups}) must divide x's nheads ({nheads})")
    if headdim > MAX_HEADDIM or headdim == 0:
        raise ValueError(f"x's headdim must be in 1..{MAX_HEADDIM}, got {headdim}")
    if dstate > MAX_DSTATE or dstate == 0:
        raise ValueError(f"B and C's dstate must be in 1..{MAX_DSTATE}, got {dstate}")
    chunk_size = check_int_choice(chunk_size, "chunk_size", CHUNK_SIZES)
    params = (x.dtype, torch.float32)
    check_param(dt, "dt", (batch, seqlen, nheads), "(batch, seqlen, nheads)", params, x)
    check_param(A, "A", (nheads,), "(nheads,)", params, x)
    if D is not None:
        check_tensor(D, "D")
        if tuple(D.shape) not in ((nheads,), (nheads, headdim)):
            raise ValueError(f"D must have shape (nheads,) = ({nheads},) or (nheads, headdim) = "
                             f"({nheads}, {headdim}), got {tuple(D.shape)}")
        check_param(D, "D", tuple(D.shape), "", params, x)
    if z is not None:
        check_param(z, "z", tuple(x.shape), "x's shape", (x.dtype,), x)
    if dt_bias is not None:
        check_param(dt_bias, "dt_bias", (nheads,), "(nheads,)", params, x)
    if initial_states is not None:
        check_param(initial_states, "initial_states", (batch, nheads, headdim, dstate),
                    "(batch, nheads, headdim, dstate)", params, x)
    if not (isinstance(dt_limit, (tuple, list)) and len(dt_limit) == 2):
        raise ValueError(f"dt_limit must be a pair (lo, hi), got {dt_limit!r}")
    lo, hi = (check_real(v, "dt_limit[i]") for v in dt_limit)
    if not (0 <= lo <= hi):
        raise ValueError(f"dt_limit must be (lo, hi) with 0 <= lo <= hi, got {tuple(dt_limit)}")
    for name, t in (("seq_idx", seq_idx), ("cu_seqlens", cu_seqlens)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor) or t.dtype not in (torch.int32, torch.int64):
            got = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be an int32 or int64 tensor, got {got}")
        check_device(t, x, name)
    if seq_idx is not None and tuple(seq_idx.shape) != (batch, seqlen):
        raise ValueError(f"seq_idx must have shape (batch, seqlen) = ({batch}, {seqlen}), got {tuple(seq_idx.shape)}")
    if cu_seqlens is not None:
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
            raise ValueError(f"cu_seqlens must be 1-D (num_sequences + 1,), got shape {tuple(cu_seqlens.shape)}")
        if batch != 1:
            raise ValueError(f"cu_seqlens needs the packed sequences in one batch row (x.shape[0] == 1), got {batch}")
        # Checked here too, not only by the op: seq_idx is derived from it first. _assert_async: no host sync (on
        # CUDA a failure is a device-side assertion), and torch.compile traces it.
        valid = (cu_seqlens[0] == 0) & (cu_seqlens[-1] <= seqlen) & (cu_seqlens.diff() >= 0).all()
        torch._assert_async(valid, "cu_seqlens must start at 0, never decrease, and end at most at x's seqlen")
    return chunk_size, (lo, hi)


# ---- fake kernels (shapes only), for torch.compile and meta tensors ------------------------------------------------


def _state_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


@torch.library.register_fake("subq::ssd_chunk_scan_fwd")
def _fwd_fake(x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, cu_seqlens, chunk_size, dt_softplus, lo, hi):
    batch, _, nheads, headdim = x.shape
    dstate = B.shape[-1]
    nseq = cu_seqlens.shape[0] - 1 if cu_seqlens is not None else 0
    states = x.new_empty((batch, nheads, headdim, dstate), dtype=_state_dtype(x))
    return torch.empty_like(x), states, x.new_empty((nseq, nheads, headdim, dstate), dtype=_state_dtype(x))


@torch.library.register_fake("subq::ssd_chunk_scan_bwd")
def _bwd_fake(dy, dfinal_states, x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, chunk_size, dt_softplus,
              lo, hi):
    def like(t):
        return torch.empty_like(t) if t is not None else x.new_empty((0,))

    return [like(t) for t in (x, dt, A, B, C, D, z, dt_bias, initial_states)]


# ---- autograd -------------------------------------------------------------------------------------------------------

def _setup_context(ctx, inputs, output):
    x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, _, chunk_size, dt_softplus, lo, hi = inputs
    ctx.save_for_backward(x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx)
    ctx.options = (chunk_size, dt_softplus, lo, hi)
    ctx.mark_non_differentiable(output[2])


def _backward(ctx, dy, dfinal_states, _dvarlen):
    x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx = ctx.saved_tensors
    grads = torch.ops.subq.ssd_chunk_scan_bwd(
        dy.contiguous(), dfinal_states, x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, *ctx.options
    )
    present = (x, dt, A, B, C, D, z, dt_bias, initial_states)
    grads = [g if t is not None else None for g, t in zip(grads, present, strict=True)]
    return (*grads, None, None, None, None, None, None)


torch.library.register_autograd("subq::ssd_chunk_scan_fwd", _backward, setup_context=_setup_context)
