"""Pieces every model shares: config presets, safetensors save/load, and sampling for generation."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

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
    """Rebuild ``model_cls`` from ``config.json`` and load ``model.safetensors`` (strict)."""
    from safetensors.torch import load_model

    path = Path(path)
    config = json.loads((path / CONFIG_FILE).read_text())
    name = config.pop("model")
    if name != model_cls.__name__:
        raise ValueError(f"{path} holds a {name}, not a {model_cls.__name__}")
    fields = {f.name: f.type for f in dataclasses.fields(model_cls.config_class)}
    config = {k: tuple(v) if isinstance(v, list) else v for k, v in config.items() if k in fields}
    model = model_cls(model_cls.config_class(**config))
    load_model(model, str(path / WEIGHTS_FILE), device=str(device))
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
