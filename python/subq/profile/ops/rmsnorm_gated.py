"""``rmsnorm_gated``, one of Mamba-2's two memory-bound ops: RMSNorm over all features, gated by silu(z) after the
norm (Mamba-2's default), against ``subq.reference.rmsnorm_gated_ref``. Its FLOPs are a few per element: what matters
is the minimum bytes and the achieved bandwidth.

No matrix product runs: the "matmul" field holds the same elementwise count as the useful one (so the matmul peak
is only a loose ceiling; %bandwidth is the figure to read).

Size: b ``batch``, L ``seqlen``, D ``dim``; x and z (b, L, D), weight (D), one group of D features.
  FLOPs per element: the square and its sum (2), the scale by the row's rsqrt (1), weight (1), silu's multiply by
  its sigmoid (1) and the gate (1): 6 b L D forward (the sigmoid, the per-row rsqrt and the mean's division are not
  counted); fwd+bwd 3x (approximate). Minimum bytes: x, z, weight in, y out.
Fwd+bwd minimum bytes: per ops/base.py.
"""

from __future__ import annotations

import torch

import subq
from subq.profile.ops.base import Impl, Inputs, OpSpec, Size, leaf, three_x
from subq.reference import rmsnorm_gated_ref


def _norm_flops(size: Size) -> float:
    return 6 * size["batch"] * size["seqlen"] * size["dim"]


def _norm_invalid(size: Size) -> str | None:
    if min(size.values()) < 1:
        return "every size must be at least 1"
    return None


def _norm_inputs(size: Size, dtype: torch.dtype, device: torch.device) -> Inputs:
    b, L, D = size["batch"], size["seqlen"], size["dim"]
    return {
        "x": leaf(b, L, D, dtype=dtype, device=device),
        "weight": (1 + 0.1 * torch.randn(D, device=device)).to(dtype).requires_grad_(),
        "z": leaf(b, L, D, dtype=dtype, device=device),
        "dy": torch.randn(b, L, D, device=device).to(dtype),
    }


def _norm_work_bytes(size: Size, dtype: torch.dtype) -> int:
    """The reference's intermediates (silu(z), the normalised x, products) and the gradients: 12 fp32 (b, L, D)."""
    return 12 * 4 * size["batch"] * size["seqlen"] * size["dim"]


RMSNORM_GATED = OpSpec(
    name="rmsnorm_gated",
    summary="Mamba-2 gated RMSNorm (memory-bound); baseline: subq.reference.rmsnorm_gated_ref",
    full={"batch": [4], "seqlen": [1024, 4096, 16384], "dim": [4096]},
    quick={"batch": [1], "seqlen": [256, 1024], "dim": [256]},
    make_inputs=_norm_inputs,
    impls=(
        Impl("subq", lambda i, s: subq.ops.rmsnorm_gated(i["x"], i["weight"], i["z"]), ("x", "weight", "z"),
             three_x(_norm_flops), three_x(_norm_flops)),
        Impl("rmsnorm_gated_ref", lambda i, s: rmsnorm_gated_ref(i["x"], i["weight"], i["z"]), ("x", "weight", "z"),
             three_x(_norm_flops), three_x(_norm_flops)),
    ),
    check_against="rmsnorm_gated_ref",
    work_bytes=_norm_work_bytes,
    invalid=_norm_invalid,
    abbrev={"batch": "b", "seqlen": "L", "dim": "D"},
)
