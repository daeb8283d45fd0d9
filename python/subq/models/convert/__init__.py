"""Checkpoints in other projects' formats: read them into subq's models and write subq's models back out.

``Model.from_pretrained(path)`` reads ``path/config.json`` and picks the format from it: subq's own (a ``"model"``
key) or one of the formats listed for the model class in :data:`FORMATS`, each detected from its config fields.
``model.save_pretrained(path, format=...)`` writes subq's format (the default) or one of those. Anything that does
not fit (an unknown config, a missing or unexpected tensor, a wrong shape, an option subq does not have) raises one
:class:`CheckpointError` naming the file, the format(s) expected and the key or field that failed.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import torch
from torch import nn

CONFIG_FILE = "config.json"

# Model class name -> {format name: module under subq.models.convert}; detection tries them in this order.
FORMATS: dict[str, dict[str, str]] = {
    "Mamba2LM": {"hf": "hf_mamba2", "mamba_ssm": "mamba_ssm"},
    "M2BertForMaskedLM": {"m2": "m2_hazy"},
}

# Weight files, in the order they are looked for (a sharded safetensors/bin index lists its shards).
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


class CheckpointError(ValueError):
    """A checkpoint that is not in the expected format, or that does not fit the model it is loaded into."""


def _format_module(module: str):
    return importlib.import_module(f"subq.models.convert.{module}")


def formats_for(model_cls) -> dict[str, str]:
    return FORMATS.get(model_cls.__name__, {})


def expected(model_cls) -> str:
    """The formats ``model_cls.from_pretrained`` reads, in words, for error messages."""
    names = ["subq (config.json with a 'model' key + model.safetensors)"]
    names += [_format_module(m).DESCRIPTION for m in formats_for(model_cls).values()]
    return "; ".join(names)


def read_config(path: Path, model_cls) -> dict:
    file = path / CONFIG_FILE
    if not file.is_file():
        raise CheckpointError(f"{file}: no such file; {model_cls.__name__}.from_pretrained reads a folder holding a "
                              f"config.json, in one of these formats: {expected(model_cls)}")
    try:
        config = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{file}: not valid JSON ({err})") from err
    if not isinstance(config, dict):
        raise CheckpointError(f"{file}: expected a JSON object, got {type(config).__name__}")
    return config


def weights_file(path: Path, fmt: str, names: tuple[str, ...] = WEIGHT_FILES) -> Path:
    for name in names:
        if (path / name).is_file():
            return path / name
    raise CheckpointError(f"{path}: no weights file for the {fmt} format; expected one of {list(names)}")


def read_weights(file: Path) -> dict[str, torch.Tensor]:
    """All tensors of a ``.safetensors`` or ``.bin`` file, or of the shards a ``*.index.json`` lists, on the CPU."""
    if file.name.endswith(".index.json"):
        try:
            weight_map = json.loads(file.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise CheckpointError(f"{file}: expected a shard index with a 'weight_map' object ({err!r})") from err
        state = {}
        for shard in sorted(set(weight_map.values())):
            state.update(read_weights(file.parent / shard))
        return state
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(file))
    state = torch.load(file, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{file}: expected a state dict (names -> tensors)")
    return state


def checkpoint_dtype(state: dict[str, torch.Tensor]) -> torch.dtype | None:
    """The floating dtype every floating tensor of ``state`` shares, or None when they differ (or there are none)."""
    dtypes = {t.dtype for t in state.values() if t.is_floating_point()}
    return dtypes.pop() if len(dtypes) == 1 else None


def build(model_cls, config, file: Path, fmt: str) -> nn.Module:
    """``model_cls(config)``, its argument checks reported against the checkpoint's config file."""
    try:
        return model_cls(config)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{file}: {fmt} config does not fit subq's {model_cls.__name__}: {err}") from err


def load_checked(model: nn.Module, state: dict[str, torch.Tensor], file: Path, fmt: str,
                 names: dict[str, str] | None = None) -> nn.Module:
    """``model.load_state_dict(state)`` (strict), the model first cast to the checkpoint's dtype when every floating
    tensor shares one (``checkpoint_dtype``), with one :class:`CheckpointError` naming ``file``, the format and the
    first missing / unexpected / misshapen key. A key that is missing because a tied parameter was saved under its
    other name is fine. ``names`` maps subq keys back to the checkpoint's own names, for the messages."""
    names = names or {}
    dtype = checkpoint_dtype(state)
    if dtype is not None:
        model.to(dtype)
    aliases: dict[int, list[str]] = {}
    for name, tensor in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        aliases.setdefault(id(tensor), []).append(name)
    own = model.state_dict(keep_vars=True)
    group = {name: aliases.get(id(tensor), [name]) for name, tensor in own.items()}
    state = dict(state)
    for name in own:
        present = [alias for alias in group[name] if alias in state]
        for alias in present[1:]:
            if not torch.equal(state[alias], state[present[0]]):
                raise CheckpointError(f"{file}: {fmt} checkpoint does not fit this {type(model).__name__}: keys "
                                      f"{names.get(present[0], present[0])!r} and {names.get(alias, alias)!r} are "
                                      "one tied tensor in the model but differ in the checkpoint")
        if name not in state:
            present = [alias for alias in group[name] if alias in state]
            if not present:
                missing = [n for n in own if n not in state and not any(a in state for a in group[n])]
                raise CheckpointError(f"{file}: not a {fmt} checkpoint of this {type(model).__name__}: missing key "
                                      f"{names.get(name, name)!r}" + _more(missing))
            state[name] = state[present[0]]
    unexpected = [n for n in state if n not in own]
    if unexpected:
        raise CheckpointError(f"{file}: not a {fmt} checkpoint of this {type(model).__name__}: unexpected key "
                              f"{names.get(unexpected[0], unexpected[0])!r}" + _more(unexpected))
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(own[name].shape):
            raise CheckpointError(f"{file}: {fmt} checkpoint does not fit this {type(model).__name__}: key "
                                  f"{names.get(name, name)!r} has shape {tuple(tensor.shape)}, the model expects "
                                  f"{tuple(own[name].shape)}")
    model.load_state_dict(state, strict=True)
    return model


def _more(keys: list[str]) -> str:
    return f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""


def load_foreign(model_cls, path: Path, config: dict, device):
    """Load a checkpoint whose config.json has no subq ``"model"`` key: the first format of ``model_cls`` that
    recognises the config reads it."""
    for module in formats_for(model_cls).values():
        fmt = _format_module(module)
        if fmt.detect(config):
            return fmt.load(model_cls, path, config, device)
    raise CheckpointError(f"{path / CONFIG_FILE}: not a checkpoint format {model_cls.__name__} reads (no 'model' "
                          f"key, and no other format recognised); expected one of: {expected(model_cls)}")


def save_foreign(model: nn.Module, path: Path, fmt: str) -> Path:
    known = formats_for(type(model))
    if fmt not in known:
        raise ValueError(f"format must be 'subq' or one of {sorted(known)} for a {type(model).__name__}, "
                         f"got {fmt!r}")
    return _format_module(known[fmt]).save(model, path)


def write_json(file: Path, config: dict) -> None:
    file.write_text(json.dumps(config, indent=2) + "\n")


def require(condition: bool, file: Path, fmt: str, message: str) -> None:
    """Raise a :class:`CheckpointError` naming ``file`` and the format unless ``condition``."""
    if not condition:
        raise CheckpointError(f"{file}: {fmt} checkpoint: {message}")


__all__ = ["CheckpointError", "FORMATS", "load_checked", "read_weights", "checkpoint_dtype"]
