"""FLASH and FLASH-Quad language models (Hua et al. 2022, "Transformer Quality in Linear Time").

A token embedding, a stack of causal layers, a final norm and an LM head tied to the embedding. Each layer is a
whole residual block (its own pre-norm and ``x + ...``): FLASH layers (mixed-chunk attention, linear in L) or GAU
layers with quadratic relu² attention (the paper's FLASH-Quad). A GAU replaces a Transformer's attention and MLP
together at about half a block's parameters, hence twice as many layers as a Transformer of the same size.

The paper scales attention by 1/L at the training length L. Here that length is ``max_seq_len``, fixed in the
config, so the forward on any prefix and token-by-token decoding give the same outputs (a 1/L taken from each
input's own length would change every earlier output as the sequence grows). Generation prefills the prompt in one
batched forward that fills the caches: FLASH keeps a state of constant size, FLASH-Quad every past key and value.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from subq._utils import check_positive_ints
from subq.distributed._comm import check_group
from subq.models._common import CachedGeneration, Pretrained
from subq.nn.flash import FLASH, GAU, ScaleNorm, shard_lengths

LAYERS = ("flash", "flash-quad")


@dataclass
class FlashLMConfig:
    layer: str = "flash"        # "flash": FLASH layers; "flash-quad": GAU layers with quadratic attention
    d_model: int = 768
    n_layer: int = 24
    vocab_size: int = 32768
    expansion: int = 2          # e = expansion * d_model, the width of U and V
    s: int = 128                # the shared query/key size
    chunk_size: int = 256       # FLASH's chunk (the paper's group size); unused by FLASH-Quad
    max_seq_len: int = 1024     # the context: attention scales are 1/max_seq_len; FLASH-Quad's relative bias spans it
    norm: str = "scalenorm"     # "scalenorm" (the paper's) or "layernorm", in every layer and at the end

    def __post_init__(self):
        if self.layer not in LAYERS:
            raise ValueError(f"layer must be one of {LAYERS}, got {self.layer!r}")
        check_positive_ints(**{name: getattr(self, name) for name in (
            "d_model", "n_layer", "vocab_size", "expansion", "s", "chunk_size", "max_seq_len")})


# The paper's ~110M-parameter LM size: d = 768 and 24 GAU/FLASH layers where a Transformer has 12 blocks, e = 2d,
# s = 128, chunk 256. At a 32K vocabulary that is 112.6M parameters for either layer (87.4M in the layers, 25.2M in
# the tied embedding). The paper trains contexts from 512 to 8K: override max_seq_len to match.
PRESETS = {
    "110m": dict(d_model=768, n_layer=24),
    "tiny": dict(d_model=32, n_layer=2, vocab_size=256, s=16, chunk_size=64, max_seq_len=256),
}


def _make_layer(config: FlashLMConfig, cp_group) -> FLASH | GAU:
    scale = 1.0 / config.max_seq_len
    if config.layer == "flash":
        return FLASH(config.d_model, chunk_size=config.chunk_size, expansion=config.expansion, s=config.s,
                     causal=True, norm=config.norm, lin_scale=scale, cp_group=cp_group)
    return GAU(config.d_model, expansion=config.expansion, s=config.s, causal=True, norm=config.norm,
               max_len=config.max_seq_len, scale=scale)


class FlashLM(CachedGeneration, Pretrained, nn.Module):
    """The FLASH language model, or FLASH-Quad with ``config.layer = "flash-quad"``.

    ``cp_group`` (FLASH only): context parallelism over a ``torch.distributed`` process group: each rank runs a
    contiguous shard of every sequence, cut at a multiple of ``chunk_size`` (the last rank's may be shorter), and
    gets those positions' logits; its parameter gradients are this shard's part, to be summed over the group.
    """

    config_class = FlashLMConfig
    presets = PRESETS

    def __init__(self, config: FlashLMConfig, cp_group=None):
        super().__init__()
        self.cp_group = check_group(cp_group, "cp_group")
        if self.cp_group is not None and config.layer != "flash":
            raise ValueError(f"context parallelism (cp_group) needs FLASH layers (layer='flash'); {config.layer!r} "
                             "attends over the whole sequence at once")
        self.config = config
        self.embedding = nn.Embedding(config.vocab_size, config.d_model)
        # The head shares these weights and reads a ScaleNorm output of norm ~sqrt(d): N(0, 1) weights would start
        # the logits at std ~sqrt(d); 0.02 (BERT/GPT-2's) starts them near uniform.
        nn.init.normal_(self.embedding.weight, std=0.02)
        self.layers = nn.ModuleList(_make_layer(config, self.cp_group) for _ in range(config.n_layer))
        self.norm_f = ScaleNorm(config.d_model) if config.norm == "scalenorm" else nn.LayerNorm(config.d_model)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.lm_head.weight = self.embedding.weight

    def forward(self, input_ids: torch.Tensor, caches: list | None = None) -> torch.Tensor:
        """Logits (batch, seqlen, vocab) for ``input_ids (batch, seqlen)``, seqlen ≤ max_seq_len. With empty
        ``caches`` (from ``allocate_inference_cache``) this is the prefill that leaves every layer's cache for
        ``step``."""
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
            raise ValueError(f"input_ids must be (batch, seqlen), got {shape}")
        seqlen = input_ids.shape[1]
        if self.cp_group is not None:
            seqlen = sum(shard_lengths(seqlen, self.cp_group, input_ids.device))
        if seqlen > self.config.max_seq_len:
            raise ValueError(f"seqlen ({seqlen}) exceeds max_seq_len ({self.config.max_seq_len})")
        x = self.embedding(input_ids)
        for layer, cache in zip(self.layers, [None] * len(self.layers) if caches is None else caches, strict=True):
            x = layer(x, cache=cache)
        return self.lm_head(self.norm_f(x))

    def allocate_inference_cache(self, batch_size: int, max_seqlen: int, dtype: torch.dtype | None = None) -> list:
        if max_seqlen > self.config.max_seq_len:
            raise ValueError(f"max_seqlen ({max_seqlen}) exceeds max_seq_len ({self.config.max_seq_len})")
        return [layer.allocate_inference_cache(batch_size, max_seqlen, dtype=dtype) for layer in self.layers]

    def prefill(self, input_ids: torch.Tensor, caches) -> torch.Tensor:
        """The last position's logits (batch, vocab) of the prompt, leaving ``caches`` ready for ``step``."""
        return self(input_ids, caches=caches)[:, -1]

    def step(self, input_ids: torch.Tensor, caches: list) -> torch.Tensor:
        """Logits (batch, vocab) for one new token per sequence, ``input_ids (batch,)``; updates ``caches``."""
        x = self.embedding(input_ids)[:, None]
        for layer, cache in zip(self.layers, caches, strict=True):
            x = layer.step(x, cache)
        return self.lm_head(self.norm_f(x[:, 0]))
