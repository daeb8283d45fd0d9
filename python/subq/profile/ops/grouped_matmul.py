"""``grouped_matmul``: the routed GEMM of Mixture-of-Modules, tokens sorted by module, one weight per module.

Size: T ``tokens``, G ``groups`` (modules), K ``k`` (in features), N ``n`` (out features); the tokens are split as
evenly as possible over the groups (balanced routing, what the load-balancing loss aims for).

FLOPs (forward; fwd+bwd is 3x: dx and dw for each group's product), the same for every implementation, matmul and
useful alike: 2 T K N.
Baselines: ``torch_loop``, one ``x_g @ w[g]`` per group (what a Python MoE layer does; it needs the group sizes on
the host, which here come from the size, not from a device read); ``dense``, one ``F.linear`` of all T tokens with a
single (K, N) weight: the FLOP-equivalent dense layer, the ceiling a grouped GEMM can approach.
Minimum bytes (e = element size): (T K + G K N + T N) e forward (dense: (T K + K N + T N) e); fwd+bwd per
ops/base.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import subq
from subq.profile.ops.base import Impl, Inputs, OpSpec, Size, leaf, normal, three_x

ABBREV = {"tokens": "T", "groups": "G", "k": "K", "n": "N"}


def balanced_sizes(size: Size) -> list[int]:
    """Group sizes that differ by at most one and sum to the token count."""
    base, extra = divmod(size["tokens"], size["groups"])
    return [base + (g < extra) for g in range(size["groups"])]


def _inputs(size: Size, dtype: torch.dtype, device: torch.device) -> Inputs:
    t, g, k, n = size["tokens"], size["groups"], size["k"], size["n"]
    return {
        "x": leaf(t, k, dtype=dtype, device=device),
        "w": leaf(g, k, n, dtype=dtype, device=device, scale=k**-0.5),
        "group_sizes": torch.tensor(balanced_sizes(size), dtype=torch.int64, device=device),
        "dense_w": leaf(n, k, dtype=dtype, device=device, scale=k**-0.5),
        "dy": normal(t, n, dtype=dtype, device=device),
    }


def torch_loop(inputs: Inputs, size: Size) -> torch.Tensor:
    parts = inputs["x"].split(balanced_sizes(size))
    return torch.cat([part @ inputs["w"][g] for g, part in enumerate(parts)])


def _flops(size: Size) -> float:
    return 2 * size["tokens"] * size["k"] * size["n"]


def _work_bytes(size: Size, dtype: torch.dtype) -> int:
    """Output, its gradient, dx and dw (and the loop's per-group pieces), twice over."""
    e = torch.finfo(dtype).bits // 8
    t, g, k, n = size["tokens"], size["groups"], size["k"], size["n"]
    return 2 * (3 * t * n + t * k + g * k * n + k * n) * e


def _invalid(size: Size) -> str | None:
    if min(size.values()) < 1:
        return "every size must be at least 1"
    return None


GROUPED_MATMUL = OpSpec(
    name="grouped_matmul",
    summary="routed grouped GEMM (Mixture-of-Modules); baselines: a per-group torch loop, one dense F.linear",
    full={"tokens": [16384], "groups": [8, 64], "k": [768, 3072], "n": [768, 3072]},
    quick={"tokens": [512], "groups": [4], "k": [64], "n": [96]},
    make_inputs=_inputs,
    impls=(
        Impl("subq", lambda i, s: subq.ops.grouped_matmul(i["x"], i["w"], i["group_sizes"]), ("x", "w"),
             three_x(_flops), three_x(_flops)),
        Impl("torch_loop", torch_loop, ("x", "w"), three_x(_flops), three_x(_flops)),
        Impl("dense", lambda i, s: F.linear(i["x"], i["dense_w"]), ("x", "dense_w"), three_x(_flops),
             three_x(_flops)),
    ),
    check_against="torch_loop",
    work_bytes=_work_bytes,
    invalid=_invalid,
    abbrev=ABBREV,
)
