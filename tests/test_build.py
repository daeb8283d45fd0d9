"""The build reports what it contains."""

import os
import subprocess
import sys

import torch

import subq
from conftest import opt_in
from subq import experimental


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
    code = "import torch; torch.__version__ = '9.9.9+cu999'; import subq"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: subq was built against torch ") and "9.9.9+cu999" in last, last
    assert "pip install --no-build-isolation --force-reinstall ." in last


def test_info_names_each_op_path(monkeypatch):
    from subq import info

    opt_in(monkeypatch, "ssd_chunk_scan")
    text = info.report()
    assert f"torch {torch.__version__}" in text
    for entry in info.OP_KERNELS:
        assert entry.op in text
    if not torch.cuda.is_available():
        assert "GPU: none found" in text


def test_experimental_kernels_are_one_table():
    """The glue's table of opt-in kernels, as Python reads it: one flag per row, each op under one flag, every op
    public, and `python -m subq.info --experimental-env` exporting them all (bench/gpu_check.sh reads that)."""
    envs = [entry.env for entry in experimental.KERNELS]
    assert len(set(envs)) == len(envs) and all(env.startswith("SUBQ_EXPERIMENTAL_") for env in envs)
    ops = [op for entry in experimental.KERNELS for op in entry.ops]
    assert len(set(ops)) == len(ops)
    for op in ops:
        assert callable(getattr(subq.ops, op)), op
        assert experimental.for_op(op).env in envs
    result = subprocess.run([sys.executable, "-m", "subq.info", "--experimental-env"], capture_output=True, text=True,
                            check=True)
    assert result.stdout.split() == [f"{env}=1" for env in envs]


def test_experimental_enabled_sets_and_restores(monkeypatch):
    flag = experimental.for_op("flash_chunk_attention").env
    monkeypatch.setenv(flag, "0")
    with experimental.enabled("flash_chunk_attention"):
        assert experimental.for_op("flash_chunk_attention").on
        with experimental.enabled("flash_chunk_attention", on=False):
            assert experimental.for_op("flash_chunk_attention").on
    assert not experimental.for_op("flash_chunk_attention").on and os.environ[flag] == "0"
