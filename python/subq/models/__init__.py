"""Architectures assembled from subq.nn layers: each with a config dataclass, presets, safetensors save/load and,
for the causal ones, generation with recurrent state."""

from subq.models.mamba2_lm import Mamba2Config, Mamba2LM
from subq.models.mom import MoM, MoMConfig

__all__ = [
    "Mamba2Config",
    "Mamba2LM",
    "MoM",
    "MoMConfig",
]
