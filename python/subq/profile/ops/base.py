"""What the profiler knows about one op: its size grids, how to make inputs, subq's callable and the baselines', and
for each of them the FLOP formulas. Bytes are derived from the input shapes, so they cannot disagree with them.
Variants of a callable share its formulas: ``opt_in`` (subq with an opt-in kernel flag), ``compiled`` (torch.compile
of a baseline), ``peer`` (a reference repository's formulation, where its package imports); a callable that cannot
run on a device says why, and the run lists it as not run.

FLOPs count a multiply-add as 2. Two counts per callable:
- ``matmul_flops``: the matrix-product FLOPs the algorithm actually executes (what the matmul peak is a ceiling of);
- ``useful_flops``: the FLOPs of the math it computes, by its cheapest exact formulation.
A forward+backward pass is 3x the forward unless a callable's formula says otherwise (each product of the forward
has two products of the same size in the backward: one per operand).

Minimum bytes moved, for every callable: forward reads its inputs once and writes its output once; forward+backward
also reads the inputs and the output gradient again and writes one gradient per input: 3 x inputs + 2 x output.
A decode step (forward only) also moves the part of its state it must read and write: ``state_bytes``, on top of
its token's inputs (its leaves) and output.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch

from subq import experimental
from subq.profile.errors import ProfileError
from subq.profile.timing import input_set_count

Size = dict[str, int]
Inputs = dict[str, torch.Tensor]  # "dy" is the output gradient, shaped like the output (a decode step: its size)
Formula = Callable[[Size, str], float]  # (size, pass) -> FLOPs
Availability = Callable[[torch.device], str | None]  # device -> why the callable cannot run there, or None
PASSES = ("fwd", "fwd+bwd")
META = torch.device("meta")
STATE_DTYPE = torch.float32  # a decode state accumulates over the whole generation: kept in fp32 whatever the dtype


def three_x(forward: Callable[[Size], float]) -> Formula:
    """The FLOPs of a pass from the forward's, when the backward is two products per forward product."""
    return lambda size, pass_name: forward(size) * (1 if pass_name == "fwd" else 3)


@dataclass(frozen=True)
class Impl:
    """One way to compute an op: subq's (first in OpSpec.impls) or a baseline's."""

    name: str
    forward: Callable[[Inputs, Size], torch.Tensor]  # (one input set, its size) -> output
    leaves: tuple[str, ...]  # the inputs it reads and, in fwd+bwd, differentiates (those an input set has)
    matmul_flops: Formula
    useful_flops: Formula
    opt_in: str | None = None  # the op whose opt-in kernels (subq.experimental) are on around forward and backward
    unavailable: Availability = lambda device: None

    @property
    def flag(self) -> str | None:
        """The environment variable that switches the opt-in kernels on, from the one table of them."""
        return experimental.for_op(self.opt_in).env if self.opt_in else None

    def kernels_on(self) -> contextlib.AbstractContextManager:
        """The opt-in kernels on for the duration (nothing changes for a callable without them)."""
        return experimental.enabled(self.opt_in) if self.opt_in else contextlib.nullcontext()


def leaves_of(impl: Impl, inputs: Inputs) -> tuple[str, ...]:
    """``impl``'s leaves that ``inputs`` holds: an optional input (k_rev) is in some sizes' sets only."""
    return tuple(name for name in impl.leaves if name in inputs)


def _cuda_only(what: str) -> Availability:
    return lambda device: None if device.type == "cuda" else f"{what} is timed on CUDA only"


def opt_in(impl: Impl, name: str, op: str) -> Impl:
    """``impl`` with ``op``'s opt-in kernels switched on, timed side by side with the default path. They are CUDA
    kernels: on a CPU the variant would time the default path again."""
    variant = replace(impl, name=name, opt_in=op)
    return replace(variant, unavailable=_cuda_only(f"{variant.flag}=1"))


def compiled(impl: Impl) -> Impl:
    """``torch.compile`` of a baseline (static shapes: one compile per size, outside the timed calls' median). CUDA
    only: on a CPU the compile takes minutes per size and the generated C++ is not what the kernels compete with."""
    compile_once = functools.cache(lambda: torch.compile(impl.forward, dynamic=False))
    return replace(impl, name=f"{impl.name}_compiled", forward=lambda i, s: compile_once()(i, s),
                   unavailable=_cuda_only("torch.compile"))


