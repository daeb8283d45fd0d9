"""Argument checks shared by the public ops: each error names the argument and what was expected."""

from __future__ import annotations

import math
import numbers
import operator

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(t: object, name: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(
            f"{name} must have a floating-point dtype (float16, bfloat16, float32, float64), got {t.dtype}"
        )
    return t


def check_ndim(t: torch.Tensor, ndim: int, name: str, layout: str) -> None:
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D {layout}, got shape {tuple(t.shape)}")


def check_nonempty_dims(t: torch.Tensor, name: str, layout: str) -> None:
    """A factor's sizes divide and index the features: a zero among them leaves nothing to factor."""
    if 0 in t.shape:
        raise ValueError(f"{name} {layout} must have every dimension at least 1, got shape {tuple(t.shape)}")


def check_like(t: torch.Tensor, ref: torch.Tensor, name: str, ref_name: str) -> None:
    if t.dtype != ref.dtype:
        raise ValueError(f"{name}.dtype ({t.dtype}) must match {ref_name}.dtype ({ref.dtype})")
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}; move them to one device")


def check_device(t: torch.Tensor, ref: torch.Tensor, name: str, ref_name: str = "x") -> None:
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}; move them to one device")


def check_dtype_in(t: torch.Tensor, name: str, dtypes: tuple[torch.dtype, ...], what: str) -> None:
    if t.dtype not in dtypes:
        raise ValueError(f"{name}.dtype must be {what} ({', '.join(str(d) for d in dtypes)}), got {t.dtype}")


def check_param(t: object, name: str, shape: tuple[int, ...], layout: str, dtypes: tuple[torch.dtype, ...],
                ref: torch.Tensor) -> torch.Tensor:
    """A tensor argument of a fixed shape whose dtype is one of ``dtypes``, on ``ref``'s device."""
    check_tensor(t, name)
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {layout or tuple(shape)} = {tuple(shape)}, got {tuple(t.shape)}")
    check_dtype_in(t, name, tuple(dict.fromkeys(dtypes)), "x's dtype or float32")
    check_device(t, ref, name)
    return t


def check_shape(t: torch.Tensor, shape: tuple[int, ...], name: str, layout: str) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {layout} = {tuple(shape)}, got {tuple(t.shape)}")


class ArgumentTypeError(TypeError, ValueError):
    """An argument of the wrong kind (a string for a flag, a float for a size). A TypeError, and also a ValueError,
    which the size and option checks raised for it before one rule covered them all: callers catching either
    still do."""


# One rule per kind of scalar argument, for every public op, layer and config:
#   flag     a bool (numpy's bool too); never a truthy stand-in: bool("False") is True, and 0, 1 or None in a
#            flag's place is a slip more often than a choice
#   integer  anything integral with __index__: int, numpy integers, a 0-D integer tensor, a traced size; never
#            a bool (True is not a size) nor a float (64.0 would pass a range or membership test and fail later)
#   real     any real number (int, float, numpy floats and integers); never a bool or a string
# Each is returned as the plain Python value the ops' schemas take.

def _numpy_bool() -> tuple[type, ...]:
    try:
        import numpy
    except ImportError:
        return ()
    return (numpy.bool_,)


_BOOLS = (bool, *_numpy_bool())


def _as_int(value: object) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, torch.SymInt):  # a traced size stays symbolic
        return value
    try:
        return operator.index(value)
    except TypeError:
        return None


def check_bool(value: object, name: str) -> bool:
    if not isinstance(value, _BOOLS):
        raise ArgumentTypeError(f"{name} must be a bool (True or False), got {value!r} ({type(value).__name__})")
    return bool(value)


def check_int(value: object, name: str, minimum: int | None = None, maximum: int | None = None) -> int:
    """An integer argument in [minimum, maximum] (either bound optional), as a Python int."""
    n = _as_int(value)
    if n is None:
        raise ArgumentTypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    if (minimum is not None and n < minimum) or (maximum is not None and n > maximum):
        bounds = (f"in [{minimum}, {maximum}]" if minimum is not None and maximum is not None
                  else f">= {minimum}" if minimum is not None else f"<= {maximum}")
        raise ValueError(f"{name} must be an int {bounds}, got {n}")
    return n


def check_positive_ints(**values: object) -> None:
    """Size arguments of a layer or config: each a positive int (a bool is not a size)."""
    for name, value in values.items():
        n = _as_int(value)
        if n is None:
            raise ArgumentTypeError(f"{name} must be a positive int, got {value!r} ({type(value).__name__})")
        if n < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


def check_int_choice(value: object, name: str, choices: tuple[int, ...]) -> int:
    """An integer option from a fixed set, as a Python int. A float such as 64.0 equals 64 and would pass the
    membership test alone, then fail inside the op with an error that names neither."""
    n = _as_int(value)
    if n is None or n not in choices:
        kind = ArgumentTypeError if n is None else ValueError
        raise kind(f"{name} must be one of {choices}, got {value!r} ({type(value).__name__})")
    return n


def check_real(value: object, name: str, *, finite: bool = False) -> float:
    """A real-number argument as a Python float; with ``finite``, NaN and ±inf are refused too. Comparisons, not
    math.isfinite, so a value traced under torch.compile passes through."""
    if isinstance(value, torch.SymFloat):
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ArgumentTypeError(f"{name} must be a real number, got {value!r} ({type(value).__name__})")
    x = float(value)
    if finite and not -math.inf < x < math.inf:
        raise ValueError(f"{name} must be a finite real number, got {x}")
    return x


def autocast_inputs(*tensors: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """Inside ``torch.autocast``, the tensors cast to the autocast dtype, as autocast does for torch.matmul: our
    custom ops are not on autocast's lists, so the matmul-like ones apply its policy themselves. Every floating
    tensor but float64 is cast; anything else passes through to the checks; outside autocast nothing changes.
    Gradients flow back through the casts."""
    first = next((t for t in tensors if isinstance(t, torch.Tensor)), None)
    # is_autocast_enabled raises for meta tensors (shape-only runs), which autocast never casts.
    if first is None or first.is_meta or not torch.is_autocast_enabled(first.device.type):
        return tensors
    dtype = torch.get_autocast_dtype(first.device.type)
    return tuple(t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64
                 else t for t in tensors)
