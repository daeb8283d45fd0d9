"""Softmax attention (``F.scaled_dot_product_attention``) as a baseline: the attention layer a subq op replaces, at
the same width W = heads x head size features per position, bidirectional or causal. Its inputs are ``sdpa_q``,
``sdpa_k``, ``sdpa_v`` (b, heads, L, head size), so they never clash with the op's own names.

matmul FLOPs (forward), Q Kᵀ and P V at 2 L^2 per head feature each: 4 b W L^2 bidirectional; causal half the square,
  2 b W L^2, as tile-skipping kernels (flash, memory-efficient, cuDNN) execute it and as FlashAttention's benchmarks
  count it (the CPU math fallback executes the whole square); fwd+bwd 3.5x the forward (the backward recomputes
  Q Kᵀ: five products).
useful FLOPs: 2 W (q . k) + 2 W (p v) per attended (query, key) pair: L^2 pairs bidirectional, L (L + 1) / 2 causal
  (the diagonal included): 4 b W L^2 or 2 b W L (L + 1) forward, 3x for fwd+bwd.
Minimum bytes: q, k, v in and o out; per ops/base.py for fwd+bwd.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from subq.profile.ops.base import Impl, Inputs, Size, leaf, three_x

LEAVES = ("sdpa_q", "sdpa_k", "sdpa_v")


def sdpa_inputs(batch: int, heads: int, seqlen: int, headdim: int, dtype: torch.dtype,
                device: torch.device) -> Inputs:
    return {name: leaf(batch, heads, seqlen, headdim, dtype=dtype, device=device) for name in LEAVES}


def sdpa(name: str, width: Callable[[Size], int], causal: Callable[[Size], bool]) -> Impl:
    """The baseline for an op whose sizes give the layer ``width`` and whether it is ``causal``."""

    def matmul_flops(size: Size, pass_name: str) -> float:
        forward = (2 if causal(size) else 4) * size["batch"] * width(size) * size["seqlen"] ** 2
        return forward if pass_name == "fwd" else 3.5 * forward

    def useful_flops(size: Size) -> float:
        L = size["seqlen"]
        pairs = L * (L + 1) // 2 if causal(size) else L * L
        return 4 * size["batch"] * width(size) * pairs

    def forward(inputs: Inputs, size: Size) -> torch.Tensor:
        return F.scaled_dot_product_attention(*(inputs[n] for n in LEAVES), is_causal=causal(size))

    return Impl(name, forward, LEAVES, matmul_flops, three_x(useful_flops))
