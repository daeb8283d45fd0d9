"""The models ``python -m subq.train`` can train: one entry each. An entry names the model class (with a
``config_class`` dataclass, ``from_preset``, ``save_pretrained`` and ``from_pretrained``), the objective it is
trained on, and, when its forward returns more than the logits, how to find them and any auxiliary loss."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from subq.models import M2GPT, FlashLM, M2BertForMaskedLM, Mamba2LM, MoM
from subq.models._common import preset as preset_config
from subq.train.corpus import VOCAB_SIZE
from subq.train.errors import TrainError
from subq.train.overrides import parse_overrides


def logits_only(output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    return output, None


@dataclass(frozen=True)
class ModelEntry:
    model_class: type[nn.Module]
    objective: Literal["causal", "masked"]
    # output of forward(input_ids) -> (logits (batch, seqlen, vocab), auxiliary loss added in training or None)
    outputs: Callable[[object], tuple[torch.Tensor, torch.Tensor | None]] = logits_only
    # config fields every preset of this entry gets (one class can serve two entries, e.g. FLASH and FLASH-Quad)
    config: dict = field(default_factory=dict)
    # a router picks the modules a token runs through: some parameters get no gradient in a step (DDP must know)
    routed: bool = False


MODELS: dict[str, ModelEntry] = {
    "flash": ModelEntry(FlashLM, "causal", config={"layer": "flash"}),
    "flash-quad": ModelEntry(FlashLM, "causal", config={"layer": "flash-quad"}),
    "m2-bert": ModelEntry(M2BertForMaskedLM, "masked", lambda out: (out.logits, None)),
    "m2-gpt": ModelEntry(M2GPT, "causal"),
    "mamba2": ModelEntry(Mamba2LM, "causal"),
    "mom": ModelEntry(MoM, "causal", lambda out: (out.logits, out.aux_loss), routed=True),
}


def lookup(name: str) -> ModelEntry:
    if name not in MODELS:
        raise TrainError(f"unknown model {name!r}; known models: {', '.join(sorted(MODELS))}")
    return MODELS[name]


def check_vocab(model: nn.Module, what: str) -> None:
    vocab_size = getattr(model.config, "vocab_size", None)
    if vocab_size is None or vocab_size < VOCAB_SIZE:
        raise TrainError(f"{what}: vocab_size {vocab_size} is smaller than the byte-level tokenizer's "
                         f"{VOCAB_SIZE}; use --override vocab_size={VOCAB_SIZE}")


def check_seq_len(model: nn.Module, config) -> None:
    """--seq-len against the model's context (max_seq_len, or n_positions): longer fails only at the first
    forward, after the corpus has been built."""
    for name in ("max_seq_len", "n_positions"):
        limit = getattr(model.config, name, None)
        if limit is not None and config.seq_len > limit:
            raise TrainError(f"--seq-len {config.seq_len} is longer than {config.model} ({config.preset})'s {name} "
                             f"{limit}: lower --seq-len, or --override {name}={config.seq_len}")


def build_model(name: str, preset: str, overrides: list[str], **module_kwargs) -> nn.Module:
    """``MODELS[name].model_class.from_preset(preset, **overrides)`` (built with ``module_kwargs``, e.g. a
    ``cp_group``, when given), with a one-line error for what cannot be built."""
    entry = lookup(name)
    model_class = entry.model_class
    fields = entry.config | parse_overrides(model_class.config_class, overrides)
    what = f"--model {name} --preset {preset}" + "".join(f" --override {item}" for item in overrides)
    try:
        if module_kwargs:
            model = model_class(preset_config(model_class.config_class, model_class.presets, preset, **fields),
                                **module_kwargs)
        else:
            model = model_class.from_preset(preset, **fields)
    except (ValueError, TypeError, AssertionError) as err:
        raise TrainError(f"{what}: {err}") from None
    check_vocab(model, what)
    return model
