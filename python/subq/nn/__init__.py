"""Drop-in modules built on subq.ops."""

from subq.nn.attention import CausalSelfAttention, KVCache
from subq.nn.flash import FLASH, GAU, FlashInferenceCache, GAUInferenceCache, ScaleNorm, ScaleOffset
from subq.nn.m2 import HyenaFilter, M2DimensionMixer, M2InferenceCache, M2SequenceMixer
from subq.nn.mamba2 import Mamba2, Mamba2Cache, RMSNormGated
from subq.nn.mom import AttentionModules, FFNModules, GRURouter, MLPRouter, load_balancing_loss
from subq.nn.monarch_linear import BlockdiagLinear, MonarchLinear
from subq.nn.rope import rotary_embedding

__all__ = [
    "AttentionModules",
    "BlockdiagLinear",
    "CausalSelfAttention",
    "FFNModules",
    "FLASH",
    "FlashInferenceCache",
    "GAU",
    "GAUInferenceCache",
    "GRURouter",
    "HyenaFilter",
    "KVCache",
    "M2DimensionMixer",
    "M2InferenceCache",
    "M2SequenceMixer",
    "MLPRouter",
    "Mamba2",
    "Mamba2Cache",
    "MonarchLinear",
    "RMSNormGated",
    "ScaleNorm",
    "ScaleOffset",
    "load_balancing_loss",
    "rotary_embedding",
]
