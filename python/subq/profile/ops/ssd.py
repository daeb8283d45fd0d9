"""``ssd_chunk_scan``: Mamba-2's SSD layer by the chunk algorithm, with its opt-in fused kernels (subq_fused), against
the plain PyTorch chunked reference in the same dtype (eager and, on CUDA, torch.compile), causal attention
(ops/attention.py) at the same (batch, seqlen, heads, headdim), and flash-linear-attention's chunk_simple_gla where
fla is installed (CUDA). The inputs are x, dt (fp32), A (fp32), B and C; no D, z or dt processing.

Size: b ``batch``, L ``seqlen``, H ``nheads``, P ``headdim``, N ``dstate``, G ``ngroups``, Q ``chunk_size``;
c = ceil(L / Q) chunks (the last one zero-padded, and the padding is computed).

matmul FLOPs: one formula, ``chunk_scan_flops``, the four products of the chunk algorithm per chunk (forward):
  1. intra-chunk C B^T        2 Q^2 N    per group
  2. intra-chunk scores . X   2 Q^2 P    per head
  3. chunk states B^T X       2 Q N P    per head
  4. state to output C h      2 Q N P    per head
  (state passing between chunks is elementwise, c H P N, and not a matmul)
  Step 1 is per group, not per head: C_t . B_s depends only on the group, whose heads share B and C; each head's
  decay exp(segsum(dt A)) multiplies the Q x Q product elementwise afterwards. So the algorithm's forward is
  2 b c (G Q^2 N + H Q^2 P + 2 H Q N P). (The removed bench/bench_ssd.py counted this with G fixed at 1 and 3x
  for every fwd+bwd; this file counted C B^T per head for the reference: both are this one formula, evaluated for
  what each callable executes.) A callable that repeats B and C to the heads (the reference, fla) executes step 1
  H times, and a fwd+bwd adds two products per forward product plus what its backward recomputes:
  subq       fwd+bwd 2 b c (4 G Q^2 N + 3 H Q^2 P + 8 H Q N P): its backward recomputes steps 1 and 3 and
             step 4's C h (csrc/ssd/ssd_chunk_scan_cpu.cpp; the fused kernels are counted the same)
  reference  step 1 per head, fwd+bwd 3x (autograd, nothing recomputed); fla the same at its own chunk size
             (approximate: fla chunks by 64)
useful FLOPs, the recurrence h_t = exp(dt A) h_{t-1} + (dt x_t) B_t^T, y_t = h_t C_t per (b, t, h): P for dt x,
  3 P N for the update (two products, one sum per state entry), 2 P N for the output: b L H P (5 N + 1) forward.
Attention at width H P, causal: per ops/attention.py.
Minimum bytes: x, dt, A, B, C in and y out for the SSD (B, C are b L G N; dt, A fp32); per ops/base.py for fwd+bwd.
"""

from __future__ import annotations

import torch

import subq
from subq.ops.ssd import CHUNK_SIZES, MAX_DSTATE, MAX_HEADDIM
from subq.profile.ops.attention import sdpa, sdpa_inputs
from subq.profile.ops.base import Impl, Inputs, OpSpec, Size, chunks, compiled, leaf, opt_in, peer, three_x
from subq.reference import ssd_chunked_ref


_RECOMPUTED_BY_SUBQ = (1, 0, 1, 1)  # steps 1-4 that subq's backward computes again


def chunk_scan_flops(size: Size, pass_name: str, step1_copies: str = "ngroups",
                     recomputed: tuple[int, int, int, int] = (0, 0, 0, 0)) -> float:
    """Matmul FLOPs of the chunk algorithm's four products, step 1 done once per ``step1_copies`` (the groups, or
    the heads for a callable that repeats B and C); fwd+bwd: 3x, plus the ``recomputed`` steps once more."""
    b, c, H, P, N, Q = (size["batch"], chunks(size), size["nheads"], size["headdim"], size["dstate"],
                        size["chunk_size"])
    steps = (size[step1_copies] * Q * Q * N, H * Q * Q * P, H * Q * N * P, H * Q * N * P)
    times = (1,) * 4 if pass_name == "fwd" else tuple(3 + r for r in recomputed)
    return 2 * b * c * sum(t * s for t, s in zip(times, steps, strict=True))


def recurrence_flops(size: Size) -> float:
    """b L H P (5 N + 1); a decode step (no ``seqlen`` axis) is one token per batch row."""
    tokens = size["batch"] * size.get("seqlen", 1)
    return tokens * size["nheads"] * size["headdim"] * (5 * size["dstate"] + 1)


def mamba2_dt(*shape: int, device: torch.device) -> torch.Tensor:
    """fp32 dt in Mamba-2's range after softplus, [1e-3, 1e-1]."""
    return torch.rand(*shape, device=device) * (0.1 - 1e-3) + 1e-3


def mamba2_A(nheads: int, device: torch.device) -> torch.Tensor:
    """fp32 A in Mamba-2's initialisation range, [-16, -1]."""
    return -1 - 15 * torch.rand(nheads, device=device)


