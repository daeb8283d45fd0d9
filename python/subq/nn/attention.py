"""Causal softmax self-attention and its KV cache: the attention layers of the Mamba-2 hybrids and the Transformer
baseline (:class:`CausalSelfAttention`, with RoPE), the attention of MoM's routed modules (:func:`causal_attention`
and :class:`KVCache`, with keys a token can hide), and the cache GAU decodes from."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from subq.nn.rope import rotary_embedding


@dataclass
class KVCache:
    """Keys and values of one attention call for generation, one row per sequence (MoM: per routing slot and
    sequence), positions on dim -2, and, where a token may hide its key (MoM: a token that skipped the slot),
    whether each position is visible as a key."""

    keys: torch.Tensor                    # (rows, heads, max_seqlen, headdim); GAU: (rows, max_seqlen, S)
    values: torch.Tensor
    visible: torch.Tensor | None = None   # (rows, max_seqlen) bool; None: every key is visible
    length: int = 0                       # positions filled

    @classmethod
    def allocate(cls, rows: int, heads: int, max_seqlen: int, headdim: int, device, dtype,
                 hidden_keys: bool = False) -> KVCache:
        shape = (rows, heads, max_seqlen, headdim)
        visible = torch.zeros(rows, max_seqlen, dtype=torch.bool, device=device) if hidden_keys else None
        return cls(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype),
                   visible)

    def append(self, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor | None = None):
        """Store the keys/values of T new positions ``(rows, ..., T, features)``; return the start position and
        everything cached so far: ``start, keys, values, visible`` (visible None when the cache tracks none)."""
        start, end = self.length, self.length + k.shape[-2]
        if end > self.keys.shape[-2]:
            raise ValueError(f"the KV cache holds {self.keys.shape[-2]} positions; {end} needed")
        if k.shape[0] != self.keys.shape[0]:
            raise ValueError(f"the KV cache was allocated for {self.keys.shape[0]} rows (sequences × routing slots), "
                             f"got {k.shape[0]}; allocate it for this batch size")
        self.keys[..., start:end, :] = k
        self.values[..., start:end, :] = v
        self.length = end
        keys, values = self.keys[..., :end, :], self.values[..., :end, :]
        if self.visible is None:
            return start, keys, values, None
        self.visible[:, start:end] = True if visible is None else visible
        return start, keys, values, self.visible[:, :end]


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_visible: torch.Tensor | None = None,
                     start: int = 0) -> torch.Tensor:
    """Softmax attention of ``q (rows, heads, Tq, hd)`` at positions ``start..`` over keys at ``0..Tk-1``: query i
    sees key j iff j <= start + i and key j is visible (``key_visible (rows, Tk)``, None = all) or is the query's
    own position, so a query always sees at least itself and no row is empty."""
    if start == 0 and key_visible is None:  # the plain causal square: SDPA's causal kernels, no mask tensor
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    q_pos = torch.arange(start, start + q.shape[2], device=q.device)[:, None]
    k_pos = torch.arange(k.shape[2], device=q.device)
    mask = k_pos <= q_pos
    if key_visible is not None:
        mask = mask & (key_visible[:, None, None, :] | (k_pos == q_pos))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with RoPE, one fused QKV projection and no biases."""

    def __init__(self, d_model: int, num_heads: int, device=None, dtype=None):
        super().__init__()
        if d_model % num_heads:
            raise ValueError(f"d_model ({d_model}) must be a multiple of num_heads ({num_heads})")
        self.num_heads, self.headdim = num_heads, d_model // num_heads
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False, device=device, dtype=dtype)
        self.out_proj = nn.Linear(d_model, d_model, bias=False, device=device, dtype=dtype)

    def allocate_inference_cache(self, batch_size: int, max_seqlen: int, dtype=None, device=None) -> KVCache:
        return KVCache.allocate(batch_size, self.num_heads, max_seqlen, self.headdim,
                                device or self.qkv.weight.device, dtype or self.qkv.weight.dtype)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """``x (batch, seqlen, d_model)``; with ``cache`` the tokens continue the cached positions."""
        batch, seqlen, d_model = x.shape
        q, k, v = self.qkv(x).view(batch, seqlen, 3, self.num_heads, self.headdim).permute(2, 0, 3, 1, 4)
        start = 0 if cache is None else cache.length
        positions = torch.arange(start, start + seqlen, device=x.device)
        q, k = rotary_embedding(q, positions), rotary_embedding(k, positions)
        if cache is not None:
            start, k, v, _ = cache.append(k, v)
        out = causal_attention(q, k, v, start=start)
        return self.out_proj(out.transpose(1, 2).reshape(batch, seqlen, d_model))
