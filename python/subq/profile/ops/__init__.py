"""The registry: every op the profiler knows. Adding an op is one file in this folder (an ``OpSpec``, see
``base.py``) and one entry in ``_SPECS``."""

from __future__ import annotations

from subq.profile.ops.base import PASSES, Impl, OpSpec
from subq.profile.ops.causal_conv1d import CAUSAL_CONV1D
from subq.profile.ops.flash import FLASH
from subq.profile.ops.flash_step import FLASH_STEP
from subq.profile.ops.gau import GAU
from subq.profile.ops.grouped_matmul import GROUPED_MATMUL
from subq.profile.ops.monarch import BLOCKDIAG, MONARCH
from subq.profile.ops.monarch_conv import MONARCH_CONV
from subq.profile.ops.rmsnorm_gated import RMSNORM_GATED
from subq.profile.ops.ssd import SSD
from subq.profile.ops.ssd_step import SSD_STEP

_SPECS = (
    BLOCKDIAG,
    MONARCH,
    SSD,
    SSD_STEP,
    MONARCH_CONV,
    FLASH,
    GAU,
    FLASH_STEP,
    CAUSAL_CONV1D,
    RMSNORM_GATED,
    GROUPED_MATMUL,
)
OPS: dict[str, OpSpec] = {spec.name: spec for spec in _SPECS}

__all__ = ["OPS", "PASSES", "Impl", "OpSpec"]
