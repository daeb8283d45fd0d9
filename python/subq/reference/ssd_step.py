"""One decoding step of the Mamba-2 SSM (scalar-times-identity A per head), written out in plain PyTorch."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from subq.reference.ssd import process_dt


def ssd_step_ref(
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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (y, new_state) without touching ``state``; shapes as in :func:`subq.ops.ssd_step`.

    dt' = clamp(softplus(dt + dt_bias), *dt_limit); dA = exp(dt' A_h);
    new_state[b, h] = dA state[b, h] + dt' x[b, h] ⊗ B[b, g(h)];  y[b, h] = new_state[b, h] @ C[b, g(h)] + D_h x[b, h];
    y *= silu(z). As in Mamba-2, dt_limit == (0, inf) (the default) means no clamping.
    """
    heads, groups = x.shape[1], B.shape[1]
    dt = process_dt(dt, dt_bias, dt_softplus, dt_limit)
    dA = torch.exp(dt * A)                                              # (Bt, H)
    B_h = B.repeat_interleave(heads // groups, dim=1)                   # (Bt, H, N): head h reads group h // (H/G)
    C_h = C.repeat_interleave(heads // groups, dim=1)
    new_state = state * dA[:, :, None, None] + (dt[:, :, None] * x)[..., None] * B_h[:, :, None, :]
    y = (new_state * C_h[:, :, None, :]).sum(-1)                        # (Bt, H, P)
    if D is not None:
        y = y + (D if D.dim() == 2 else D[:, None]) * x
    if z is not None:
        y = y * F.silu(z)
    return y.to(x.dtype), new_state.to(state.dtype)
