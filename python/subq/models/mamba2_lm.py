"""Mamba-2 language model (Dao and Gu, 2024), optionally with a few causal attention layers (the paper's hybrids).

Pre-norm residual blocks, each an RMSNorm then a mixer (Mamba-2, or attention at ``attn_layer_idx``), a final
RMSNorm and a tied LM head. Generation keeps a recurrent state per Mamba-2 layer and a KV cache per attention
layer, so each new token costs O(1) in the sequence length for the SSM layers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from subq._utils import ArgumentTypeError, check_bool, check_int, check_positive_ints, check_real
from subq.distributed import tensor_parallel
from subq.distributed._comm import check_group
from subq.models._common import CachedGeneration, Pretrained
from subq.nn.attention import CausalSelfAttention
from subq.nn.mamba2 import Mamba2, RMSNormGated


@dataclass
class Mamba2Config:
    d_model: int = 768
    n_layer: int = 24
    vocab_size: int = 50280
    d_state: int = 128
    d_conv: int = 4
    expand: int = 2
    headdim: int = 64
    ngroups: int = 1
    chunk_size: int = 256
    attn_layer_idx: tuple[int, ...] = field(default_factory=tuple)
    attn_num_heads: int = 12
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    # The Mamba-2 mixer's options (state-spaces/mamba's names), for checkpoints trained with other settings.
    rmsnorm: bool = True
    norm_before_gate: bool = False
    mixer_norm_eps: float = 1e-5
    dt_limit: tuple[float, float] = (0.0, math.inf)
    D_has_hdim: bool = False
    bias: bool = False
    conv_bias: bool = True

    def __post_init__(self):
        check_positive_ints(**{name: getattr(self, name) for name in (
            "d_model", "n_layer", "vocab_size", "d_state", "expand", "headdim", "ngroups", "attn_num_heads")})
        if not isinstance(self.attn_layer_idx, tuple | list):
            raise ArgumentTypeError(f"attn_layer_idx must be a tuple of layer indices, got {self.attn_layer_idx!r}")
        self.attn_layer_idx = tuple(check_int(i, f"attn_layer_idx's entries (layers of n_layer = {self.n_layer})",
                                              0, self.n_layer - 1) for i in self.attn_layer_idx)
        if check_real(self.norm_eps, "norm_eps", finite=True) < 0:
            raise ValueError(f"norm_eps must be >= 0, got {self.norm_eps}")
        for name in ("tie_embeddings", "rmsnorm", "norm_before_gate", "D_has_hdim", "bias", "conv_bias"):
            check_bool(getattr(self, name), name)
        if check_real(self.mixer_norm_eps, "mixer_norm_eps", finite=True) < 0:
            raise ValueError(f"mixer_norm_eps must be >= 0, got {self.mixer_norm_eps}")
        if not isinstance(self.dt_limit, tuple | list) or len(self.dt_limit) != 2:
            raise ArgumentTypeError(f"dt_limit must be a pair (min, max), got {self.dt_limit!r}")
        self.dt_limit = tuple(check_real(v, "dt_limit's entries") for v in self.dt_limit)


# The released Mamba-2 sizes (vocabulary padded to a multiple of 16), and a tiny one for tests.
PRESETS = {
    "130m": dict(d_model=768, n_layer=24),
    "370m": dict(d_model=1024, n_layer=48, attn_num_heads=16),
    "780m": dict(d_model=1536, n_layer=48, attn_num_heads=24),
    "1.3b": dict(d_model=2048, n_layer=48, attn_num_heads=32),
    "2.7b": dict(d_model=2560, n_layer=64, attn_num_heads=40),
    "tiny": dict(d_model=64, n_layer=2, vocab_size=256, d_state=16, headdim=16, chunk_size=64, attn_num_heads=4),
}


class Mamba2Block(nn.Module):
    def __init__(self, config: Mamba2Config, layer_idx: int, cp_group=None, tp_group=None):
        super().__init__()
        self.norm = RMSNormGated(config.d_model, eps=config.norm_eps)
        if layer_idx in config.attn_layer_idx:
            # Not split: under tensor parallelism every rank computes the whole attention layer.
            self.mixer = CausalSelfAttention(config.d_model, config.attn_num_heads)
        else:
            self.mixer = Mamba2(config.d_model, d_state=config.d_state, d_conv=config.d_conv, expand=config.expand,
                                headdim=config.headdim, ngroups=config.ngroups, chunk_size=config.chunk_size,
                                dt_limit=config.dt_limit, D_has_hdim=config.D_has_hdim, rmsnorm=config.rmsnorm,
                                norm_before_gate=config.norm_before_gate, bias=config.bias,
                                conv_bias=config.conv_bias, layer_idx=layer_idx, cp_group=cp_group,
                                tp_group=tp_group)
            if config.rmsnorm:
                self.mixer.norm.eps = config.mixer_norm_eps

    @property
    def is_attention(self) -> bool:
        return isinstance(self.mixer, CausalSelfAttention)

    def forward(self, x, seq_idx=None, cache=None):
        h = self.norm(x)
        if self.is_attention:
            return x + self.mixer(h, cache=cache)
        return x + self.mixer(h, seq_idx=seq_idx, cache=cache)

    def step(self, x, cache):
        h = self.norm(x)
        if self.is_attention:
            return x + self.mixer(h[:, None], cache=cache)[:, 0]
        return x + self.mixer.step(h, cache)


class Mamba2LM(CachedGeneration, Pretrained, nn.Module):
    """``cp_group``: context parallelism: each rank of the group runs a contiguous shard of every sequence
    (``input_ids`` and ``seq_idx`` its shard, the logits those positions'); its parameter gradients are this shard's
    part, to be summed over the group. ``tp_group``: tensor parallelism of the Mamba-2 layers (heads and groups
    split, :mod:`subq.distributed.tensor_parallel`), initialised as one process would from the same seed and cut to
    this rank's heads; embedding, norms, head and attention layers are replicated (broadcast from the group's rank 0
    here). Both are ``torch.distributed`` process groups, or None.
    """

    config_class = Mamba2Config
    presets = PRESETS

    def __init__(self, config: Mamba2Config, cp_group=None, tp_group=None):
        super().__init__()
        cp_group, tp_group = check_group(cp_group, "cp_group"), check_group(tp_group, "tp_group")
        if cp_group is not None and config.attn_layer_idx:
            raise ValueError(f"context parallelism (cp_group) is not supported by the attention layers of this "
                             f"hybrid (attn_layer_idx={config.attn_layer_idx}); use a pure Mamba-2 model")
        self.config = config
        self.embedding = nn.Embedding(config.vocab_size, config.d_model)
        # mamba_ssm's std: the head is tied to it, and unit-variance embeddings start the logits (and the loss) huge.
        nn.init.normal_(self.embedding.weight, std=0.02)
        self.layers = nn.ModuleList(Mamba2Block(config, i, cp_group, tp_group) for i in range(config.n_layer))
        self.norm_f = RMSNormGated(config.d_model, eps=config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embedding.weight
        if tp_group is not None:
            tensor_parallel.sync_replicated_(self, tp_group)

    def forward(self, input_ids: torch.Tensor, seq_idx: torch.Tensor | None = None, caches=None) -> torch.Tensor:
        """Logits (batch, seqlen, vocab). ``seq_idx`` packs sequences (Mamba-2 layers only); ``caches`` (from
        ``allocate_inference_cache``) makes this a prefill that leaves every layer's state for ``step``."""
        if seq_idx is not None and any(layer.is_attention for layer in self.layers):
            raise ValueError("seq_idx (packed sequences) is not supported by the attention layers of this hybrid")
        x = self.embedding(input_ids)
        for i, layer in enumerate(self.layers):
            x = layer(x, seq_idx=seq_idx, cache=None if caches is None else caches[i])
        return self.lm_head(self.norm_f(x))

    def allocate_inference_cache(self, batch_size: int, max_seqlen: int, dtype=None) -> list:
        return [layer.mixer.allocate_inference_cache(batch_size, max_seqlen, dtype=dtype) if layer.is_attention
                else layer.mixer.allocate_inference_cache(batch_size, dtype=dtype) for layer in self.layers]

    def prefill(self, input_ids: torch.Tensor, caches) -> torch.Tensor:
        """The last position's logits (batch, vocab) of the prompt, leaving ``caches`` ready for ``step``."""
        return self(input_ids, caches=caches)[:, -1]

    def step(self, input_ids: torch.Tensor, caches: list) -> torch.Tensor:
        """Logits (batch, vocab) for one new token per sequence, ``input_ids (batch,)``; updates ``caches``."""
        x = self.embedding(input_ids)
        for layer, cache in zip(self.layers, caches, strict=True):
            x = layer.step(x, cache)
        return self.lm_head(self.norm_f(x))
