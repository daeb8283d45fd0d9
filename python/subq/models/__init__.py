"""Architectures assembled from subq.nn layers: each with a config dataclass, presets, safetensors save/load and,
for the causal ones, generation with recurrent state."""

from subq.models.flash_lm import FlashLM, FlashLMConfig
from subq.models.m2_bert import (
    M2BertConfig,
    M2BertEncoder,
    M2BertForMaskedLM,
    M2BertModel,
    M2EncoderConfig,
    M2ViT,
    M2ViTConfig,
)
from subq.models.m2_gpt import M2GPT, M2GPTConfig
from subq.models.mamba2_lm import Mamba2Config, Mamba2LM
from subq.models.mom import MoM, MoMConfig

__all__ = [
    "FlashLM",
    "FlashLMConfig",
    "M2BertConfig",
    "M2BertEncoder",
    "M2BertForMaskedLM",
    "M2BertModel",
    "M2EncoderConfig",
    "M2GPT",
    "M2GPTConfig",
    "M2ViT",
    "M2ViTConfig",
    "Mamba2Config",
    "Mamba2LM",
    "MoM",
    "MoMConfig",
]
