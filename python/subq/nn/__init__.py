"""Drop-in modules built on subq.ops."""

from subq.nn.flash import FLASH, GAU, FlashInferenceCache, GAUInferenceCache, ScaleNorm, ScaleOffset, rotary_embedding
from subq.nn.m2 import HyenaFilter, M2DimensionMixer, M2InferenceCache, M2SequenceMixer
from subq.nn.mamba2 import Mamba2, Mamba2Cache, RMSNormGated
from subq.nn.monarch_linear import BlockdiagLinear, MonarchLinear

__all__ = [
    "FLASH",
    "GAU",
    "BlockdiagLinear",
    "FlashInferenceCache",
    "GAUInferenceCache",
    "HyenaFilter",
    "M2DimensionMixer",
    "M2InferenceCache",
    "M2SequenceMixer",
    "Mamba2",
    "Mamba2Cache",
    "MonarchLinear",
    "RMSNormGated",
    "ScaleNorm",
    "ScaleOffset",
    "rotary_embedding",
]
