"""Every hand-written CUDA kernel executed on the CPU by the emulator (csrc/emu/), forward and backward, every
dtype, in three schedules (thread and block orders, and WMMA layouts), against the float64 references within the error
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


@pytest.mark.parametrize("arch", ["80", "89", "90"])
def test_monarch_conv_plans_within_each_targets_shared_memory(arch, monkeypatch):
    """The fused convolution sizes its shared memory from the device's opt-in limit: under each target's limit
    (sm_80 163 KB, sm_89 99 KB, sm_90 227 KB) the launches stay within it and the results within budget."""
    monkeypatch.setenv("SUBQ_EMU_ARCH", arch)
    for case in emu_cases.monarch_conv_cases(1, 1, 8192, torch.bfloat16, 700) + \
            emu_cases.monarch_conv_cases(1, 1, 3000, torch.float16, 701, bidirectional=False):
        check(case, monkeypatch)


@pytest.mark.parametrize("variant", ["asan", "tsan"])
def test_kernels_are_clean_under_sanitizers(variant, tmp_path):
    calls = record_calls(emu_cases.tiny_cases())
    calls.append(("subq_emu::transpose_within_rows", [torch.randn(3, 7 * 5).bfloat16(), 7, 5]))
    output = run_sanitized(calls, variant, tmp_path)
    assert "0 reports" in output