def _invalid(size: Size) -> str | None:
    if min(size.values()) < 1:
        return "every size must be at least 1"
    if size["chunk_size"] not in CHUNK_SIZES:
        return f"chunk_size must be one of {CHUNK_SIZES}, got {size['chunk_size']}"
    if size["headdim"] > MAX_HEADDIM:
        return f"headdim must be at most {MAX_HEADDIM}, got {size['headdim']}"
    if size["dstate"] > MAX_DSTATE:
        return f"dstate must be at most {MAX_DSTATE}, got {size['dstate']}"
    if size["nheads"] % size["ngroups"]:
        return f"ngroups={size['ngroups']} must divide nheads={size['nheads']}"
    return None


def _inputs(size: Size, dtype: torch.dtype, device: torch.device) -> Inputs:
    """Mamba-2's dt and A ranges; B, C scaled so C.B is O(1)."""
    b, L, H, P, N, G = (size[k] for k in ("batch", "seqlen", "nheads", "headdim", "dstate", "ngroups"))
    return {
        "x": leaf(b, L, H, P, dtype=dtype, device=device),
        "dt": mamba2_dt(b, L, H, device=device).requires_grad_(), "A": mamba2_A(H, device).requires_grad_(),
        "B": leaf(b, L, G, N, dtype=dtype, device=device, scale=N**-0.5),
        "C": leaf(b, L, G, N, dtype=dtype, device=device, scale=N**-0.5),
        **sdpa_inputs(b, H, L, P, dtype, device),
        "dy": torch.randn(b, L, H, P, device=device).to(dtype),
    }


def _work_bytes(size: Size, dtype: torch.dtype) -> int:
    """fp32 (b, c, H, Q, Q) squares (segment sums, decays, scores, their gradients, the ones autograd keeps),
    (b, L, H, P) activations and gradients, (b, c, H, P, N) chunk and entering states and their gradients."""
    b, L, H, P, N, Q = (size[k] for k in ("batch", "seqlen", "nheads", "headdim", "dstate", "chunk_size"))
    c = chunks(size)
    return 4 * (12 * b * c * H * Q * Q + 16 * b * c * Q * H * P + 6 * b * c * H * P * N)


def fla_chunk_simple_gla(i: Inputs, s: Size) -> torch.Tensor:
    """flash-linear-attention's chunked gated linear attention computing the SSD: the state S_t = exp(g_t) S_{t-1}
    + k_t v_t^T, o_t = q_t S_t is the recurrence with g = dt A, q = C, k = B (repeated to the heads), v = dt x."""
    from fla.ops.simple_gla import chunk_simple_gla

    heads_per_group = s["nheads"] // s["ngroups"]
    q, k = (i[n].repeat_interleave(heads_per_group, dim=2) for n in ("C", "B"))
    x = i["x"] * i["dt"][..., None].to(i["x"].dtype)
    return chunk_simple_gla(q, k, x, g=i["dt"] * i["A"], scale=1.0)[0]


_LEAVES = ("x", "dt", "A", "B", "C")
_SUBQ = Impl("subq", lambda i, s: subq.ops.ssd_chunk_scan(i["x"], i["dt"], i["A"], i["B"], i["C"],
                                                          chunk_size=s["chunk_size"]),
             _LEAVES, lambda s, p: chunk_scan_flops(s, p, recomputed=_RECOMPUTED_BY_SUBQ), three_x(recurrence_flops))
_REFERENCE = Impl("ssd_chunked_ref", lambda i, s: ssd_chunked_ref(i["x"], i["dt"], i["A"], i["B"], i["C"],
                                                                  s["chunk_size"])[0],
                  _LEAVES, lambda s, p: chunk_scan_flops(s, p, step1_copies="nheads"), three_x(recurrence_flops))

SSD = OpSpec(
    name="ssd_chunk_scan",
    summary="Mamba-2 SSD chunk scan; baselines: subq.reference.ssd_chunked_ref (eager, compiled), causal SDPA, "
            "fla's chunk_simple_gla",
    full={"batch": [2], "seqlen": [1024, 4096, 16384], "nheads": [32], "headdim": [64], "dstate": [128],
          "ngroups": [1], "chunk_size": [256]},
    quick={"batch": [1], "seqlen": [256, 512], "nheads": [4], "headdim": [32], "dstate": [32], "ngroups": [1],
           "chunk_size": [64]},
    make_inputs=_inputs,
    impls=(
        _SUBQ,
        opt_in(_SUBQ, "subq_fused", "SUBQ_EXPERIMENTAL_SSD_KERNELS"),
        _REFERENCE,
        compiled(_REFERENCE),
        sdpa("sdpa_causal", width=lambda s: s["nheads"] * s["headdim"], causal=lambda s: True),
        peer(Impl("fla_chunk_simple_gla", fla_chunk_simple_gla, _LEAVES, _REFERENCE.matmul_flops,
                  three_x(recurrence_flops)), "fla"),
    ),
    check_against="ssd_chunked_ref",
    work_bytes=_work_bytes,
    invalid=_invalid,
    abbrev={"batch": "b", "seqlen": "L", "nheads": "H", "headdim": "P", "dstate": "N", "ngroups": "G",
            "chunk_size": "Q"},
)
