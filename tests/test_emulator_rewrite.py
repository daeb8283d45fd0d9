"""The emulator's source rewrite (csrc/emu/rewrite.py) keeps every line where it was, so compiler messages and
sanitizer reports name the original source line, and leaves no launch or __shared__ declaration behind."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "csrc" / "emu"))
import rewrite  # noqa: E402

KERNEL_SOURCES = sorted(p for p in (ROOT / "csrc").rglob("*.cu*") if "emu" not in p.parts)


@pytest.mark.parametrize("path", KERNEL_SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_rewrite_keeps_lines_and_leaves_no_cuda_syntax(path):
    source = path.read_text()
    rewritten = rewrite.rewrite_kernel_source(source)
    assert rewritten.count("\n") == source.count("\n")
    assert "<<<" not in rewritten
    assert "__shared__" not in rewritten


def test_rewrite_of_launches_and_shared_declarations():
    src = ("template <typename T>\n__global__ void k(int n) {\n  __shared__ __align__(32) float a[4][n + 1], b[2];\n"
           "  extern __shared__ float dyn[];\n}\nvoid f() {\n  k<float><<<dim3(2,\n 3), 64, 0, s>>>(5);\n"
           "  plain<<<1, 32>>>(x);\n}\n")
    out = rewrite.rewrite_kernel_source(src)
    assert out.count("\n") == src.count("\n")
    assert 'auto& a = ::subq_emu::shared<float[(4)][(n + 1)], 32>("a", [] {});' in out
    assert 'auto& b = ::subq_emu::shared<float[(2)], 32>("b", [] {});' in out
    assert "#define dyn (::subq_emu::dynamic_shared_as<float>())" in out
    # k is a template the call deduces nothing for: its arguments are explicit, so it is launched by address.
    assert '::subq_emu::launch("k<float>", k<float>, dim3(2,\n 3), 64, 0, s)(5)' in out
    assert '::subq_emu::launch("plain", plain, 1, 32)(x)' in out
