"""Drop-in modules built on subq.ops."""

from subq.nn.monarch_linear import BlockdiagLinear, MonarchLinear

__all__ = ["BlockdiagLinear", "MonarchLinear"]
