"""Monarch products as dense matrices: block_diag of the factors and explicit permutation indices."""

from __future__ import annotations

import torch


def _transpose_perm(rows: int, cols: int) -> torch.Tensor:
    """Indices that turn a flattened (rows, cols) vector into its flattened (cols, rows) transpose."""
    return torch.arange(rows * cols).reshape(rows, cols).t().reshape(-1)


def blockdiag_matmul_ref(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """y = x @ block_diag(w[0], ..., w[nb-1])^T."""
    return x @ torch.block_diag(*w).t()


def monarch_dense_matrix(w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """The dense (l*s, k*p) matrix M = P_out L P R of the order-2 Monarch product y = M x."""
    l, s, r = w2.shape
    right = torch.block_diag(*w1)                         # (k*q, k*p): t = R x
    left = torch.block_diag(*w2)                          # (l*s, l*r): o = L u
    perm_mid = _transpose_perm(r, l)                      # u = t viewed (r, l), transposed: u = t[perm_mid]
    perm_out = _transpose_perm(l, s)                      # y = o viewed (l, s), transposed: y = o[perm_out]
    return left[perm_out] @ right[perm_mid]


def monarch_matmul_ref(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """y = P^T L P R x along the last dimension of x, step by step as in the Monarch paper."""
    l, s, r = w2.shape
    t = x @ torch.block_diag(*w1).t()                     # (..., k*q)
    u = t[..., _transpose_perm(r, l)]                     # view (r, l), transpose to (l, r)
    o = u @ torch.block_diag(*w2).t()                     # (..., l*s)
    return o[..., _transpose_perm(l, s)]                  # view (l, s), transpose to (s, l)
