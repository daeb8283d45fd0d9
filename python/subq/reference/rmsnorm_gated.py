"""Gated RMSNorm (Mamba-2's RMSNormGated), written out in plain PyTorch."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rmsnorm_gated_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    z: torch.Tensor | None = None,
    eps: float = 1e-6,
    group_size: int | None = None,
    norm_before_gate: bool = True,
) -> torch.Tensor:
    """norm(v) = v / sqrt(mean(v^2 over each group of group_size features) + eps) * weight, and with a gate
    z: norm(x) * silu(z) (norm_before_gate) or norm(x * silu(z)). Computes in the inputs' dtype (type promotion)."""
    dim = x.shape[-1]
    group_size = dim if group_size is None else group_size
    v = x * F.silu(z) if z is not None and not norm_before_gate else x
    groups = v.reshape(*v.shape[:-1], dim // group_size, group_size)
    normed = groups / torch.sqrt(groups.square().mean(-1, keepdim=True) + eps)
    y = normed.reshape(v.shape) * weight
    return y * F.silu(z) if z is not None and norm_before_gate else y
