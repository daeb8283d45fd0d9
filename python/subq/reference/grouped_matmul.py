"""Grouped (segment) matmul: rows sorted by group, each group multiplied by its own weight."""

from __future__ import annotations

import torch


def grouped_matmul_ref(x: torch.Tensor, w: torch.Tensor, group_sizes: torch.Tensor,
                       bias: torch.Tensor | None = None) -> torch.Tensor:
    """``y[rows of group g] = x[rows of group g] @ w[g] (+ bias[g])``.

    x (T, K) with its rows sorted by group: the first ``group_sizes[0]`` rows belong to group 0, the next
    ``group_sizes[1]`` to group 1, and so on; w (G, K, N); group_sizes (G,) integer; bias (G, N) or None.
    Rows past ``group_sizes.sum()`` belong to no group and come out as zeros. Returns (T, N).
    """
    y = x.new_zeros(x.shape[0], w.shape[2])
    start = 0
    for g, size in enumerate(group_sizes.tolist()):
        rows = slice(start, start + size)
        y[rows] = x[rows] @ w[g] + (0 if bias is None else bias[g])
        start += size
    return y