def peer(impl: Impl, module: str, cuda_only: bool = True) -> Impl:
    """A reference repository's formulation, run only where its package imports (and, for Triton code, on CUDA)."""
    def unavailable(device: torch.device) -> str | None:
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed"
        return _cuda_only(module)(device) if cuda_only else None
    return replace(impl, unavailable=unavailable)


@dataclass(frozen=True)
class OpSpec:
    name: str
    summary: str
    full: dict[str, list[int]]  # the grid: every combination of the axes' values
    quick: dict[str, list[int]]
    make_inputs: Callable[[Size, torch.dtype, torch.device], Inputs]
    impls: tuple[Impl, ...]
    check_against: str | None  # a baseline computing the same function, in float64 the check of subq (check.py)
    work_bytes: Callable[[Size, torch.dtype], int]  # peak memory beyond the input sets, an over-estimate
    invalid: Callable[[Size], str | None] = lambda size: None
    abbrev: dict[str, str] = field(default_factory=dict)  # axis -> short name for the size label
    passes: tuple[str, ...] = PASSES  # a decode step has no backward: ("fwd",)
    state: tuple[str, ...] = ()  # inputs a decode step updates in place
    state_bytes: Callable[[Size], int] = lambda size: 0  # what a call must read and write of ``state``

    @property
    def subq(self) -> Impl:
        return self.impls[0]

    @property
    def baselines(self) -> tuple[Impl, ...]:
        return self.impls[1:]

    def impl(self, name: str) -> Impl:
        return next(i for i in self.impls if i.name == name)

    def impls_on(self, device: torch.device) -> tuple[Impl, ...]:
        return tuple(i for i in self.impls if i.unavailable(device) is None)

    def skipped_on(self, device: torch.device) -> dict[str, str]:
        """The callables that cannot run on ``device``, and why (a missing peer package, CUDA-only code)."""
        return {i.name: reason for i in self.impls if (reason := i.unavailable(device)) is not None}

    def sizes(self, quick: bool, overrides: dict[str, list[int]]) -> list[Size]:
        """The grid with ``overrides`` replacing axes of the same name; raises on a combination the op rejects."""
        axes = {axis: overrides.get(axis, values) for axis, values in (self.quick if quick else self.full).items()}
        sizes = [dict(zip(axes, values, strict=True)) for values in itertools.product(*axes.values())]
        for size in sizes:
            reason = self.invalid(size)
            if reason:
                raise ProfileError(f"{self.name} at {self.label(size)}: {reason}")
        return sizes

    def label(self, size: Size) -> str:
        return " ".join(f"{self.abbrev.get(k, k)}{v}" for k, v in size.items())

    def _meta_inputs(self, size: Size, dtype: torch.dtype) -> Inputs:
        return self.make_inputs(size, dtype, META)

    def set_bytes(self, size: Size, dtype: torch.dtype) -> int:
        """Bytes of one input set (shapes from meta tensors: nothing is allocated)."""
        return sum(t.numel() * t.element_size() for t in self._meta_inputs(size, dtype).values())

    def memory_bytes(self, size: Size, dtype: torch.dtype, device: torch.device) -> int:
        """What a size needs at its peak: the rotated input sets plus the working memory of the heaviest pass."""
        one = self.set_bytes(size, dtype)
        return input_set_count(one, device) * one + self.work_bytes(size, dtype)

    def min_bytes(self, impl: Impl, size: Size, dtype: torch.dtype, pass_name: str) -> int:
        inputs = self._meta_inputs(size, dtype)
        read = sum(inputs[n].numel() * inputs[n].element_size() for n in leaves_of(impl, inputs))
        written = inputs["dy"].numel() * inputs["dy"].element_size()
        return read + written + self.state_bytes(size) if pass_name == "fwd" else 3 * read + 2 * written


def chunks(size: Size) -> int:
    """How many chunks of ``chunk_size`` cover ``seqlen`` (the last one zero-padded)."""
    return math.ceil(size["seqlen"] / size["chunk_size"])


def normal(*shape: int, dtype: torch.dtype, device: torch.device, scale: float = 1.0) -> torch.Tensor:
    """A random input: standard normal times ``scale``, drawn in fp32 then cast."""
    return (torch.randn(*shape, device=device) * scale).to(dtype)


def leaf(*shape: int, dtype: torch.dtype, device: torch.device, scale: float = 1.0) -> torch.Tensor:
    """A differentiable random input (``normal``)."""
    return normal(*shape, dtype=dtype, device=device, scale=scale).requires_grad_()
