"""Rotary position embedding (RoPE, Su et al. 2021), shared by every layer that rotates queries and keys."""

from __future__ import annotations

import torch


def rotary_embedding(x: torch.Tensor, positions: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """RoPE on the last dim of ``x (..., L, S)`` in the rotate-half layout: features i and i + S//2 form a pair
    rotated by ``positions[l] · base^(-i / (S//2))``; an odd last feature is left as is. Then
    ``rope(q, m) · rope(k, n)`` depends on m - n only. Angles in float32 (float64 for float64 inputs).

    ``positions (L,)`` are absolute: a cached decoder passes the cache's offset, a context-parallel shard its
    global positions."""
    half = x.shape[-1] // 2
    angle_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    inv_freq = base ** (-torch.arange(half, device=x.device, dtype=angle_dtype) / max(half, 1))
    angles = positions.to(angle_dtype)[:, None] * inv_freq                 # (L, half)
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x1, x2, rest = x[..., :half], x[..., half:2 * half], x[..., 2 * half:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos, rest], dim=-1)
