"""The opt-in CUDA kernels: written without a GPU, each family stays off until its GPU tests have passed on one.

The one list of them is the glue's table (csrc/torch/experimental_flags.h), read here through
``subq._C.experimental_kernels()``; everything else (``subq.info``, the profiler, the tests, the benchmarks,
bench/gpu_check.sh) asks this module instead of naming the environment variables. The ops read their flag on every
call, so :func:`enabled` can switch kernels per call::

    with subq.experimental.enabled("flash_chunk_attention"):
        out = flash_chunk_attention(...)
        out.backward(grad)  # the backward reads the flag too
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

from subq import _C


@dataclass(frozen=True)
class ExperimentalKernels:
    """One opt-in flag: the environment variable, the ops whose CUDA path it changes, what runs once it is on."""

    env: str
    ops: tuple[str, ...]
    kernels: str
    needs_arch: str | None  # the SUBQ_CUDA_ARCHS entry a build needs for them (None: any CUDA build)
    whole_op: bool  # the op's whole CUDA implementation (every GPU test runs it), not a fused path beside another
    why: str

    @property
    def on(self) -> bool:
        """As the glue reads it: on when the variable is exactly "1"."""
        return os.environ.get(self.env) == "1"


KERNELS: tuple[ExperimentalKernels, ...] = tuple(
    ExperimentalKernels(**{**row, "ops": tuple(row["ops"].split(", "))}) for row in _C.experimental_kernels())


def for_op(op: str) -> ExperimentalKernels:
    """The opt-in kernels of public op ``op`` (e.g. ``"ssd_chunk_scan"``)."""
    for entry in KERNELS:
        if op in entry.ops:
            return entry
    ops = ", ".join(op for entry in KERNELS for op in entry.ops)
    raise ValueError(f"op must be one with opt-in CUDA kernels ({ops}), got {op!r}")


def all_on() -> dict[str, str]:
    """Every flag set: the environment that switches all the opt-in kernels on."""
    return {entry.env: "1" for entry in KERNELS}


@contextlib.contextmanager
def enabled(*ops: str, on: bool = True) -> Iterator[None]:
    """The opt-in kernels of ``ops`` on for the duration (when ``on``; else the environment is left as it is), each
    variable's previous value or absence back after, so the calls nest."""
    names = [for_op(op).env for op in ops] if on else []
    previous = {name: os.environ.get(name) for name in names}
    os.environ.update(dict.fromkeys(names, "1"))
    try:
        yield
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
