"""The build reports what it contains."""

import torch

import subq


def test_cuda_built_matches_archs():
    archs = subq.cuda_archs()
    assert subq.cuda_built() == bool(archs)
    if subq.cuda_built():
        assert torch.version.cuda is not None
        assert all(a.rstrip("a").isdigit() for a in archs.split(";"))


def test_ops_are_registered():
    for name in ("blockdiag_fwd", "blockdiag_bwd", "monarch_fwd", "monarch_bwd"):
        assert hasattr(torch.ops.subq, name)


def test_build_records_the_torch_it_was_built_against():
    from subq import _build_info

    assert _build_info.TORCH_VERSION == torch.__version__
    assert subq.__version__.startswith("0.1.0")


def test_importing_under_another_torch_raises_one_clear_error():
    """The ABI guard: a build for another torch fails at import with both versions and the fix."""
    import subprocess
    import sys

    code = "import torch; torch.__version__ = '9.9.9+cu999'; import subq"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: subq was built against torch ") and "9.9.9+cu999" in last, last
    assert "pip install --no-build-isolation --force-reinstall ." in last


def test_info_names_each_op_path(monkeypatch):
    from subq import info

    monkeypatch.setenv("SUBQ_EXPERIMENTAL_SSD_KERNELS", "1")
    text = info.report()
    assert f"torch {torch.__version__}" in text
    for entry in info.OP_KERNELS:
        assert entry.op in text
    if not torch.cuda.is_available():
        assert "GPU: none found" in text
