"""The baseline of bench_models.py: a GPT-style Transformer LM (pre-LayerNorm blocks of causal SDPA attention with
RoPE and a 4x GELU MLP, tied head) with the same forward / allocate_inference_cache / step interface as the subq
language models, so training steps and KV-cached generation are timed the same way for both."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from subq.nn.attention import CausalSelfAttention


class TransformerBlock(nn.Module):
    def __init__(self, d_model: int, n_head: int):
        super().__init__()
        self.norm_attn, self.norm_mlp = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_head)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model))

    def forward(self, x: torch.Tensor, cache=None) -> torch.Tensor:
        x = x + self.attn(self.norm_attn(x), cache=cache)
        return x + self.mlp(self.norm_mlp(x))


class TransformerLM(nn.Module):
    def __init__(self, vocab_size: int, d_model: int, n_layer: int, n_head: int):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, d_model)
        self.layers = nn.ModuleList(TransformerBlock(d_model, n_head) for _ in range(n_layer))
        self.norm_f = nn.LayerNorm(d_model)
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)
        self.lm_head.weight = self.embedding.weight

    def forward(self, input_ids: torch.Tensor, caches=None) -> torch.Tensor:
        x = self.embedding(input_ids)
        for i, layer in enumerate(self.layers):
            x = layer(x, cache=None if caches is None else caches[i])
        return self.lm_head(self.norm_f(x))

    def allocate_inference_cache(self, batch_size: int, max_seqlen: int, dtype=None) -> list:
        return [layer.attn.allocate_inference_cache(batch_size, max_seqlen, dtype=dtype) for layer in self.layers]

    def step(self, input_ids: torch.Tensor, caches: list) -> torch.Tensor:
        return self(input_ids[:, None], caches=caches)[:, 0]


def loss(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy, the training objective every causal LM of the benchmark is timed with."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), input_ids[:, 1:].flatten())
