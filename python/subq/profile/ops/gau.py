"""``gau_attention``: FLASH-Quad's relu² attention over the whole sequence (single head, no gate u or relative bias,
scale 1/L), causal or bidirectional, against the plain PyTorch formula in the same dtype
(``subq.reference.gau_attention_ref``: the L x L matrix written out) and against softmax attention
(ops/attention.py) of the same width and mode: E / S heads of size S.

Size (ops/flash_sizes.py): b ``batch``, L ``seqlen``, S ``qk_dim`` (q, k), E ``value_dim`` (v and the output),
``causal`` 0 or 1.

matmul FLOPs. subq (csrc/flash/flash_cpu.cpp; update this when a CUDA kernel lands) walks key tiles of
  T = 256 keys when causal (bidirectional tiles are larger, which leaves R below unchanged); tile j
  (cols = min(T, L - jT) keys) is seen by rows = L queries, or L - jT when causal (the queries
  from the tile's first key on). R = sum over tiles of rows x cols (L^2 bidirectional, about L^2 / 2 causal); R' = R
  bidirectional, and causal the same with each tile's diagonal square (cols x cols) counted as the strict lower
  triangle of that square padded to a power of two P, P (P - 1) / 2 pairs (the products with V, dV, dQ and dK are
  formed as that triangle, never multiplying masked entries):
    fwd 2 b (R S + R' E)   (scores, relu² V)
    fwd+bwd 2 b (R (2 S + E) + R' (2 S + 2 E)): the backward recomputes the scores (S, R) and forms dP (E, R), then
    dV (E), dQ and dK (S each) over R'.
  reference: the full square whatever the mode, fwd 2 b L^2 (S + E), fwd+bwd 3x (autograd, nothing recomputed).
useful FLOPs: 2 S (q . k) + 2 E (p v) per attended pair, L^2 bidirectional or L (L + 1) / 2 causal; 3x for fwd+bwd.
Minimum bytes: q, k, v in and the output out; per ops/base.py for fwd+bwd.
"""

from __future__ import annotations

import torch

import subq
from subq.profile.ops.attention import sdpa, sdpa_inputs
from subq.profile.ops.base import Impl, Inputs, OpSpec, Size, leaf, three_x
from subq.profile.ops.flash_sizes import ABBREV, invalid_with_sdpa
from subq.reference import gau_attention_ref

KEY_TILE = 256  # kKeyTile in csrc/flash/flash_cpu.cpp (causal tiles)
_LEAVES = ("q", "k", "v")


def _tile_pairs(size: Size, triangle: bool) -> int:
    """The (query, key) pairs subq's key tiles compute: all rows x cols of a tile, or with ``triangle`` (causal) its
    diagonal square as the strict lower triangle of the square padded to a power of two, P (P - 1) / 2."""
    L, causal = size["seqlen"], size["causal"]
    pairs = 0
    for k0 in range(0, L, KEY_TILE):
        cols = min(KEY_TILE, L - k0)
        rows = L - k0 if causal else L
        if causal and triangle:
            padded = 1 << (cols - 1).bit_length()
            pairs += (rows - cols) * cols + padded * (padded - 1) // 2
        else:
            pairs += rows * cols
    return pairs


def _subq_matmul_flops(size: Size, pass_name: str) -> float:
    S, E = size["qk_dim"], size["value_dim"]
    full, triangle = _tile_pairs(size, triangle=False), _tile_pairs(size, triangle=True)
    if pass_name == "fwd":
        return 2 * size["batch"] * (full * S + triangle * E)
    return 2 * size["batch"] * (full * (2 * S + E) + triangle * (2 * S + 2 * E))


def _reference_flops(size: Size) -> float:
    return 2 * size["batch"] * size["seqlen"] ** 2 * (size["qk_dim"] + size["value_dim"])


def _useful_flops(size: Size) -> float:
    L = size["seqlen"]
    pairs = L * (L + 1) // 2 if size["causal"] else L * L
    return 2 * size["batch"] * pairs * (size["qk_dim"] + size["value_dim"])


def _inputs(size: Size, dtype: torch.dtype, device: torch.device) -> Inputs:
    b, L, S, E = size["batch"], size["seqlen"], size["qk_dim"], size["value_dim"]
    return {
        "q": leaf(b, L, S, dtype=dtype, device=device), "k": leaf(b, L, S, dtype=dtype, device=device),
        "v": leaf(b, L, E, dtype=dtype, device=device),
        **sdpa_inputs(b, E // S, L, S, dtype, device),
        "dy": torch.randn(b, L, E, device=device).to(dtype),
    }


def _work_bytes(size: Size, dtype: torch.dtype) -> int:
    """The reference's (b, L, L) matrices (scores, relu, relu², masked, the ones autograd keeps, their gradients)
    in the run's dtype; subq's fp32 (b, L, T) tiles and (b, L, S + E) copies and gradients: a generous count."""
    b, L, S, E = size["batch"], size["seqlen"], size["qk_dim"], size["value_dim"]
    return 10 * b * L * L * dtype.itemsize + 4 * (6 * b * L * KEY_TILE + 8 * b * L * (S + E))


def _gau(i: Inputs, s: Size, fn) -> torch.Tensor:
    return fn(i["q"], i["k"], i["v"], causal=bool(s["causal"]))


GAU = OpSpec(
    name="gau_attention",
    summary="FLASH-Quad relu² attention, causal or not; baselines: subq.reference.gau_attention_ref, SDPA",
    full={"batch": [4], "seqlen": [1024, 4096, 16384], "qk_dim": [128], "value_dim": [1536], "causal": [0, 1]},
    quick={"batch": [1], "seqlen": [256], "qk_dim": [32], "value_dim": [64], "causal": [0, 1]},
    make_inputs=_inputs,
    impls=(
        Impl("subq", lambda i, s: _gau(i, s, subq.ops.gau_attention), _LEAVES,
             _subq_matmul_flops, three_x(_useful_flops)),
        Impl("gau_attention_ref", lambda i, s: _gau(i, s, gau_attention_ref), _LEAVES,
             three_x(_reference_flops), three_x(_useful_flops)),
        sdpa("sdpa", width=lambda s: s["value_dim"], causal=lambda s: bool(s["causal"])),
    ),
    check_against="gau_attention_ref",
    work_bytes=_work_bytes,
    invalid=invalid_with_sdpa,
    abbrev=ABBREV,
)
