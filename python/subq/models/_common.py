"""Pieces every model shares: config presets, safetensors save/load, and sampling for generation."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Self

import torch
from torch import nn

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


def preset(config_cls, presets: dict[str, dict], name: str, **overrides):
    """``config_cls(**presets[name], **overrides)``, with the known names in the error."""
    if name not in presets:
        raise ValueError(f"unknown preset {name!r} for {config_cls.__name__}; choose one of {sorted(presets)}")
    return config_cls(**{**presets[name], **overrides})


def save_pretrained(model: nn.Module, path: str | Path) -> Path:
    """Write ``config.json`` (the model's dataclass config) and ``model.safetensors`` into directory ``path``."""
    from safetensors.torch import save_model

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = dataclasses.asdict(model.config)
    (path / CONFIG_FILE).write_text(json.dumps({"model": type(model).__name__, **config}, indent=2) + "\n")
    save_model(model, str(path / WEIGHTS_FILE))  # handles tied weights (saved once)
    return path


def load_pretrained(model_cls, path: str | Path, device: str | torch.device = "cpu"):
    """Rebuild ``model_cls`` from ``config.json`` and load its weights (strict), in the checkpoint's dtype.

    subq's own format has a ``"model"`` key in config.json; other formats (``subq.models.convert.FORMATS``) are
    recognised from their config fields. A checkpoint that does not fit raises ``CheckpointError`` naming the file,
    the expected format(s) and the failing key."""
    from subq.models.convert import (
        CheckpointError,
        load_checked,
        load_foreign,
        read_config,
        read_weights,
        weights_file,
    )

    path = Path(path)
    config = read_config(path, model_cls)
    if "model" not in config:
        return load_foreign(model_cls, path, config, device)
    name = config.pop("model")
    if name != model_cls.__name__:
        raise CheckpointError(f"{path / CONFIG_FILE} holds a {name}, not a {model_cls.__name__}")
    fields = {f.name: f.type for f in dataclasses.fields(model_cls.config_class)}
    config = {k: tuple(v) if isinstance(v, list) else v for k, v in config.items() if k in fields}
    model = model_cls(model_cls.config_class(**config))
    file = weights_file(path, "subq", (WEIGHTS_FILE,))
    state = read_weights(file)
    load_checked(model, state, file, "subq")
    return model.to(device)


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token ids (batch,) from the last position's logits (batch, vocab): greedy when temperature == 0."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)[:, 0]


class Pretrained:
    """``from_preset``, ``save_pretrained`` and ``from_pretrained`` for a model class that names its
    ``config_class`` (a dataclass) and its ``presets`` (preset name -> config fields)."""

    config_class: type
    presets: dict[str, dict]

    @classmethod
    def from_preset(cls, name: str, **overrides) -> Self:
        return cls(preset(cls.config_class, cls.presets, name, **overrides))

    def save_pretrained(self, path: str | Path, format: str = "subq") -> Path:
        """Write subq's format, or (``format``) one of ``subq.models.convert.FORMATS`` for this class."""
        if format == "subq":
            return save_pretrained(self, path)
        from subq.models.convert import save_foreign

        return save_foreign(self, Path(path), format)

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu") -> Self:
        return load_pretrained(cls, path, device)


class CachedGeneration:
    """``generate`` for a causal LM with recurrent state: ``allocate_inference_cache(batch, max_seqlen)``,
    ``prefill(input_ids, caches)`` (the last position's logits, leaving the caches filled) and
    ``step(input_ids (batch,), caches)`` (the next logits)."""

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Prefill ``prompt (batch, prompt_len >= 1)`` once, then extend it token by token from the cached state:
        ``(batch, prompt_len + max_new_tokens)``, greedy when temperature == 0."""
        if prompt.dim() != 2 or prompt.shape[1] < 1:
            raise ValueError(f"prompt must be (batch, prompt_len) with prompt_len >= 1, got {tuple(prompt.shape)}")
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        caches = self.allocate_inference_cache(prompt.shape[0], prompt.shape[1] + max_new_tokens)
        logits = self.prefill(prompt, caches)
        tokens = [prompt]
        for i in range(max_new_tokens):
            next_ids = sample_next(logits, temperature, top_k, generator)
            tokens.append(next_ids[:, None])
            if i + 1 < max_new_tokens:  # the last token needs no logits after it
                logits = self.step(next_ids, caches)
        return torch.cat(tokens, dim=1)
