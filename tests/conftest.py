"""Shared test helpers: devices, dtype tolerances (the error-budget rule), GPU skips."""

from __future__ import annotations

import sys
import zlib

import pytest
import torch

import subq
from subq import experimental

HAS_CUDA = torch.cuda.is_available()

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA device (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed(request):
    """Fresh but reproducible random inputs per test."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


# CUDA kernels written without a GPU stay opt-in until their GPU tests pass on one. Those that are an op's whole CUDA
# implementation (not a fused alternative with tests of its own) are on in every gpu-marked test, the device sweeps
# included; each such op's test_cuda_kernels_are_opt_in covers the default path.
@pytest.fixture(autouse=True)
def _opt_in_kernels_on_gpu(request, monkeypatch):
    if "gpu" in request.node.keywords:
        for entry in experimental.KERNELS:
            if entry.whole_op:
                monkeypatch.setenv(entry.env, "1")


def opt_in(monkeypatch, op: str, on: bool = True) -> str:
    """The opt-in CUDA kernels of public op `op` switched on (or off) for the rest of the test; returns their flag."""
    flag = experimental.for_op(op).env
    if on:
        monkeypatch.setenv(flag, "1")
    else:
        monkeypatch.delenv(flag, raising=False)
    return flag


def poison_cuda_allocator() -> None:
    """Fill the caching allocator's free blocks with NaN, so an element a kernel forgets to write fails the test."""
    junk = torch.full((64 << 20,), float("nan"), device="cuda")
    del junk


def run_profiled(fn):
    """fn's result and the names of the CUDA kernels it launched: which implementation ran."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        out = fn()
        torch.cuda.synchronize()
    return out, [e.name for e in prof.events()]


def launched(names: list[str], part: str) -> bool:
    """Whether one of the kernel names contains `part` (case-insensitive)."""
    return any(part.lower() in name.lower() for name in names)


def assert_opt_in(monkeypatch, op: str, kernels: list[str], run) -> None:
    """run() (which checks its own results) launches every one of `kernels` with op's opt-in flag set, as the gpu
    tests set it, and none of them once the flag is unset: the op's default CUDA path."""
    for enabled in (True, False):
        flag = opt_in(monkeypatch, op, enabled)
        _, names = run_profiled(run)
        expected = enabled and subq.cuda_built()
        for kernel in kernels:
            assert launched(names, kernel) == expected, f"{flag}={int(enabled)}: {kernel} ran: {not expected}; {names}"


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_within_budget(out: torch.Tensor, ref64: torch.Tensor, plain_lowp: torch.Tensor, what: str) -> float:
    """flash-attention's error budget: the kernel's max error against the float64 reference is at most twice the
    error of the plain PyTorch formulation run in the same low precision, plus a small atol. Returns the fraction
    of the budget used."""
    assert out.shape == ref64.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    assert torch.isfinite(out).all(), f"{what}: non-finite values (unwritten output?)"
    scale = ref64.abs().max().item() if ref64.numel() else 0.0
    budget = 2 * max_err(plain_lowp, ref64) + 1e-5 * max(1.0, scale)
    err = max_err(out, ref64)
    assert err <= budget, f"{what}: max error {err:.3e} exceeds budget {budget:.3e}"
    return err / budget


EMULATED_TEST_FILES = ("test_emulated_kernels.py", "test_emulator_catches_bugs.py")


def pytest_terminal_summary(terminalreporter):
    """The emulated kernels' share of the run (the issue's budget for it: 10 minutes on 2 cores)."""
    seconds, count = 0.0, 0
    for reports in terminalreporter.stats.values():
        for report in reports:
            nodeid = getattr(report, "nodeid", "")
            if getattr(report, "when", None) == "call" and any(f in nodeid for f in EMULATED_TEST_FILES):
                seconds += report.duration
                count += 1
    if count:
        terminalreporter.write_line(f"subq emu: {count} emulated-kernel tests ran in {seconds:.0f} s")
    support = sys.modules.get("emu_support")
    for op, fraction in sorted(getattr(support, "BUDGET_USED", {}).items()):
        terminalreporter.write_line(f"subq emu: {op}: worst error {fraction:.0%} of its budget")
