"""subq.nn.BlockdiagLinear and MonarchLinear: shapes, padding, init, from_dense."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import DEVICES, max_err
from subq.nn import BlockdiagLinear, MonarchLinear
from subq.reference import blockdiag_matmul_ref, monarch_dense_matrix

SIZES = [(16, 16, 4), (10, 24, 4), (24, 10, 4), (30, 50, 3), (7, 5, 1), (64, 32, 16)]


def dense_weight(layer: nn.Module) -> torch.Tensor:
    """The (out, in) matrix the layer applies, cut from its padded factored matrix."""
    if isinstance(layer, MonarchLinear):
        full = monarch_dense_matrix(layer.blkdiag1, layer.blkdiag2)
    else:
        full = torch.block_diag(*layer.weight)
    return full[: layer.out_features, : layer.in_features]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cls", [BlockdiagLinear, MonarchLinear])
@pytest.mark.parametrize("sizes", SIZES)
def test_layer_is_its_dense_matrix(cls, sizes, device):
    in_f, out_f, nb = sizes
    layer = cls(in_f, out_f, nblocks=nb, device=device, dtype=torch.float64)
    x = torch.randn(2, 3, in_f, dtype=torch.float64, device=device, requires_grad=True)
    y = layer(x)
    assert y.shape == (2, 3, out_f)
    assert max_err(y, x @ dense_weight(layer).t() + layer.bias) < 1e-12
    y.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in layer.parameters())


def test_no_bias_and_repr():
    layer = MonarchLinear(32, 48, nblocks=4, bias=False)
    assert layer.bias is None and "bias=False" in repr(layer)
    assert layer(torch.randn(5, 32)).shape == (5, 48)


def test_init_is_kaiming_uniform_per_block():
    layer = BlockdiagLinear(256, 256, nblocks=4)
    bound = 1 / layer.in_block**0.5  # kaiming_uniform(a=sqrt(5)) on fan_in = block input size
    assert layer.weight.abs().max() <= bound
    assert layer.weight.abs().max() > 0.9 * bound
    assert layer.bias.abs().max() <= 1 / 256**0.5


def test_monarch_init_is_kaiming_uniform_per_block():
    """Each factor's blocks are bounded by their own fan-in: w1's by p (a block of x), w2's by r (a block of P t)."""
    layer = MonarchLinear(256, 512, nblocks=4)
    for factor in (layer.blkdiag1, layer.blkdiag2):
        bound = 1 / factor.shape[-1] ** 0.5
        for block in factor:
            assert 0.9 * bound < block.abs().max() <= bound
    assert layer.bias.abs().max() <= 1 / 256**0.5


def test_from_dense_recovers_a_monarch_matrix():
    for in_f, out_f, nb in SIZES:
        source = MonarchLinear(in_f, out_f, nblocks=nb, dtype=torch.float64)
        dense = nn.Linear(in_f, out_f, dtype=torch.float64)
        with torch.no_grad():
            dense.weight.copy_(dense_weight(source))
        projected = MonarchLinear.from_dense(dense, nblocks=nb)
        x = torch.randn(4, in_f, dtype=torch.float64)
        assert max_err(projected(x), dense(x)) < 1e-10, (in_f, out_f, nb)


def test_from_dense_is_a_projection():
    """Projecting a random dense matrix lands on the nearest Monarch matrix: projecting again changes nothing,
    and no random perturbation of the factors gets closer."""
    dense = nn.Linear(16, 16, dtype=torch.float64)
    projected = MonarchLinear.from_dense(dense, nblocks=4)
    m = dense_weight(projected)
    relinear = nn.Linear(16, 16, dtype=torch.float64)
    with torch.no_grad():
        relinear.weight.copy_(m)
    assert max_err(dense_weight(MonarchLinear.from_dense(relinear, nblocks=4)), m) < 1e-10
    best = (m - dense.weight).norm()
    for _ in range(20):
        jittered = projected.blkdiag1 + 1e-3 * torch.randn_like(projected.blkdiag1)
        assert (monarch_dense_matrix(jittered, projected.blkdiag2) - dense.weight).norm() >= best - 1e-12


def test_blockdiag_layer_matches_reference_product():
    layer = BlockdiagLinear(12, 8, nblocks=4, bias=False, dtype=torch.float64)
    x = torch.randn(3, 12, dtype=torch.float64)
    assert max_err(layer(x), blockdiag_matmul_ref(x, layer.weight)) < 1e-12


@pytest.mark.parametrize("cls", [BlockdiagLinear, MonarchLinear])
def test_meta_device_gives_shapes(cls):
    """Layers built on the meta device (deferred init) run shape-only forwards."""
    layer = cls(10, 24, nblocks=4, device="meta")
    assert layer(torch.empty(2, 3, 10, device="meta")).shape == (2, 3, 24)


@pytest.mark.parametrize("cls", [BlockdiagLinear, MonarchLinear])
def test_inductor_compiles_padded_layers(cls):
    """A layer whose sizes do not divide (pad, product, truncate, bias) compiles into one graph with dynamic
    token counts, forward and backward matching eager."""
    layer = cls(10, 24, nblocks=4)
    compiled = torch.compile(layer, fullgraph=True, dynamic=True)
    for tokens in (3, 11):
        x = torch.randn(tokens, 10, requires_grad=True)
        got, want = compiled(x), layer(x)
        assert max_err(got, want) < 1e-5
        dy = torch.randn_like(want)
        params = (x, *layer.parameters())
        for g, w in zip(torch.autograd.grad(got, params, dy), torch.autograd.grad(want, params, dy), strict=True):
            assert max_err(g, w) < 1e-5


def test_bad_sizes_and_inputs():
    with pytest.raises(ValueError, match="nblocks must be a positive int"):
        MonarchLinear(16, 16, nblocks=0)
    with pytest.raises(ValueError, match="nblocks must be a positive int, got True"):
        MonarchLinear(16, 16, nblocks=True)
    with pytest.raises(TypeError, match="input must be a torch.Tensor, got list"):
        MonarchLinear(4, 4, nblocks=2)([1.0, 2.0, 3.0, 4.0])
    with pytest.raises(ValueError, match="in_features must be a positive int"):
        BlockdiagLinear(-1, 16)
    with pytest.raises(ValueError, match="input.shape\\[-1\\] must be in_features=16"):
        MonarchLinear(16, 16)(torch.randn(3, 15))
    with pytest.raises(ValueError, match="input must have at least 1 dimension \\(..., in_features=16\\)"):
        MonarchLinear(16, 16)(torch.tensor(1.0))
    with pytest.raises(TypeError, match="linear must be an nn.Linear"):
        MonarchLinear.from_dense(nn.Conv1d(3, 3, 1))
