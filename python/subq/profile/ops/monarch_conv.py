"""``monarch_conv``: the Monarch Mixer / Hyena long convolution, causal, no gates or skip, against the usual
PyTorch form (``subq.reference.monarch_conv_fft_ref``: torch.fft rfft/irfft at n = 2L). Inputs u (B, H, L) and a
full-length filter k (H, L).

Size: B ``batch``, H ``channels``, L ``seqlen``; M the FFT size: ``subq.ops.monarch_conv.fft_size(L)`` (the smallest
even 2^a 3^b 5^c 7^d >= 2L) for subq, 2L for the reference.

"matmul" FLOPs (the field holds the FLOPs the algorithm executes; there is no matrix product, so the matmul peak is
only a loose ceiling here): an FFT count, per (batch, channel) row one real forward FFT of u and one real inverse FFT
of the product at ~2.5 M log2 M each (half a complex FFT's 5 M log2 M), the pointwise complex product of M/2 + 1
bins at 6 each; per channel one real FFT of the filter:
  fwd  B H (5 M log2 M + 6 (M/2 + 1)) + H 2.5 M log2 M
  fwd+bwd 3x (approximate: du and dk are each one more correlation of the same size, by FFT).
useful FLOPs, the direct causal convolution: output t sums t + 1 products, 2 B H L (L + 1) / 2 = B H L (L + 1)
  forward, 3x for fwd+bwd (du and dk are correlations of the same size).
Minimum bytes: u and k in, y out; per ops/base.py for fwd+bwd.
"""

from __future__ import annotations

import math

import torch

import subq
from subq.ops.monarch_conv import fft_size
from subq.profile.ops.base import Impl, Inputs, OpSpec, Size, leaf, three_x
from subq.reference import monarch_conv_fft_ref


def _fft_flops(size: Size, m: int) -> float:
    b, h = size["batch"], size["channels"]
    rfft = 2.5 * m * math.log2(m)
    return b * h * (2 * rfft + 6 * (m // 2 + 1)) + h * rfft


def _subq_fft_flops(size: Size) -> float:
    return _fft_flops(size, fft_size(size["seqlen"]))


def _reference_fft_flops(size: Size) -> float:
    return _fft_flops(size, 2 * size["seqlen"])


def _direct_flops(size: Size) -> float:
    L = size["seqlen"]
    return size["batch"] * size["channels"] * L * (L + 1)


def _invalid(size: Size) -> str | None:
    if min(size.values()) < 1:
        return "every size must be at least 1"
    return None


def _inputs(size: Size, dtype: torch.dtype, device: torch.device) -> Inputs:
    """k decays like a Hyena filter's envelope would not: plain N(0, 1/L) keeps y O(1)."""
    b, h, L = size["batch"], size["channels"], size["seqlen"]
    return {
        "u": leaf(b, h, L, dtype=dtype, device=device),
        "k": leaf(h, L, dtype=dtype, device=device, scale=L**-0.5),
        "dy": torch.randn(b, h, L, device=device).to(dtype),
    }


def _work_bytes(size: Size, dtype: torch.dtype) -> int:
    """fp32 complex spectra of (B, H, M/2 + 1) (u, product, their gradients) and fp32 (B, H, M) padded signals,
    with M <= 4L; a generous 16 of them."""
    b, h, L = size["batch"], size["channels"], size["seqlen"]
    return 16 * 4 * b * h * 4 * L


MONARCH_CONV = OpSpec(
    name="monarch_conv",
    summary="causal long convolution by FFT; baseline: subq.reference.monarch_conv_fft_ref (torch.fft at 2L)",
    full={"batch": [4], "channels": [768], "seqlen": [1024, 4096, 16384]},
    quick={"batch": [1], "channels": [16], "seqlen": [256, 1024]},
    make_inputs=_inputs,
    impls=(
        Impl("subq", lambda i, s: subq.ops.monarch_conv(i["u"], i["k"]), ("u", "k"),
             three_x(_subq_fft_flops), three_x(_direct_flops)),
        Impl("monarch_conv_fft_ref", lambda i, s: monarch_conv_fft_ref(i["u"], i["k"]), ("u", "k"),
             three_x(_reference_fft_flops), three_x(_direct_flops)),
    ),
    check_against="monarch_conv_fft_ref",
    work_bytes=_work_bytes,
    invalid=_invalid,
    abbrev={"batch": "b", "channels": "H", "seqlen": "L"},
)
