"""Drop-in modules built on subq.ops."""

from subq.nn.m2 import HyenaFilter, M2DimensionMixer, M2SequenceMixer
from subq.nn.monarch_linear import BlockdiagLinear, MonarchLinear

__all__ = ["BlockdiagLinear", "HyenaFilter", "M2DimensionMixer", "M2SequenceMixer", "MonarchLinear"]
