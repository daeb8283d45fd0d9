"""Running our CUDA kernels under the CPU emulator (csrc/emu/): build, schedules, the sanitizer runners, checks.

The rewritten glue registers each op's CUDA implementation as `torch.ops.subq_emu.<op>` for CPU tensors; within
`emulated()` those replace the CPU kernels of `torch.ops.subq`, so the public ops (their checks, autograd and all)
run the emulated kernels. A case is judged as the GPU tests judge the kernels: outputs and gradients against the
op's reference in float64, within the error budget of the same reference run in the inputs' own precision.
"""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import assert_within_budget
from subq import experimental

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "csrc" / "emu"))
import build as emu_build  # noqa: E402

# Every opt-in kernel family the emulator can run (no arch-specific ones: it has no sm_90a): emulated cases run the
# kernels, never the glue's composite fallback.
KERNEL_FLAGS = tuple(entry.env for entry in experimental.KERNELS if entry.needs_arch is None)
# (SUBQ_EMU_SCHEDULE, SUBQ_EMU_SEED): thread and block order, and the WMMA fragment layout with them.
SCHEDULES = (("forward", "1"), ("reverse", "1"), ("random", "7"))
# The worst fraction of its error budget each op's outputs and gradients used (printed in pytest's summary).
BUDGET_USED: dict[str, float] = {}


_loaded: list[bool] = []


def load_plain() -> None:
    """Builds (incrementally) and loads build/emu/libsubq_emu.so once per process; SUBQ_EMU_LIBRARY names another
    build of it instead (a seeded mutant's, in a process of its own)."""
    if not _loaded:
        library = os.environ.get("SUBQ_EMU_LIBRARY")
        if not library:
            emu_build.build(["plain"])
            library = str(emu_build.target("plain"))
        torch.ops.load_library(library)
        _loaded.append(True)


_EMU_OWN_OPS = {"take_reports", "take_launches", "transpose_within_rows"}


@contextlib.contextmanager
def emulated(monkeypatch, schedule: tuple[str, str] = SCHEDULES[0]):
    """Within it, the public subq ops on CPU tensors run the CUDA glue and kernels under the emulator: the CPU
    kernels of torch.ops.subq are overridden by the emulated ones (autograd, fake kernels and checks above them stay
    as they are), every opt-in kernel is on, and the schedule is `schedule`."""
    load_plain()
    for flag in KERNEL_FLAGS:
        monkeypatch.setenv(flag, "1")
    monkeypatch.setenv("SUBQ_EMU_SCHEDULE", schedule[0])
    monkeypatch.setenv("SUBQ_EMU_SEED", schedule[1])
    monkeypatch.setenv("SUBQ_EMU_WORKERS", "2")
    torch.ops.subq_emu.take_reports()
    torch.ops.subq_emu.take_launches()
    lib = torch.library.Library("subq", "IMPL")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "overriding a previously registered kernel": on purpose
        for qualified in torch._C._dispatch_get_all_op_names():
            namespace, _, name = qualified.partition("::")
            if namespace == "subq_emu" and name not in _EMU_OWN_OPS:
                lib.impl(name, getattr(torch.ops.subq_emu, name), "CPU")
    try:
        yield
    finally:
        lib._destroy()


class RawCalls(TorchDispatchMode):
    """Records the subq ops' raw calls as the sanitizer runners take them (under the emulator's namespace)."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[str, list]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "subq":
            assert not kwargs, f"{func} called with keyword arguments {kwargs}"
            name = func._schema.name.partition("::")[2]
            self.calls.append((f"subq_emu::{name}", [a.clone() if isinstance(a, torch.Tensor) else a for a in args]))
        return func(*args, **(kwargs or {}))


@dataclass
class Case:
    """A public op called on `inputs` (a dict of its keyword arguments) under the emulator, against `ref` (the op's
    plain PyTorch reference, same keywords and output structure) in float64, within the error budget of `ref` in
    the inputs' own precision. `grads`: the inputs to differentiate (all outputs get random cotangents).
    `kernels`: parts of the kernel names that must run."""

    name: str
    op: Callable
    ref: Callable
    inputs: dict
    grads: list[str]
    kernels: list[str]

    def __repr__(self) -> str:
        return self.name


def _as_tuple(out) -> tuple:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def _evaluate(fn, inputs: dict, grads: list[str], cotangents, to64: bool):
    """fn's outputs and the gradients of sum(out * cotangent) w.r.t. `grads`, on fresh copies of the inputs."""
    kw = {}
    for k, v in inputs.items():
        if isinstance(v, torch.Tensor):
            v = v.detach().clone()
            if to64 and v.is_floating_point():
                v = v.double()
            if k in grads:
                v.requires_grad_()
        kw[k] = v
    outs = _as_tuple(fn(**kw))
    grad_values = []
    if grads:
        diff = [(o, c) for o, c in zip(outs, cotangents, strict=True) if o.requires_grad]
        grad_values = torch.autograd.grad([o for o, _ in diff], [kw[k] for k in grads],
                                          [c.to(o.dtype) for o, c in diff], allow_unused=True)
    return [o.detach() for o in outs], list(grad_values)


