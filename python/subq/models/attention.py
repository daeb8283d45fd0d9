"""Causal multi-head self-attention with rotary embeddings and a KV cache: the attention layers of hybrid models."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


def rotary(x: torch.Tensor, positions: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """RoPE on the last dimension of ``x (batch, heads, seqlen, headdim)``, rotating pairs (i, i + headdim/2)."""
    half = x.shape[-1] // 2
    inv_freq = base ** (-torch.arange(half, device=x.device, dtype=torch.float32) / half)
    angles = positions.float()[:, None] * inv_freq
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


@dataclass
class KVCache:
    keys: torch.Tensor     # (batch, heads, max_seqlen, headdim)
    values: torch.Tensor
    length: int = 0        # positions filled


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, num_heads: int, device=None, dtype=None):
        super().__init__()
        if d_model % num_heads:
            raise ValueError(f"d_model ({d_model}) must be a multiple of num_heads ({num_heads})")
        self.num_heads, self.headdim = num_heads, d_model // num_heads
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False, device=device, dtype=dtype)
        self.out_proj = nn.Linear(d_model, d_model, bias=False, device=device, dtype=dtype)

    def allocate_inference_cache(self, batch_size: int, max_seqlen: int, dtype=None, device=None) -> KVCache:
        shape = (batch_size, self.num_heads, max_seqlen, self.headdim)
        kw = dict(device=device or self.qkv.weight.device, dtype=dtype or self.qkv.weight.dtype)
        return KVCache(torch.zeros(shape, **kw), torch.zeros(shape, **kw))

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        batch, seqlen, d_model = x.shape
        q, k, v = self.qkv(x).view(batch, seqlen, 3, self.num_heads, self.headdim).permute(2, 0, 3, 1, 4)
        start = 0 if cache is None else cache.length
        positions = torch.arange(start, start + seqlen, device=x.device)
        q, k = rotary(q, positions), rotary(k, positions)
        if cache is not None:
            if start + seqlen > cache.keys.shape[2]:
                raise ValueError(f"the KV cache holds {cache.keys.shape[2]} positions; {start + seqlen} needed")
            cache.keys[:, :, start:start + seqlen] = k
            cache.values[:, :, start:start + seqlen] = v
            cache.length = start + seqlen
            k, v = cache.keys[:, :, :start + seqlen], cache.values[:, :, :start + seqlen]
        if start == 0:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:  # queries at positions start.. see every cached key up to their own position
            mask = torch.ones(seqlen, start + seqlen, dtype=torch.bool, device=x.device).tril(start)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out_proj(out.transpose(1, 2).reshape(batch, seqlen, d_model))
