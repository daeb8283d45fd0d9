"""Architectures assembled from subq.nn layers: each with a config dataclass, presets, safetensors save/load and,
for the causal ones, generation with recurrent state."""

from subq.models.flash_lm import FlashLM, FlashLMConfig
from subq.models.mamba2_lm import Mamba2Config, Mamba2LM

__all__ = [
    "FlashLM",
    "FlashLMConfig",
    "Mamba2Config",
    "Mamba2LM",
]
