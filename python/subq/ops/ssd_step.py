"""One decoding step of the Mamba-2 SSM: the selective state update with A = a_h * I per head.

Backed by ``torch.ops.subq.ssd_step`` (csrc/torch/ssd_step.cpp), which updates ``state`` in place. Its CUDA kernel
is opt-in with ``SUBQ_EXPERIMENTAL_MAMBA2_KERNELS=1`` until it has been verified on a GPU; by default CUDA runs the
ATen composite.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from subq import _C  # noqa: F401  (registers the torch.ops.subq schemas and kernels)
from subq._utils import check_bool, check_device, check_like, check_ndim, check_real, check_shape, check_tensor


def _check_fp32_or_like(t: torch.Tensor, x: torch.Tensor, name: str) -> None:
    check_tensor(t, name)
    if t.dtype not in (x.dtype, torch.float32):
        raise ValueError(f"{name}.dtype must be x.dtype ({x.dtype}) or torch.float32, got {t.dtype}")
    check_device(t, x, name, "x")


def _dt_limit(dt_limit: object) -> tuple[float, float]:
    if not isinstance(dt_limit, Sequence) or isinstance(dt_limit, str) or len(dt_limit) != 2:
        raise TypeError(f"dt_limit must be a (lo, hi) pair of numbers, got {dt_limit!r}")
    lo, hi = (check_real(v, "dt_limit[i]") for v in dt_limit)
    if math.isnan(lo) or math.isnan(hi) or lo > hi:
        raise ValueError(f"dt_limit must be (lo, hi) with lo <= hi and no NaN, got ({lo}, {hi})")
    # As in Mamba-2, the default (0, inf) means "no limit": a raw dt below 0 passes unclamped.
    return (-math.inf, math.inf) if (lo, hi) == (0.0, math.inf) else (lo, hi)


def ssd_step(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = (0.0, math.inf),
) -> torch.Tensor:
    r"""Advance the Mamba-2 SSM state by one token and return the token's output. ``state`` is updated in place.

    Shapes: ``state (Bt, H, P, N)``, ``x (Bt, H, P)``, ``dt (Bt, H)``, ``A (H,)``, ``B`` and ``C (Bt, G, N)`` with
    ``G`` dividing ``H`` (head ``h`` reads group ``h // (H // G)``), ``D (H,)`` or ``(H, P)``, ``z (Bt, H, P)``,
    ``dt_bias (H,)``. Per batch ``b`` and head ``h``:

    1. ``dt' = dt + dt_bias``; ``dt' = softplus(dt')`` if ``dt_softplus``; ``dt' = clamp(dt', *dt_limit)``
       (as in Mamba-2, the default ``(0, inf)`` means no clamping);
    2. ``state[b, h] = exp(dt' A[h]) state[b, h] + dt' x[b, h, :] ⊗ B[b, g, :]``;
    3. ``y[b, h] = state[b, h] @ C[b, g] + D[h] x[b, h]``, times ``silu(z[b, h])`` if ``z`` is given.

    Dtypes: ``x``, ``dt``, ``B``, ``C``, ``z`` float16, bfloat16, float32 or float64 (one dtype); ``state``,
    ``A``, ``D``, ``dt_bias`` x's dtype or float32. Arithmetic in float32 (float64 for float64 ``x``); ``y`` is
    formed from the new state before it is rounded to the state's dtype and has x's dtype. Any strides. Forward
    only (no autograd: it is the decoding step). NaN policy: a NaN in ``x[b, h, p]`` reaches only state row
    ``(b, h, p)`` and ``y[b, h, p]``; a NaN in ``dt[b, h]`` (or A, dt_bias of head h) reaches all of head
    ``(b, h)``; a NaN in ``B``/``C`` reaches every head of its group; nothing reaches other batch entries.
    """
    check_tensor(x, "x")
    check_ndim(x, 3, "x", "(Bt, H, P)")
    batch, heads, head_dim = x.shape
    check_tensor(B, "B")
    check_like(B, x, "B", "x")
    check_ndim(B, 3, "B", "(Bt, G, N)")
    groups, state_dim = B.shape[1], B.shape[2]
    if B.shape[0] != batch:
        raise ValueError(f"B.shape[0] must be the batch size Bt = {batch} of x, got B shape {tuple(B.shape)}")
    if groups < 1 or heads % groups != 0:
        raise ValueError(f"the groups G = B.shape[1] = {groups} must divide the heads H = x.shape[1] = {heads}")
    check_tensor(C, "C")
    check_like(C, x, "C", "x")
    check_shape(C, tuple(B.shape), "C", "B.shape (Bt, G, N)")
    _check_fp32_or_like(state, x, "state")
    check_shape(state, (batch, heads, head_dim, state_dim), "state", "(Bt, H, P, N)")
    check_tensor(dt, "dt")
    check_like(dt, x, "dt", "x")
    check_shape(dt, (batch, heads), "dt", "(Bt, H)")
    _check_fp32_or_like(A, x, "A")
    check_shape(A, (heads,), "A", "(H,)")
    if D is not None:
        _check_fp32_or_like(D, x, "D")
        if tuple(D.shape) not in ((heads,), (heads, head_dim)):
            raise ValueError(f"D must have shape (H,) = ({heads},) or (H, P) = ({heads}, {head_dim}), "
                             f"got {tuple(D.shape)}")
    if z is not None:
        check_tensor(z, "z")
        check_like(z, x, "z", "x")
        check_shape(z, tuple(x.shape), "z", "x.shape (Bt, H, P)")
    if dt_bias is not None:
        _check_fp32_or_like(dt_bias, x, "dt_bias")
        check_shape(dt_bias, (heads,), "dt_bias", "(H,)")
    dt_softplus = check_bool(dt_softplus, "dt_softplus")
    lo, hi = _dt_limit(dt_limit)
    return torch.ops.subq.ssd_step(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, lo, hi)


@torch.library.register_fake("subq::ssd_step")
def _ssd_step_fake(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, dt_lo, dt_hi):
    return x.new_empty(x.shape)
