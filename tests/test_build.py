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
