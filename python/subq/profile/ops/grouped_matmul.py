"""``grouped_matmul``: the routed GEMM of Mixture-of-Modules, tokens sorted by module, one weight per module.

Size: T ``tokens``, G ``groups`` (modules), K ``k`` (in features), N ``n`` (out features), ``skewed`` (0 or 1): the
tokens split as evenly as possible over the groups (balanced routing, what the load-balancing loss aims for), or
skewed, group g's share proportional to 1 / (g + 1)^2 (a few large groups, the tail near empty or empty).

FLOPs (forward; fwd+bwd is 3x: dx and dw for each group's product), the same for every implementation, matmul and
useful alike: 2 T K N.
subq_cutlass is subq with SUBQ_EXPERIMENTAL_GROUPED_GEMM=1 (CUDA: one persistent CUTLASS grouped GEMM launch).
Baselines: ``torch_loop``, one ``x_g @ w[g]`` per group (what a Python MoE layer does; it needs the group sizes on
the host, which here come from the size, not from a device read); ``torch_grouped_mm``, ``torch._grouped_mm`` where
this torch has it (CUDA); ``dense``, one ``F.linear`` of all T tokens with a single (K, N) weight: the
FLOP-equivalent dense layer, the ceiling a grouped GEMM can approach.
Minimum bytes (e = element size): (T K + G K N + T N) e forward (dense: (T K + K N + T N) e); fwd+bwd per
ops/base.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import subq
from subq.profile.ops.base import Impl, Inputs, OpSpec, Size, leaf, normal, opt_in, three_x

ABBREV = {"tokens": "T", "groups": "G", "k": "K", "n": "N", "skewed": "skew"}
SKEW = 2.0  # the exponent of the skewed shares


def group_sizes(size: Size) -> list[int]:
    """Rows per group, summing to the token count: proportional to the shares, the rounding's remainder one row each
    to the first groups (balanced: sizes that differ by at most one)."""
    t, g = size["tokens"], size["groups"]
    shares = [(i + 1) ** -SKEW if size.get("skewed") else 1.0 for i in range(g)]
    counts = [int(t * w / sum(shares)) for w in shares]
    for i in range(t - sum(counts)):
        counts[i % g] += 1
    return counts


def _inputs(size: Size, dtype: torch.dtype, device: torch.device) -> Inputs:
    t, g, k, n = size["tokens"], size["groups"], size["k"], size["n"]
    w = leaf(g, k, n, dtype=dtype, device=device, scale=k**-0.5)
    counts = torch.tensor(group_sizes(size), dtype=torch.int64, device=device)
    return {
        "x": leaf(t, k, dtype=dtype, device=device),
        "w": w,
        "group_sizes": counts,
        # torch._grouped_mm's operands: the K-major weight (used transposed) and the groups' int32 cumulative ends
        "w_t": w.detach().transpose(1, 2).contiguous().requires_grad_(),
        "offsets": counts.cumsum(0).to(torch.int32),
        "dense_w": leaf(n, k, dtype=dtype, device=device, scale=k**-0.5),
        "dy": normal(t, n, dtype=dtype, device=device),
    }


def torch_loop(inputs: Inputs, size: Size) -> torch.Tensor:
    parts = inputs["x"].split(group_sizes(size))
    return torch.cat([part @ inputs["w"][g] for g, part in enumerate(parts)])


def _grouped_mm_unavailable(device: torch.device) -> str | None:
    if not hasattr(torch, "_grouped_mm"):
        return f"torch {torch.__version__} has no torch._grouped_mm"
    return None if device.type == "cuda" else "torch._grouped_mm is timed on CUDA only"


def _flops(size: Size) -> float:
    return 2 * size["tokens"] * size["k"] * size["n"]


def _work_bytes(size: Size, dtype: torch.dtype) -> int:
    """Output, its gradient, dx and dw (and the loop's per-group pieces), twice over."""
    e = torch.finfo(dtype).bits // 8
    t, g, k, n = size["tokens"], size["groups"], size["k"], size["n"]
    return 2 * (3 * t * n + t * k + g * k * n + k * n) * e


def _invalid(size: Size) -> str | None:
    if min(v for axis, v in size.items() if axis != "skewed") < 1:
        return "every size must be at least 1"
    if size["skewed"] not in (0, 1):
        return f"skewed must be 0 or 1, got {size['skewed']}"
    return None


_SUBQ = Impl("subq", lambda i, s: subq.ops.grouped_matmul(i["x"], i["w"], i["group_sizes"]), ("x", "w"),
             three_x(_flops), three_x(_flops))

GROUPED_MATMUL = OpSpec(
    name="grouped_matmul",
    summary="routed grouped GEMM (Mixture-of-Modules); baselines: a per-group torch loop, torch._grouped_mm, one "
            "dense F.linear",
    full={"tokens": [16384], "groups": [8, 64], "k": [768, 3072], "n": [768, 3072], "skewed": [0, 1]},
    quick={"tokens": [512], "groups": [4], "k": [64], "n": [96], "skewed": [0]},
    make_inputs=_inputs,
    impls=(
        _SUBQ,
        opt_in(_SUBQ, "subq_cutlass", "SUBQ_EXPERIMENTAL_GROUPED_GEMM"),
        Impl("torch_loop", torch_loop, ("x", "w"), three_x(_flops), three_x(_flops)),
        Impl("torch_grouped_mm", lambda i, s: torch._grouped_mm(i["x"], i["w_t"].transpose(1, 2), offs=i["offsets"]),
             ("x", "w_t"), three_x(_flops), three_x(_flops), unavailable=_grouped_mm_unavailable),
        Impl("dense", lambda i, s: F.linear(i["x"], i["dense_w"]), ("x", "dense_w"), three_x(_flops),
             three_x(_flops)),
    ),
    check_against="torch_loop",
    work_bytes=_work_bytes,
    invalid=_invalid,
    abbrev=ABBREV,
)
