"""Shared test helpers: devices, dtype tolerances (the error-budget rule), GPU skips."""

from __future__ import annotations

import zlib

import pytest
import torch

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


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_within_budget(out: torch.Tensor, ref64: torch.Tensor, plain_lowp: torch.Tensor, what: str) -> None:
    """flash-attention's error budget: the kernel's max error against the float64 reference is at most twice the
    error of the plain PyTorch formulation run in the same low precision, plus a small atol."""
    assert out.shape == ref64.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    assert torch.isfinite(out).all(), f"{what}: non-finite values (unwritten output?)"
    scale = ref64.abs().max().item() if ref64.numel() else 0.0
    budget = 2 * max_err(plain_lowp, ref64) + 1e-5 * max(1.0, scale)
    err = max_err(out, ref64)
    assert err <= budget, f"{what}: max error {err:.3e} exceeds budget {budget:.3e}"
