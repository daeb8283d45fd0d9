"""The opt-in switch: the ops read their SUBQ_EXPERIMENTAL_* flags on every forward and backward call, so a variant
timed with its kernels on holds the flag over both (autograd runs the backward after the forward has returned)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator


@contextlib.contextmanager
def env_flag(name: str | None, on: bool = True) -> Iterator[None]:
    """Environment variable ``name`` set to "1" for the duration (when ``on`` and ``name``), its previous value or
    absence back after, so the calls nest."""
    if name is None or not on:
        yield
        return
    previous = os.environ.get(name)
    os.environ[name] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = previous
