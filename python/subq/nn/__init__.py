"""Drop-in modules built on subq.ops."""

from subq.nn.flash import FLASH, GAU, FlashInferenceCache, ScaleNorm, ScaleOffset, rotary_embedding
from subq.nn.monarch_linear import BlockdiagLinear, MonarchLinear

__all__ = [
    "FLASH", "GAU", "BlockdiagLinear", "FlashInferenceCache", "MonarchLinear", "ScaleNorm", "ScaleOffset",
    "rotary_embedding",
]
