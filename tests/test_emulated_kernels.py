"""Every hand-written CUDA kernel executed on the CPU by the emulator (csrc/emu/), forward and backward, every
dtype, in two schedules (thread, block and WMMA-layout orders), against the float64 composite within the error
budget; then each kernel once under ASan+UBSan and once under TSan. See tests/emu_support.py."""
from __future__ import annotations

import pytest
import torch

import emu_cases
from emu_support import SCHEDULES, check, record_calls, requires_emulator, run_sanitized

pytestmark = requires_emulator

CASES = emu_cases.cases()


@pytest.mark.parametrize("schedule", SCHEDULES, ids=lambda s: f"{s[0]}{s[1]}")
@pytest.mark.parametrize("case", CASES, ids=repr)
def test_emulated_kernel_matches_reference(case, schedule, monkeypatch):
    check(case, monkeypatch, schedule)


def test_grouped_matmul_tf32_dispatch(monkeypatch):
    """float32 with TF32 allowed takes the TensorOpTF32 family: 4-element vectors, so K = 7 and N = 9 are padded."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
    for case in emu_cases.grouped_cases([0, 13, 29, 0], 3, 7, 9, torch.float32, 740):
        check(case, monkeypatch)


def test_monarch_permutation_kernel():
    from emu_support import load_plain

    load_plain()
    for dtype, rows, blocks, cols in ((torch.bfloat16, 5, 4, 8), (torch.float32, 3, 7, 33), (torch.float16, 70, 2, 3)):
        x = torch.randn(rows, blocks * cols).to(dtype)
        out = torch.ops.subq_emu.transpose_within_rows(x, blocks, cols)
        expected = x.view(rows, cols, blocks).transpose(1, 2).reshape(rows, blocks * cols)
        assert torch.equal(out, expected)
    assert torch.ops.subq_emu.take_reports() == []


@pytest.mark.parametrize("variant", ["asan", "tsan"])
def test_kernels_are_clean_under_sanitizers(variant, tmp_path, monkeypatch):
    output = run_sanitized(record_calls(emu_cases.tiny_cases(), monkeypatch), variant, tmp_path)
    assert "0 reports" in output
