"""``flash_chunk_attention``: FLASH's mixed-chunk attention (single head, no gate u or relative bias), causal or
bidirectional, with its opt-in fused kernels (subq_fused), against the plain PyTorch chunk algorithm in the same dtype
(``subq.reference.flash_chunked_ref``; eager and, on CUDA, torch.compile) and against softmax attention
(ops/attention.py) at the same width: E / S heads of size S, so the output has FLASH's (batch, seqlen, E) elements.

Size (ops/flash_sizes.py): b ``batch``, L ``seqlen``, S ``qk_dim`` (q_quad, k_quad, q_lin, k_lin), E ``value_dim``
(v and the output), C ``chunk_size``, ``causal``; G = ceil(L / C) chunks (the last one zero-padded, and the padding
is computed).

matmul FLOPs per chunk (forward), both the subq composite and the reference:
  1. chunk square scores   Q_quad K_quadᵀ       2 C^2 S
  2. chunk square output   relu(.)² V           2 C^2 E
  3. chunk state           K_linᵀ V             2 C S E
  4. linear output         Q_lin state          2 C S E
  (the prefix sum or total of the states is elementwise, G S E, and not a matmul; the full C x C square is
  computed, and masked when causal, as both implementations do)
  fwd 2 b G (C^2 S + C^2 E + 2 C S E), fwd+bwd 3x (two products per forward product; nothing recomputed).
useful FLOPs: per chunk of n real positions, n (n + 1) / 2 (query, key) pairs causal (the lower triangle with its
  diagonal) or n^2 bidirectional, each 2 S (q . k) + 2 E (p v); plus the linear part, 2 S E per position for its
  output and 2 S E per position for the states (causal: of every chunk but the last, which no query reads):
  3x the forward for fwd+bwd.
Attention at width E: per ops/attention.py.
Minimum bytes: q_quad, k_quad, q_lin, k_lin, v in and the output out; per ops/base.py for fwd+bwd.
"""

from __future__ import annotations

import torch

import subq
from subq.profile.ops.attention import sdpa, sdpa_inputs
from subq.profile.ops.base import Impl, Inputs, OpSpec, Size, chunks, compiled, leaf, opt_in, three_x
from subq.profile.ops.flash_sizes import ABBREV, invalid_with_sdpa
from subq.reference import flash_chunked_ref

_QK = ("q_quad", "k_quad", "q_lin", "k_lin")


def _chunk_flops(size: Size) -> float:
    b, G, S, E, C = size["batch"], chunks(size), size["qk_dim"], size["value_dim"], size["chunk_size"]
    return 2 * b * G * (C * C * S + C * C * E + 2 * C * S * E)


def _useful_flops(size: Size) -> float:
    b, L, S, E, C = size["batch"], size["seqlen"], size["qk_dim"], size["value_dim"], size["chunk_size"]
    last = L - (chunks(size) - 1) * C
    if size["causal"]:
        pairs = (chunks(size) - 1) * C * (C + 1) // 2 + last * (last + 1) // 2
        return b * (pairs * (2 * S + 2 * E) + 2 * S * E * L + 2 * S * E * (L - last))
    pairs = (chunks(size) - 1) * C * C + last * last
    return b * (pairs * (2 * S + 2 * E) + 2 * 2 * S * E * L)


def _inputs(size: Size, dtype: torch.dtype, device: torch.device) -> Inputs:
    """Standard normal inputs: with quad_scale = 1/C the chunk scores q . k / C stay O(1)."""
    b, L, S, E = size["batch"], size["seqlen"], size["qk_dim"], size["value_dim"]
    inputs = {name: leaf(b, L, S, dtype=dtype, device=device) for name in _QK}
    inputs["v"] = leaf(b, L, E, dtype=dtype, device=device)
    inputs |= sdpa_inputs(b, E // S, L, S, dtype, device)
    inputs["dy"] = torch.randn(b, L, E, device=device).to(dtype)
    return inputs


def _work_bytes(size: Size, dtype: torch.dtype) -> int:
    """fp32 (b, G, C, C) squares (scores, relu², masked, their gradients), (b, G, S, E) states and prefix sums and
    their gradients, (b, L, E) partial outputs and gradients; a generous count of each."""
    b, S, E, C = size["batch"], size["qk_dim"], size["value_dim"], size["chunk_size"]
    G = chunks(size)
    return 4 * (10 * b * G * C * C + 8 * b * G * S * E + 8 * b * G * C * (E + S))


def _flash(i: Inputs, s: Size, fn) -> torch.Tensor:
    return fn(i["q_quad"], i["k_quad"], i["q_lin"], i["k_lin"], i["v"], chunk_size=s["chunk_size"],
              causal=bool(s["causal"]))


_SUBQ = Impl("subq", lambda i, s: _flash(i, s, subq.ops.flash_chunk_attention), (*_QK, "v"),
             three_x(_chunk_flops), three_x(_useful_flops))
_REFERENCE = Impl("flash_chunked_ref", lambda i, s: _flash(i, s, flash_chunked_ref), (*_QK, "v"),
                  three_x(_chunk_flops), three_x(_useful_flops))

FLASH = OpSpec(
    name="flash_chunk_attention",
    summary="FLASH mixed-chunk attention; baselines: subq.reference.flash_chunked_ref (eager, compiled), SDPA",
    full={"batch": [4], "seqlen": [1024, 4096, 16384], "qk_dim": [128], "value_dim": [1536], "chunk_size": [256],
          "causal": [0, 1]},
    quick={"batch": [1], "seqlen": [256], "qk_dim": [32], "value_dim": [64], "chunk_size": [64], "causal": [1]},
    make_inputs=_inputs,
    impls=(
        _SUBQ,
        opt_in(_SUBQ, "subq_fused", "SUBQ_EXPERIMENTAL_FLASH_KERNELS"),
        _REFERENCE,
        compiled(_REFERENCE),
        sdpa("sdpa", width=lambda s: s["value_dim"], causal=lambda s: bool(s["causal"])),
    ),
    check_against="flash_chunked_ref",
    work_bytes=_work_bytes,
    invalid=invalid_with_sdpa,
    abbrev=ABBREV,
)
