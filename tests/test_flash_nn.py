"""subq.nn.GAU and FLASH: the layer formula (against the explicit L x L references), RoPE, ScaleNorm, causality,
and token-by-token decoding of the causal layers, after a prefill through forward(x, cache) or from empty."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import DEVICES, max_err
from subq.nn import FLASH, GAU, ScaleNorm, rotary_embedding
from subq.reference import flash_quadratic_ref, gau_attention_ref


def rope_complex(x, positions, base=10000.0):
    """RoPE written independently: feature pairs (i, i + S/2) as complex numbers times exp(i·pos·θ_i)."""
    half = x.shape[-1] // 2
    theta = base ** (-torch.arange(half, dtype=torch.float64) / half)
    rot = torch.polar(torch.ones(len(positions), half, dtype=torch.float64), positions.double()[:, None] * theta)
    z = torch.complex(x[..., :half], x[..., half:2 * half]) * rot
    return torch.cat([z.real, z.imag, x[..., 2 * half:]], dim=-1)


def randomize(layer):
    """Non-trivial parameters (the paper's init has γ ~ 0.02 and zero biases, which would hide mistakes)."""
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn_like(p) * (0.5 if p.dim() > 1 else 1.0))
    return layer


def layer_ref(layer, x):
    """The layer formula of subq/nn/flash.py, spelled out with the float64 quadratic references."""
    seqlen = x.shape[1]
    h = layer.norm(x)
    u, v, z = F.silu(h @ layer.proj_in.weight.T + layer.proj_in.bias).split([layer.e, layer.e, layer.s], -1)
    pos = torch.arange(seqlen)
    heads = [rope_complex(z * g + b, pos) if layer.rope else z * g + b
             for g, b in zip(layer.heads.gamma, layer.heads.beta, strict=True)]
    if isinstance(layer, GAU):
        bias = None
        if layer.rel_bias is not None:
            bias = layer.rel_bias[layer.max_len - seqlen: layer.max_len + seqlen - 1]
        out = gau_attention_ref(*heads, v, u, bias, causal=layer.causal, scale=layer.scale)
    else:
        out = flash_quadratic_ref(*heads, v, u, layer.rel_bias, chunk_size=layer.chunk_size, causal=layer.causal,
                                  lin_scale=layer.lin_scale)
    return x + out @ layer.proj_out.weight.T + layer.proj_out.bias


LAYERS = [
    ("gau", dict(causal=False, norm="layernorm")),
    ("gau", dict(causal=True, norm="scalenorm", max_len=200)),
    ("gau", dict(causal=True, rope=False)),
    ("flash", dict(causal=False, norm="scalenorm")),
    ("flash", dict(causal=True, norm="layernorm")),
    ("flash", dict(causal=True, rel_pos_bias=False, rope=False, lin_scale=0.01)),
]


def make_layer(kind, opts, d_model=16, device="cpu", dtype=torch.float64):
    if kind == "gau":
        return GAU(d_model, s=8, **opts, device=device, dtype=dtype)
    return FLASH(d_model, chunk_size=64, s=8, **opts, device=device, dtype=dtype)


@pytest.mark.parametrize("kind,opts", LAYERS, ids=[f"{k}-" + "-".join(f"{a}={b}" for a, b in o.items())
                                                   for k, o in LAYERS])