def _cotangents(case: Case, monkeypatch, schedule) -> list[torch.Tensor]:
    """Random output cotangents, rounded to the op's output dtypes: the reference gets the same values the kernel
    gets (the float64 reference of a bf16 output would otherwise see digits the kernel never does)."""
    with emulated(monkeypatch, schedule):
        outs, _ = _evaluate(case.op, case.inputs, [], None, to64=False)
    return [torch.randn(o.shape, dtype=torch.float64).to(o.dtype).double() for o in outs]


def check(case: Case, monkeypatch, schedule: tuple[str, str] = SCHEDULES[0]) -> None:
    """Runs the case under the emulator in one schedule; asserts no emulator report, that the kernels ran, and every
    output and gradient within the error budget."""
    torch.manual_seed(zlib.crc32(case.name.encode()))
    cotangents = _cotangents(case, monkeypatch, schedule) if case.grads else None
    ref_outs, ref_grads = _evaluate(case.ref, case.inputs, case.grads, cotangents, to64=True)
    plain_outs, plain_grads = _evaluate(case.ref, case.inputs, case.grads, cotangents, to64=False)
    with emulated(monkeypatch, schedule):
        outs, grads = _evaluate(case.op, case.inputs, case.grads, cotangents, to64=False)
        launched = torch.ops.subq_emu.take_launches()
        reports = torch.ops.subq_emu.take_reports()
    assert not reports, "emulator reports:\n" + "\n".join(reports)
    for kernel in case.kernels:
        assert any(kernel in name for name in launched), f"{kernel} did not run; launched: {sorted(set(launched))}"
    used = [assert_within_budget(o, r, p, f"{case.name} output {i}")
            for i, (o, r, p) in enumerate(zip(outs, ref_outs, plain_outs, strict=True))]
    for name, g, r, p in zip(case.grads, grads, ref_grads, plain_grads, strict=True):
        if r is None:
            continue
        assert g is not None, f"{case.name}: no gradient for {name}"
        used.append(assert_within_budget(g, r, p, f"{case.name} d{name}"))
    op = case.ref.__name__.strip("_").removesuffix("_ref")
    BUDGET_USED[op] = max(BUDGET_USED.get(op, 0.0), *used)


def record_calls(cases: list[Case], backward: bool = True) -> list[tuple[str, list]]:
    """The raw op calls the cases make, forward and (with random cotangents) backward, for the sanitizer runners.
    Made through the CPU composites: the calls' arguments are the same, and no emulator is needed to record them."""
    calls = []
    for case in cases:
        grads = case.grads if backward else []
        cotangents = None
        if grads:
            outs, _ = _evaluate(case.op, case.inputs, [], None, to64=False)
            cotangents = [torch.randn(o.shape, dtype=torch.float64) for o in outs]
        with RawCalls() as recorder:
            _evaluate(case.op, case.inputs, grads, cotangents, to64=False)
        assert recorder.calls, f"{case.name} called no subq op"
        calls += recorder.calls
    return calls


def run_runner(runner: Path, calls: list[tuple[str, list]], path: Path, timeout: float = 1200,
               workers: int = 2) -> tuple[int, str]:
    """Runs recorded raw op calls (saved to `path`) through a runner built by csrc/emu/build.py, in the sanitizer
    runs' schedule on `workers` threads; returns its exit status and its output (stdout, then stderr)."""
    torch.save(calls, path)
    env = dict(os.environ, **{flag: "1" for flag in KERNEL_FLAGS})
    env.update(SUBQ_EMU_WORKERS=str(workers), SUBQ_EMU_SCHEDULE="random", SUBQ_EMU_SEED="3",
               ASAN_OPTIONS="detect_leaks=0:abort_on_error=0:halt_on_error=1",
               UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1",
               TSAN_OPTIONS="halt_on_error=1:history_size=4:report_signal_unsafe=0")
    result = subprocess.run([str(runner), str(path)], env=env, capture_output=True, text=True, timeout=timeout)
    return result.returncode, result.stdout + result.stderr


def run_sanitized(calls: list[tuple[str, list]], variant: str, tmp_path: Path) -> str:
    """Runs recorded raw op calls through build/emu/subq_emu_run_<variant> (ASan+UBSan or TSan); fails on any
    finding (a sanitizer's, the emulator's, or a non-finite output)."""
    emu_build.build([variant])
    returncode, output = run_runner(emu_build.target(variant), calls, tmp_path / f"calls_{variant}.pt")
    assert returncode == 0, f"{variant} runner exit {returncode}:\n{output[-12000:]}"
    return output


requires_emulator = pytest.mark.skipif(emu_build.unavailable_reason() is not None,
                                       reason=f"no CPU emulator here: {emu_build.unavailable_reason()}")
