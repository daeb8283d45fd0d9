"""``--override KEY=VALUE``: config fields of a model, typed by the config dataclass."""

from __future__ import annotations

import ast
import dataclasses
import typing

from subq.train.errors import TrainError


def _convert(text: str, hint) -> object:
    """``text`` as a value of type ``hint``: str fields take the text as is, the rest are Python literals."""
    if hint is str:
        return text
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text
    if typing.get_origin(hint) is tuple:
        value = tuple(value) if isinstance(value, list | tuple) else (value,)
        item = typing.get_args(hint)[0] if typing.get_args(hint) else object
        if isinstance(item, type):
            value = tuple(float(v) if item is float and type(v) is int else v for v in value)
            if not all(isinstance(v, item) and (item is bool or type(v) is not bool) for v in value):
                raise ValueError(f"expects a tuple of {item.__name__}")
        hint = tuple
    elif hint is float and type(value) is int:
        value = float(value)
    if isinstance(hint, type) and not (isinstance(value, hint) and (hint is bool or type(value) is not bool)):
        raise ValueError(f"expects {hint.__name__}")
    return value


def parse_overrides(config_class: type, items: list[str]) -> dict[str, object]:
    """``{field: value}`` for ``["d_model=128", "attn_layer_idx=(1,)", ...]``, checked against ``config_class``."""
    hints = typing.get_type_hints(config_class)
    names = [field.name for field in dataclasses.fields(config_class)]
    overrides = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise TrainError(f"--override {item!r}: expected KEY=VALUE, e.g. d_model=128")
        if key not in names:
            raise TrainError(f"--override {item!r}: {config_class.__name__} has no field {key!r}; "
                             f"fields: {', '.join(names)}")
        try:
            overrides[key] = _convert(text.strip(), hints[key])
        except ValueError as err:
            raise TrainError(f"--override {item!r}: {key} {err}, got {text.strip()!r}") from None
    return overrides
