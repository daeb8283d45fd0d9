"""The registry: every op the profiler knows. Adding an op is one file in this folder (an ``OpSpec``, see
``base.py``) and one entry in ``_SPECS``."""

from __future__ import annotations

from subq.profile.ops.base import PASSES, Impl, OpSpec
from subq.profile.ops.monarch import BLOCKDIAG, MONARCH
from subq.profile.ops.ssd import SSD

_SPECS = (
    BLOCKDIAG,
    MONARCH,
    SSD,
)
OPS: dict[str, OpSpec] = {spec.name: spec for spec in _SPECS}

__all__ = ["OPS", "PASSES", "Impl", "OpSpec"]
