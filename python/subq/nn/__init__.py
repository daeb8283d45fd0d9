"""Drop-in modules built on subq.ops."""

from subq.nn.flash import FLASH, GAU, FlashInferenceCache, ScaleNorm, ScaleOffset, rotary_embedding
from subq.nn.m2 import HyenaFilter, M2DimensionMixer, M2SequenceMixer
from subq.nn.monarch_linear import BlockdiagLinear, MonarchLinear

__all__ = [
    "FLASH",
    "GAU",
    "BlockdiagLinear",
    "FlashInferenceCache",
    "HyenaFilter",
    "M2DimensionMixer",
    "M2SequenceMixer",
    "MonarchLinear",
    "ScaleNorm",
    "ScaleOffset",
    "rotary_embedding",
]