def test_layer_matches_formula(kind, opts):
    layer = randomize(make_layer(kind, opts))
    x = torch.randn(2, 150, 16, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    y_ref = layer_ref(layer, x)
    assert y.shape == x.shape
    assert max_err(y, y_ref) < 1e-10 * max(1.0, y_ref.abs().max().item())
    params = [x, *layer.parameters()]
    dy = torch.randn_like(y)
    grads = torch.autograd.grad((y * dy).sum(), params)
    grads_ref = torch.autograd.grad((y_ref * dy).sum(), params)
    for g, g_ref in zip(grads, grads_ref, strict=True):
        assert max_err(g, g_ref) < 1e-9 * max(1.0, g_ref.abs().max().item())


@pytest.mark.parametrize("kind", ["gau", "flash"])
def test_layer_causal(kind):
    layer = randomize(make_layer(kind, dict(causal=True)))
    x = torch.randn(1, 150, 16, dtype=torch.float64)
    moved = x.clone()
    moved[:, 90] += 1.0
    # the default lin_scale 1/L depends only on the length, which the perturbation keeps
    y, y2 = layer(x), layer(moved)
    assert torch.equal(y[:, :90], y2[:, :90]) and not torch.equal(y[:, 90:], y2[:, 90:])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("lin_scale", [None, 0.05])
def test_flash_decode_equals_forward(lin_scale, device):
    """Token-by-token step() equals the forward on all max_seqlen tokens, across two chunk boundaries."""
    layer = randomize(FLASH(16, chunk_size=64, s=8, causal=True, lin_scale=lin_scale, device=device,
                            dtype=torch.float64))
    seqlen = 140
    x = torch.randn(2, seqlen, 16, dtype=torch.float64, device=device)
    y = layer(x)
    cache = layer.allocate_inference_cache(2, max_seqlen=seqlen)
    with torch.no_grad():
        steps = torch.cat([layer.step(x[:, t:t + 1], cache) for t in range(seqlen)], dim=1)
    assert max_err(steps, y) < 1e-10 * max(1.0, y.abs().max().item())


def test_flash_decode_float32():
    layer = FLASH(32, chunk_size=64, s=16, causal=True)
    x = torch.randn(1, 70, 32)
    with torch.no_grad():
        y = layer(x)
        cache = layer.allocate_inference_cache(1, max_seqlen=70)
        steps = torch.cat([layer.step(x[:, t:t + 1], cache) for t in range(70)], dim=1)
    assert steps.dtype == torch.float32 and max_err(steps, y) < 1e-4


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("opts", [dict(), dict(max_len=200), dict(scale=0.05, norm="scalenorm", rope=False)],
                         ids=["plain", "rel_bias", "fixed_scale"])
def test_gau_decode_equals_forward(opts, device):
    """GAU.step from the key/value cache equals the causal forward on all max_seqlen tokens."""
    layer = randomize(GAU(16, s=8, causal=True, **opts, device=device, dtype=torch.float64))
    seqlen = 90
    x = torch.randn(2, seqlen, 16, dtype=torch.float64, device=device)
    y = layer(x)
    cache = layer.allocate_inference_cache(2, max_seqlen=seqlen)
    with torch.no_grad():
        steps = torch.cat([layer.step(x[:, t:t + 1], cache) for t in range(seqlen)], dim=1)
    assert cache.position == seqlen
    assert max_err(steps, y) < 1e-10 * max(1.0, y.abs().max().item())


@pytest.mark.parametrize("kind", ["gau", "flash"])
@pytest.mark.parametrize("prefill", [1, 64, 65, 100, 140])
def test_prefill_then_step(kind, prefill):
    """forward(x[:, :P], cache) then step() for the rest equals the forward on all max_seqlen tokens: the prefill
    leaves the cache as stepping would, also when P ends a chunk (64) or opens one (65)."""
    opts = dict(causal=True, max_len=160) if kind == "gau" else dict(causal=True)
    layer = randomize(make_layer(kind, opts))
    seqlen = 140
    x = torch.randn(2, seqlen, 16, dtype=torch.float64)
    y = layer(x)
    cache = layer.allocate_inference_cache(2, max_seqlen=seqlen)
    with torch.no_grad():
        outs = [layer(x[:, :prefill], cache=cache)]
        outs += [layer.step(x[:, t:t + 1], cache) for t in range(prefill, seqlen)]
    assert max_err(torch.cat(outs, dim=1), y) < 1e-10 * max(1.0, y.abs().max().item())


def test_gau_decode_float32():
    layer = GAU(32, s=16, causal=True, max_len=64)
    x = torch.randn(1, 40, 32)
    with torch.no_grad():
        cache = layer.allocate_inference_cache(1, max_seqlen=40)
        steps = torch.cat([layer(x[:, :10], cache=cache)] + [layer.step(x[:, t:t + 1], cache) for t in range(10, 40)],
                          dim=1)
        y = layer(x)
    assert steps.dtype == torch.float32 and cache.keys.dtype == torch.float32 and max_err(steps, y) < 1e-4


def test_rotary_embedding_is_relative():
    """rope(q, m)·rope(k, n) depends on m - n only; odd feature counts keep the last feature."""
    q, k = torch.randn(1, 10, 7, dtype=torch.float64), torch.randn(1, 10, 7, dtype=torch.float64)
    pos = torch.arange(10)
    dots = rotary_embedding(q, pos) @ rotary_embedding(k, pos).transpose(-1, -2)
    shifted = rotary_embedding(q, pos + 37) @ rotary_embedding(k, pos + 37).transpose(-1, -2)
    assert max_err(dots, shifted) < 1e-9
    assert max_err(rotary_embedding(q, pos), rope_complex(q, pos)) < 1e-12
    assert torch.equal(rotary_embedding(q, pos)[..., -1], q[..., -1])


def test_scalenorm():
    norm = ScaleNorm(64)
    x = torch.randn(3, 5, 64)
    assert torch.allclose(norm(x).norm(dim=-1), torch.full((3, 5), 8.0))
    assert torch.equal(norm(torch.zeros(2, 64)), torch.zeros(2, 64))


def test_paper_init_and_training_step():
    """The paper's init (γ ~ N(0, 0.02²), β = 0, zero bias) trains: one SGD step lowers a toy loss."""
    torch.manual_seed(0)
    layer = FLASH(32, chunk_size=64, s=16, causal=True)
    assert layer.heads.gamma.std() < 0.05 and not layer.heads.beta.any() and not layer.rel_bias.any()
    x, target = torch.randn(2, 100, 32), torch.randn(2, 100, 32)
    opt = torch.optim.SGD(layer.parameters(), lr=0.05)
    losses = []
    for _ in range(2):
        loss = F.mse_loss(layer(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[1] < losses[0]


def test_low_precision_layer():
    layer = FLASH(32, chunk_size=64, s=16, causal=True, dtype=torch.bfloat16)
    x = torch.randn(2, 100, 32, dtype=torch.bfloat16, requires_grad=True)
    y = layer(x)
    y.float().sum().backward()
    assert y.dtype == torch.bfloat16 and torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters())


def test_compile_layer():
    layer = FLASH(16, chunk_size=64, s=8, causal=True)
    x = torch.randn(1, 80, 16)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    assert torch.allclose(compiled(x), layer(x), atol=1e-6)


def test_bad_arguments():
    with pytest.raises(ValueError, match="chunk_size must be one of"):
        FLASH(16, chunk_size=100)
    with pytest.raises(ValueError, match="chunk_size must be one of .*, got 64.0 \\(float\\)"):
        FLASH(16, chunk_size=64.0)
    assert FLASH(16, chunk_size=np.int64(64)).chunk_size == 64  # numpy integers are integers
    with pytest.raises(ValueError, match="max_len must be a positive int, got 0"):
        GAU(16, max_len=0)
    with pytest.raises(ValueError, match="norm must be one of"):
        GAU(16, norm="rms")
    with pytest.raises(ValueError, match="expansion must be a positive int"):
        GAU(16, expansion=0)
    with pytest.raises(ValueError, match="x must be \\(batch, seqlen, d_model=16\\)"):
        GAU(16, s=8)(torch.randn(2, 5, 15))
    with pytest.raises(ValueError, match="exceeds max_len"):
        GAU(16, s=8, max_len=10)(torch.randn(1, 11, 16))
    with pytest.raises(ValueError, match="decoding needs a causal FLASH layer"):
        FLASH(16, chunk_size=64, s=8).allocate_inference_cache(1, 10)
    layer = FLASH(16, chunk_size=64, s=8, causal=True)
    with pytest.raises(ValueError, match="step takes one token"):
        layer.step(torch.randn(1, 2, 16), layer.allocate_inference_cache(1, 10))
    with pytest.raises(ValueError, match="x has batch size 2, but the cache was allocated for 1"):
        layer(torch.randn(2, 5, 16), cache=layer.allocate_inference_cache(1, 10))


def test_bad_decoding_arguments():
    with pytest.raises(ValueError, match="decoding needs a causal GAU"):
        GAU(16, s=8).allocate_inference_cache(1, 10)
    gau = GAU(16, s=8, causal=True, max_len=8)
    with pytest.raises(ValueError, match="max_seqlen \\(9\\) exceeds max_len \\(8\\)"):
        gau.allocate_inference_cache(1, 9)
    cache = gau.allocate_inference_cache(1, 4)
    with pytest.raises(ValueError, match="the cache holds 4 positions, x has 5"):
        gau(torch.randn(1, 5, 16), cache=cache)
    with torch.no_grad():
        gau(torch.randn(1, 3, 16), cache=cache)
        with pytest.raises(ValueError, match="a prefill \\(forward with a cache\\) needs an empty cache"):
            gau(torch.randn(1, 1, 16), cache=cache)
        gau.step(torch.randn(1, 1, 16), cache)
        with pytest.raises(ValueError, match="the cache is full: it holds 4 positions"):
            gau.step(torch.randn(1, 1, 16), cache)
    flash = FLASH(16, chunk_size=64, s=8, causal=True)
    with pytest.raises(TypeError, match="cache must come from allocate_inference_cache, got FlashInferenceCache"):
        gau.step(torch.randn(1, 1, 16), flash.allocate_inference_cache(1, 4))
    flash_cache = flash.allocate_inference_cache(1, 4)
    with torch.no_grad():
        flash.step(torch.randn(1, 1, 16), flash_cache)
    with pytest.raises(ValueError, match="needs an empty cache, but it holds 1 tokens"):
        flash(torch.randn(1, 2, 16), cache=flash_cache)
