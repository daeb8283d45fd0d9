"""subq.nn.HyenaFilter, M2SequenceMixer and M2DimensionMixer against plain PyTorch write-ups of the same layers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import DEVICES, max_err
from subq.nn import HyenaFilter, M2DimensionMixer, M2SequenceMixer
from subq.ops import monarch_conv
from subq.reference import monarch_conv_ref

F64 = torch.float64


def mixer_ref(m: M2SequenceMixer, x: torch.Tensor) -> torch.Tensor:
    """The sequence mixer step by step: explicit short conv, gates, Toeplitz long convolutions."""
    seqlen, d = x.shape[1], m.d_model
    z = F.linear(x, m.in_proj.weight, m.in_proj.bias).transpose(1, 2)
    width = m.short_conv.kernel_size[0]
    z = F.conv1d(F.pad(z, (width - 1, 0)), m.short_conv.weight, m.short_conv.bias, groups=3 * d)
    x1, x2, v = z.split(d, dim=1)
    k = m.filter(seqlen)
    k, k_rev = k if m.bidirectional else (k, None)
    y = monarch_conv_ref(v, k, k_rev, pregate=x1, postgate=x2, D=m.D)
    if m.residual_long_conv:
        k = m.residual_filter(seqlen)
        k, k_rev = k if m.bidirectional else (k, None)
        y = y + monarch_conv_ref(x.transpose(1, 2), k, k_rev, D=m.residual_D)
    return F.linear(y.transpose(1, 2), m.out_proj.weight, m.out_proj.bias)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bidirectional", [True, False], ids=["bert", "gpt"])
@pytest.mark.parametrize("residual", [True, False], ids=["residual", "no-residual"])
def test_sequence_mixer_matches_reference(bidirectional, residual, device):
    m = M2SequenceMixer(12, 64, bidirectional=bidirectional, residual_long_conv=residual, device=device, dtype=F64)
    x = torch.randn(3, 37, 12, dtype=F64, device=device, requires_grad=True)
    y = m(x)
    y_ref = mixer_ref(m, x)
    assert y.shape == x.shape
    assert max_err(y, y_ref) < 1e-10 * max(1.0, y_ref.abs().max().item())
    dy = torch.randn_like(y)
    params = [x, *m.parameters()]
    grads = torch.autograd.grad((y * dy).sum(), params)
    grads_ref = torch.autograd.grad((y_ref * dy).sum(), params)
    for g, g_ref in zip(grads, grads_ref, strict=True):
        assert max_err(g, g_ref) < 1e-9 * max(1.0, g_ref.abs().max().item())


@pytest.mark.parametrize("bidirectional", [False, True], ids=["gpt", "bert"])
def test_sequence_mixer_causality(bidirectional):
    """M2-GPT: a change of the input at t moves no output before t (up to float64 FFT round-off), through the
    short conv, the gates and both long convolutions. M2-BERT: it does."""
    m = M2SequenceMixer(8, 128, bidirectional=bidirectional, dtype=F64)
    x = torch.randn(2, 100, 8, dtype=F64)
    y = m(x)
    t = 60
    x2 = x.clone()
    x2[:, t] += 1.0
    y2 = m(x2)
    before = max_err(y2[:, :t], y[:, :t])
    assert max_err(y2[:, t:], y[:, t:]) > 1e-3
    if bidirectional:
        assert before > 1e-3
    else:
        assert before < 1e-12 * y.abs().max().item()


def test_sequence_mixer_autocast_and_compile():
    """Mixed precision as M2 trains: float32 parameters, bfloat16 activations under autocast (the filters stay
    float32); within bf16 accuracy of the float32 layer. And one fullgraph compile."""
    m = M2SequenceMixer(16, 256, bidirectional=True)
    x = torch.randn(2, 200, 16)
    with torch.no_grad():
        y32 = m(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y16 = m(x)
    assert y16.dtype == torch.bfloat16
    assert ((y16.float() - y32).norm() / y32.norm()).item() < 1e-2
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    assert torch.allclose(compiled(x), y32, rtol=1e-4, atol=1e-4)


def test_hyena_filter():
    f = HyenaFilter(6, 512, bidirectional=True, emb_dim=5, order=32)
    k, k_rev = f(300)
    assert k.shape == k_rev.shape == (6, 300) and not torch.allclose(k, k_rev)
    k_full, _ = f(512)
    assert torch.allclose(k_full[:, :300], k)  # the filter at L is a prefix of the filter at max_seq_len
    # exponential decay: the envelope of the fastest-decaying channel shrinks along the sequence
    assert k_full[-1, 400:].abs().max() < k_full[-1, :100].abs().max()
    assert f.fwd.decay_rates.abs()[-1] > f.fwd.decay_rates.abs()[0]
    causal = HyenaFilter(6, 512)
    assert causal(300).shape == (6, 300)
    with pytest.raises(ValueError, match="seqlen must be in 1..max_seq_len=512"):
        causal(513)
    with pytest.raises(ValueError, match="emb_dim must be odd"):
        HyenaFilter(6, 512, emb_dim=4)


def test_hyena_spectrum_for_inference():
    f = HyenaFilter(4, 128, bidirectional=True)
    u = torch.randn(2, 4, 100)
    k, k_rev = f(100)
    y = monarch_conv(u, k.detach(), k_rev=k_rev.detach())
    assert torch.allclose(monarch_conv(u, filter_spectrum=f.spectrum(100)), y, atol=1e-5)


@pytest.mark.parametrize("bidirectional", [True, False], ids=["bert", "gpt"])
def test_sequence_mixer_inference_caches_the_filter_spectrum(bidirectional):
    """Without autograd the mixer convolves with each filter's cached spectrum: the same outputs as the training
    path, recomputed when the length or a parameter (in place, as optimizers update) changes, and only then."""
    m = M2SequenceMixer(8, 128, bidirectional=bidirectional, dtype=F64)
    x = torch.randn(2, 100, 8, dtype=F64)
    with torch.no_grad():
        y = m(x)
        spectrum = m.filter.cached_spectrum(100, F64)
        assert m.filter.cached_spectrum(100, F64) is spectrum
    assert max_err(y, m(x)) < 1e-12
    with torch.no_grad():
        assert max_err(m(x[:, :90]), mixer_ref(m, x[:, :90])) < 1e-10  # another length: its own spectrum
        next(m.filter.parameters()).mul_(1.5)
        assert m.filter.cached_spectrum(100, F64) is not spectrum
        assert max_err(m(x), mixer_ref(m, x)) < 1e-10


@pytest.mark.parametrize("device", DEVICES)
def test_dimension_mixer_is_glu_of_block_diagonal_matrices(device):
    m = M2DimensionMixer(24, expansion=2, nblocks=4, device=device, dtype=F64)
    x = torch.randn(3, 5, 24, dtype=F64, device=device, requires_grad=True)
    w_in = torch.block_diag(*m.in_proj.weight)
    w_out = torch.block_diag(*m.out_proj.weight)
    h = x @ w_in.t()
    ref = (F.gelu(h[..., :48]) * h[..., 48:]) @ w_out.t() + m.out_proj.bias
    y = m(x)
    assert y.shape == x.shape and max_err(y, ref) < 1e-12
    with torch.no_grad():  # the inference path, which multiplies in place
        assert max_err(m(x), ref) < 1e-12
    y.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())
    assert m.in_proj.bias is None and sum(p.numel() for p in m.parameters()) == (24 * 96 + 48 * 24) // 4 + 24


def test_mixer_rejects_bad_input():
    m = M2SequenceMixer(8, 32)
    with pytest.raises(ValueError, match="input must be"):
        m(torch.randn(2, 10, 9))
    with pytest.raises(ValueError, match="seqlen must be in 1..max_seq_len=32"):
        m(torch.randn(1, 33, 8))
    with pytest.raises(ValueError, match="seqlen must be in 1..max_seq_len=32, got 0"):
        m(torch.randn(1, 0, 8))


@pytest.mark.parametrize("residual", [True, False], ids=["residual", "no-residual"])
@pytest.mark.parametrize("width", [2, 4])
def test_sequence_mixer_decoding_equals_forward(residual, width):
    """Causal decoding from M2InferenceCache: a prefill in two chunks, then single tokens (both input layouts),
    reproduce the full forward in float64. The taps the cache holds are the prefix of every shorter filter."""
    m = M2SequenceMixer(8, 64, bidirectional=False, residual_long_conv=residual, short_conv_width=width, dtype=F64)
    x = torch.randn(3, 45, 8, dtype=F64)
    full = m(x)
    cache = m.allocate_inference_cache(3, 50)
    assert max_err(m.filter(45), cache.taps[:, :45]) < 1e-13
    outputs = [m(x[:, :17], cache=cache), m(x[:, 17:30], cache=cache)]
    outputs += [m.step(x[:, t], cache)[:, None] for t in range(30, 38)]
    outputs += [m.step(x[:, t:t + 1], cache) for t in range(38, 45)]
    assert cache.length == 45
    assert max_err(torch.cat(outputs, dim=1), full) < 1e-12 * max(1.0, full.abs().max().item())


def test_sequence_mixer_decoding_rejects_bad_use():
    with pytest.raises(ValueError, match="bidirectional=False"):
        M2SequenceMixer(8, 32, bidirectional=True).allocate_inference_cache(1, 16)
    with pytest.raises(ValueError, match="short_conv_width in 2..4"):
        M2SequenceMixer(8, 32, bidirectional=False, short_conv_width=5).allocate_inference_cache(1, 16)
    m = M2SequenceMixer(8, 32, bidirectional=False)
    with pytest.raises(ValueError, match="max_seqlen must be in 1..max_seq_len=32"):
        m.allocate_inference_cache(1, 33)
    cache = m.allocate_inference_cache(2, 4)
    with pytest.raises(ValueError, match="the cache holds 2 sequences"):
        m(torch.randn(1, 3, 8), cache=cache)
    with pytest.raises(ValueError, match="the cache holds 4 positions; 5 needed"):
        m(torch.randn(2, 5, 8), cache=cache)
    with pytest.raises(ValueError, match="step takes one token"):
        m.step(torch.randn(2, 2, 8), cache)
    with pytest.raises(TypeError, match="allocate_inference_cache"):
        m(torch.randn(2, 1, 8), cache=object())
