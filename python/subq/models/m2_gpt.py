"""M2-GPT (Fu et al., "Monarch Mixer", 2023): a causal language model with neither attention nor a dense MLP.

Pre-norm residual blocks, each ``x + mixer(LN(x))`` with the causal M2 sequence mixer (gated implicit long
convolutions) then ``x + glu(LN(x))`` with the block-diagonal GLU; a final LayerNorm and an LM head tied to the
embeddings. Generation keeps each mixer's M2InferenceCache: the short conv window and the long convolutions' input
history, so a token costs O(t) in its position t, exactly equal to the full forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from subq._utils import check_bool, check_positive_ints, check_real
from subq.models._common import CachedGeneration, Pretrained
from subq.nn.m2 import M2DimensionMixer, M2InferenceCache, M2SequenceMixer

EMBEDDING_STD = 0.02  # GPT-2's: keeps the tied head's logits O(1) at init


@dataclass
class M2GPTConfig:
    d_model: int = 1024
    n_layer: int = 24
    vocab_size: int = 50257         # the GPT-2 tokenizer (M2-GPT trains on the Pile with it)
    max_seq_len: int = 1024
    expansion: int = 4              # GLU hidden size = expansion * d_model
    nblocks: int = 4                # blocks of the GLU's two block-diagonal matrices
    filter_order: int = 64          # width of the implicit filters' MLP
    filter_emb_dim: int = 5         # positional features of the implicit filters
    residual_long_conv: bool = True
    norm_eps: float = 1e-5

    def __post_init__(self):
        check_positive_ints(**{name: getattr(self, name) for name in (
            "d_model", "n_layer", "vocab_size", "max_seq_len", "expansion", "nblocks", "filter_order",
            "filter_emb_dim")})
        check_bool(self.residual_long_conv, "residual_long_conv")
        if check_real(self.norm_eps, "norm_eps", finite=True) < 0:
            raise ValueError(f"norm_eps must be >= 0, got {self.norm_eps}")


# The M2 paper's M2-GPT-360M shape, d = 1024 with 24 layers: a GLU of hidden 11 * 1024 in 4 blocks gives 363.9M
# parameters (the tied embedding counted once; hidden 4096 would give 307M). And a tiny one for tests.
PRESETS = {
    "360m": dict(expansion=11),
    "tiny": dict(d_model=32, n_layer=2, vocab_size=256, max_seq_len=64, expansion=2, filter_order=16),
}


class M2GPTBlock(nn.Module):
    def __init__(self, config: M2GPTConfig):
        super().__init__()
        d = config.d_model
        self.mixer_norm = nn.LayerNorm(d, eps=config.norm_eps)
        self.mixer = M2SequenceMixer(d, config.max_seq_len, bidirectional=False,
                                     residual_long_conv=config.residual_long_conv,
                                     filter_kwargs=dict(order=config.filter_order, emb_dim=config.filter_emb_dim))
        self.mlp_norm = nn.LayerNorm(d, eps=config.norm_eps)
        self.mlp = M2DimensionMixer(d, expansion=config.expansion, nblocks=config.nblocks)

    def forward(self, x: torch.Tensor, cache: M2InferenceCache | None = None) -> torch.Tensor:
        x = x + self.mixer(self.mixer_norm(x), cache=cache)
        return x + self.mlp(self.mlp_norm(x))


class M2GPT(CachedGeneration, Pretrained, nn.Module):
    config_class = M2GPTConfig
    presets = PRESETS

    def __init__(self, config: M2GPTConfig):
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.vocab_size, config.d_model)
        nn.init.normal_(self.embedding.weight, std=EMBEDDING_STD)
        self.layers = nn.ModuleList(M2GPTBlock(config) for _ in range(config.n_layer))
        self.norm_f = nn.LayerNorm(config.d_model, eps=config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.lm_head.weight = self.embedding.weight

    def forward(self, input_ids: torch.Tensor, caches: list[M2InferenceCache] | None = None) -> torch.Tensor:
        """Logits (batch, seqlen, vocab). With ``caches`` (from ``allocate_inference_cache``) the tokens continue
        the cached positions (a prefill) and every layer's cache is advanced past them."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, seqlen), got shape {tuple(input_ids.shape)}")
        if caches is not None and len(caches) != len(self.layers):
            raise ValueError(f"caches must hold one cache per layer ({len(self.layers)}), got {len(caches)}")
        x = self.embedding(input_ids)
        for i, layer in enumerate(self.layers):
            x = layer(x, cache=None if caches is None else caches[i])
        return self.lm_head(self.norm_f(x))

    def allocate_inference_cache(self, batch_size: int, max_seqlen: int,
                                 dtype: torch.dtype | None = None) -> list[M2InferenceCache]:
        return [layer.mixer.allocate_inference_cache(batch_size, max_seqlen, dtype=dtype) for layer in self.layers]

    def prefill(self, input_ids: torch.Tensor, caches) -> torch.Tensor:
        """The last position's logits (batch, vocab) of the prompt, leaving ``caches`` ready for ``step``."""
        return self(input_ids, caches=caches)[:, -1]

    def step(self, input_ids: torch.Tensor, caches: list[M2InferenceCache]) -> torch.Tensor:
        """Logits (batch, vocab) for one new token per sequence, ``input_ids (batch,)``; advances ``caches``."""
        if input_ids.dim() != 1:
            raise ValueError(f"step takes one token per sequence, input_ids (batch,), got {tuple(input_ids.shape)}")
        return self(input_ids[:, None], caches=caches)[:, 0]
