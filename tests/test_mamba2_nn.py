"""subq.nn.Mamba2: the layer against a plain composition of the references, and generation against the forward."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import DEVICES, max_err
from subq.nn import Mamba2, RMSNormGated
from subq.reference import rmsnorm_gated_ref, ssd_ref

SMALL = dict(d_model=32, d_state=16, d_conv=4, expand=2, headdim=16, chunk_size=64)


def reference_forward(layer: Mamba2, u: torch.Tensor) -> torch.Tensor:
    """The Mamba-2 block written out with F.conv1d and the float64 references."""
    batch, seqlen, _ = u.shape
    z, xBC, dt = torch.split(layer.in_proj(u), [layer.d_inner, layer.conv_dim, layer.nheads], dim=-1)
    conv = F.conv1d(xBC.transpose(1, 2), layer.conv1d.weight, layer.conv1d.bias, padding=layer.d_conv - 1,
                    groups=layer.conv_dim)[..., :seqlen]
    xBC = F.silu(conv).transpose(1, 2)
    gn = layer.ngroups * layer.d_state
    x, B, C = torch.split(xBC, [layer.d_inner, gn, gn], dim=-1)
    D = layer.D.view(layer.nheads, layer.headdim) if layer.D.numel() == layer.d_inner else layer.D
    y, _ = ssd_ref(x.reshape(batch, seqlen, layer.nheads, layer.headdim), dt, -torch.exp(layer.A_log.to(u.dtype)),
                   B.reshape(batch, seqlen, layer.ngroups, -1), C.reshape(batch, seqlen, layer.ngroups, -1),
                   D=D.to(u.dtype), dt_bias=layer.dt_bias.to(u.dtype), dt_softplus=True, dt_limit=layer.dt_limit)
    y = rmsnorm_gated_ref(y.reshape(batch, seqlen, -1), layer.norm.weight, z, eps=layer.norm.eps,
                          group_size=layer.norm.group_size, norm_before_gate=layer.norm.norm_before_gate)
    return layer.out_proj(y)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("options", [{}, {"ngroups": 2, "D_has_hdim": True}, {"norm_before_gate": True,
                                                                               "dt_limit": (0.0, 0.05)}])
def test_forward_and_backward_match_reference(device, options):
    layer = Mamba2(**SMALL, **options).to(device=device, dtype=torch.float64)
    u = torch.randn(2, 150, SMALL["d_model"], device=device, dtype=torch.float64, requires_grad=True)
    out, out_ref = layer(u), reference_forward(layer, u)
    assert max_err(out, out_ref) < 1e-10
    dy = torch.randn_like(out)
    params = [u, *layer.parameters()]
    grads = torch.autograd.grad(out, params, dy)
    grads_ref = torch.autograd.grad(out_ref, params, dy)
    for g, g_ref in zip(grads, grads_ref, strict=True):
        assert max_err(g, g_ref) < 1e-9 * max(1.0, g_ref.abs().max().item())


@pytest.mark.parametrize("device", DEVICES)
def test_step_by_step_generation_equals_forward(device):
    layer = Mamba2(**SMALL, ngroups=2).to(device=device, dtype=torch.float64)
    u = torch.randn(2, 70, SMALL["d_model"], device=device, dtype=torch.float64)
    full = layer(u)
    cache = layer.allocate_inference_cache(2)
    steps = torch.stack([layer.step(u[:, t], cache) for t in range(u.shape[1])], dim=1)
    assert max_err(steps, full) < 1e-10


@pytest.mark.parametrize("device", DEVICES)
def test_prefill_then_step_equals_forward(device):
    layer = Mamba2(**SMALL).to(device=device, dtype=torch.float64)
    u = torch.randn(1, 90, SMALL["d_model"], device=device, dtype=torch.float64)
    full = layer(u)
    cache = layer.allocate_inference_cache(1)
    prefix = layer(u[:, :77], cache=cache)
    rest = torch.cat([layer.step(u[:, t:t + 1], cache) for t in range(77, 90)], dim=1)
    assert max_err(torch.cat([prefix, rest], dim=1), full) < 1e-10


def test_packed_sequences_equal_separate_runs():
    layer = Mamba2(**SMALL).double()
    u = torch.randn(1, 130, SMALL["d_model"], dtype=torch.float64)
    seq_idx = torch.zeros(1, 130, dtype=torch.int32)
    seq_idx[:, 50:] = 1
    packed = layer(u, seq_idx=seq_idx)
    assert max_err(packed[:, :50], layer(u[:, :50])) < 1e-10
    assert max_err(packed[:, 50:], layer(u[:, 50:])) < 1e-10


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_runs_and_trains(dtype):
    layer = Mamba2(**SMALL).to(dtype)
    u = torch.randn(2, 100, SMALL["d_model"], dtype=dtype, requires_grad=True)
    out = layer(u)
    assert out.dtype == dtype and torch.isfinite(out).all()
    out.float().square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters())


def test_initialisation_follows_mamba2():
    layer = Mamba2(d_model=64, d_state=16, headdim=16, dt_min=0.001, dt_max=0.1)
    dt = F.softplus(layer.dt_bias)
    assert dt.min() >= 1e-4 and dt.max() <= 0.1 + 1e-6
    A = torch.exp(layer.A_log)
    assert A.min() >= 1 and A.max() <= 16
    assert torch.equal(layer.D, torch.ones(layer.nheads))
    names = {n for n, _ in layer.named_parameters()}
    assert {"in_proj.weight", "conv1d.weight", "conv1d.bias", "dt_bias", "A_log", "D", "norm.weight",
            "out_proj.weight"} <= names


@pytest.mark.parametrize("dynamic", [False, True])
def test_torch_compile_fullgraph(dynamic):
    """One graph, also with dynamic shapes (where a math.isfinite on the layer's eps once broke the graph)."""
    layer = Mamba2(**SMALL)
    compiled = torch.compile(layer, fullgraph=True, dynamic=dynamic, backend="aot_eager")
    for seqlen in (80, 97):
        u = torch.randn(2, seqlen, SMALL["d_model"])
        assert max_err(compiled(u), layer(u)) < 1e-5


def test_bad_configuration():
    with pytest.raises(ValueError, match="multiple of headdim"):
        Mamba2(d_model=30, headdim=16)
    with pytest.raises(ValueError, match="ngroups"):
        Mamba2(d_model=32, headdim=16, ngroups=3)
    with pytest.raises(ValueError, match="headdim must be a positive int, got 0"):
        Mamba2(16, headdim=0)
    with pytest.raises(ValueError, match="ngroups must be a positive int, got 0"):
        Mamba2(32, headdim=16, ngroups=0)
    with pytest.raises(ValueError, match="d_conv must be one of \\(2, 3, 4\\), got 1"):
        Mamba2(32, headdim=16, d_conv=1)
    with pytest.raises(ValueError, match="d_state must be a positive int, got 0"):
        Mamba2(32, headdim=16, d_state=0)
    with pytest.raises(ValueError, match="expand must be a positive int, got 1.5"):
        Mamba2(32, headdim=16, expand=1.5)
    with pytest.raises(ValueError, match="eps must be a finite number >= 0, got -1"):
        RMSNormGated(16, eps=-1)
    with pytest.raises(ValueError, match="group_size \\(5\\) must divide hidden_size \\(16\\)"):
        RMSNormGated(16, group_size=5)
    norm = RMSNormGated(16, eps=np.float32(1e-5), group_size=np.int64(8))  # numpy numbers reach the op as Python ones
    assert norm(torch.randn(3, 16), torch.randn(3, 16)).shape == (3, 16)
    layer = Mamba2(**SMALL)
    with pytest.raises(ValueError, match="one token"):
        layer.step(torch.randn(1, 2, SMALL["d_model"]), layer.allocate_inference_cache(1))
