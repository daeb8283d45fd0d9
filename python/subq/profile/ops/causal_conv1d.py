"""``causal_conv1d``, one of Mamba-2's two memory-bound ops: depthwise causal convolution, width W, with bias, no
activation, against ``subq.reference.causal_conv1d_ref`` (a grouped ``F.conv1d`` over the zero-extended input). Its
FLOPs are a few per element: what matters is the minimum bytes and the achieved bandwidth.

No matrix product runs: the "matmul" field holds the same elementwise count as the useful one (so the matmul peak
is only a loose ceiling; %bandwidth is the figure to read).

Size: b ``batch``, D ``dim``, L ``seqlen``, W ``width``; x (b, D, L), weight (D, W), bias (D).
  FLOPs per output: W multiplies, W - 1 adds and the bias: 2 W b D L forward; fwd+bwd 3x (dx is the same W-tap
  correlation, dweight one multiply-add per tap and output, dbias one add per output: 3x up to the bias terms).
  Minimum bytes: x, weight, bias in, y out.
Fwd+bwd minimum bytes: per ops/base.py.
"""

from __future__ import annotations

import torch

import subq
from subq.profile.ops.base import Impl, Inputs, OpSpec, Size, leaf, three_x
from subq.reference import causal_conv1d_ref


def _conv_flops(size: Size) -> float:
    return 2 * size["width"] * size["batch"] * size["dim"] * size["seqlen"]


def _conv_invalid(size: Size) -> str | None:
    if min(size.values()) < 1:
        return "every size must be at least 1"
    if not 2 <= size["width"] <= 4:
        return f"width must be 2, 3 or 4, got {size['width']}"
    return None


def _conv_inputs(size: Size, dtype: torch.dtype, device: torch.device) -> Inputs:
    b, D, L, W = size["batch"], size["dim"], size["seqlen"], size["width"]
    return {
        "x": leaf(b, D, L, dtype=dtype, device=device),
        "weight": leaf(D, W, dtype=dtype, device=device, scale=W**-0.5),
        "bias": leaf(D, dtype=dtype, device=device),
        "dy": torch.randn(b, D, L, device=device).to(dtype),
    }


def _conv_work_bytes(size: Size, dtype: torch.dtype) -> int:
    """The reference's zero-extended copy of x, y, dy's correlation and the gradients: a generous 8 fp32 (b, D, L+W)."""
    return 8 * 4 * size["batch"] * size["dim"] * (size["seqlen"] + size["width"])


CAUSAL_CONV1D = OpSpec(
    name="causal_conv1d",
    summary="Mamba-2 depthwise causal conv1d (memory-bound); baseline: subq.reference.causal_conv1d_ref (F.conv1d)",
    full={"batch": [4], "dim": [4096], "seqlen": [1024, 4096, 16384], "width": [4]},
    quick={"batch": [1], "dim": [64], "seqlen": [256, 1024], "width": [4]},
    make_inputs=_conv_inputs,
    impls=(
        Impl("subq", lambda i, s: subq.ops.causal_conv1d(i["x"], i["weight"], i["bias"]), ("x", "weight", "bias"),
             three_x(_conv_flops), three_x(_conv_flops)),
        Impl("causal_conv1d_ref", lambda i, s: causal_conv1d_ref(i["x"], i["weight"], i["bias"]),
             ("x", "weight", "bias"), three_x(_conv_flops), three_x(_conv_flops)),
    ),
    check_against="causal_conv1d_ref",
    work_bytes=_conv_work_bytes,
    invalid=_conv_invalid,
    abbrev={"batch": "b", "dim": "D", "seqlen": "L", "width": "W"},
)
