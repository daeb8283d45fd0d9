"""``monarch_conv``: the Monarch Mixer / Hyena long convolution, causal, no gates or skip, against the usual
PyTorch form (``subq.reference.monarch_conv_fft_ref``: torch.fft rfft/irfft at n = 2L, as HazyResearch's
fftconv_ref). Inputs u (B, H, L) and a full-length filter k (H, L), and for the bidirectional (M2-BERT) form a second
filter k_rev (H, L) over the positions after t. subq is ``algorithm="auto"`` (ATen's FFT on a CPU, the Monarch DFT
on CUDA), subq_monarch forces the Monarch DFT (batched small DFT matmuls, no FFT library) on either device,
subq_fused is the default with SUBQ_EXPERIMENTAL_CONV_KERNELS=1 (CUDA: the fused Monarch-DFT kernels).

Size: B ``batch``, H ``channels``, L ``seqlen``, ``bidirectional`` (0 or 1); M the FFT size:
``subq.ops.monarch_conv.fft_size(L)`` (the smallest even 2^a 3^b 5^c 7^d >= 2L) for subq, 2L for the reference.

"matmul" FLOPs (the field holds the FLOPs the algorithm executes; there is no matrix product, so the matmul peak is
only a loose ceiling here): an FFT count, per (batch, channel) row one real forward FFT of u and one real inverse FFT
of the product at ~2.5 M log2 M each (half a complex FFT's 5 M log2 M), the pointwise complex product of M/2 + 1
bins at 6 each; per channel one real FFT of the filter (bidirectional: of k and k_rev combined into one):
  fwd  B H (5 M log2 M + 6 (M/2 + 1)) + H 2.5 M log2 M
  fwd+bwd 3x (approximate: du and dk are each one more correlation of the same size, by FFT). subq_monarch is
  counted as the same transforms (its DFT matmuls execute more: the figure is the FFT-equivalent rate).
useful FLOPs, the direct convolution: output t sums t + 1 products causal, 2 B H L (L + 1) / 2 = B H L (L + 1)
  forward, or all L products bidirectional, 2 B H L^2; 3x for fwd+bwd (du and dk are correlations of the same size).
Minimum bytes: u, k (and k_rev) in, y out; per ops/base.py for fwd+bwd.
"""

from __future__ import annotations

import math

import torch

import subq
from subq.ops.monarch_conv import fft_size
from subq.profile.ops.base import Impl, Inputs, OpSpec, Size, leaf, opt_in, three_x
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
    return size["batch"] * size["channels"] * L * (2 * L if size["bidirectional"] else L + 1)


def _invalid(size: Size) -> str | None:
    if min(v for axis, v in size.items() if axis != "bidirectional") < 1:
        return "every size must be at least 1"
    if size["bidirectional"] not in (0, 1):
        return f"bidirectional must be 0 or 1, got {size['bidirectional']}"
    return None


def _inputs(size: Size, dtype: torch.dtype, device: torch.device) -> Inputs:
    """k decays like a Hyena filter's envelope would not: plain N(0, 1/L) keeps y O(1)."""
    b, h, L = size["batch"], size["channels"], size["seqlen"]
    filters = ("k", "k_rev") if size["bidirectional"] else ("k",)
    return {
        "u": leaf(b, h, L, dtype=dtype, device=device),
        **{name: leaf(h, L, dtype=dtype, device=device, scale=L**-0.5) for name in filters},
        "dy": torch.randn(b, h, L, device=device).to(dtype),
    }


def _work_bytes(size: Size, dtype: torch.dtype) -> int:
    """fp32 complex spectra of (B, H, M/2 + 1) (u, product, their gradients) and fp32 (B, H, M) padded signals,
    with M <= 4L; a generous 16 of them."""
    b, h, L = size["batch"], size["channels"], size["seqlen"]
    return 16 * 4 * b * h * 4 * L


_LEAVES = ("u", "k", "k_rev")  # k_rev only when bidirectional: runner and check take the leaves an input set has


def _subq(algorithm: str) -> Impl:
    return Impl("subq" if algorithm == "auto" else f"subq_{algorithm}",
                lambda i, s: subq.ops.monarch_conv(i["u"], i["k"], k_rev=i.get("k_rev"), algorithm=algorithm),
                _LEAVES, three_x(_subq_fft_flops), three_x(_direct_flops))


MONARCH_CONV = OpSpec(
    name="monarch_conv",
    summary="long convolution (causal or bidirectional) by FFT or Monarch DFT; baseline: monarch_conv_fft_ref "
            "(torch.fft at 2L)",
    full={"batch": [4], "channels": [768], "seqlen": [1024, 4096, 16384], "bidirectional": [0, 1]},
    quick={"batch": [1], "channels": [16], "seqlen": [256, 1024], "bidirectional": [0]},
    make_inputs=_inputs,
    impls=(
        _subq("auto"),
        _subq("monarch"),
        opt_in(_subq("auto"), "subq_fused", "SUBQ_EXPERIMENTAL_CONV_KERNELS"),
        Impl("monarch_conv_fft_ref", lambda i, s: monarch_conv_fft_ref(i["u"], i["k"], i.get("k_rev")), _LEAVES,
             three_x(_reference_fft_flops), three_x(_direct_flops)),
    ),
    check_against="monarch_conv_fft_ref",
    work_bytes=_work_bytes,
    invalid=_invalid,
    abbrev={"batch": "b", "channels": "H", "seqlen": "L", "bidirectional": "bidir"},
)
