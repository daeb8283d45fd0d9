"""subq.ops.monarch_conv against the direct O(L²) convolution (float64) and the torch.fft form."""

from __future__ import annotations

import math

import pytest
import torch

import subq
from conftest import DEVICES, assert_within_budget, launched, max_err, opt_in, poison_cuda_allocator, run_profiled
from subq.ops import monarch_conv, monarch_conv_filter
from subq.ops.monarch_conv import fft_size
from subq.reference import monarch_conv_fft_ref, monarch_conv_ref

OPTIONAL = ("k_rev", "pregate", "postgate", "D")


def make_inputs(batch, nheads, seqlen, filter_len=None, device="cpu", dtype=torch.float64, *, options=(),
                param_dtype=None):
    """Fresh inputs; the filter decays along its length, as a trained long-conv filter does."""
    filter_len = filter_len or seqlen
    param_dtype = param_dtype or dtype
    kw = dict(device=device, dtype=dtype)
    decay = torch.exp(-torch.arange(filter_len, device=device, dtype=torch.float64) / max(1, filter_len / 4))
    filt = lambda: (torch.randn(nheads, filter_len, device=device, dtype=torch.float64) * decay).to(param_dtype)  # noqa: E731
    args = {"u": torch.randn(batch, nheads, seqlen, **kw), "k": filt()}
    if "k_rev" in options:
        args["k_rev"] = filt()
    for gate in ("pregate", "postgate"):
        if gate in options:
            args[gate] = torch.randn(batch, nheads, seqlen, **kw)
    if "D" in options:
        args["D"] = torch.randn(nheads, device=device, dtype=param_dtype)
    return args


def ref_call(args, fn=monarch_conv_ref):
    return fn(args["u"], args["k"], *(args.get(name) for name in OPTIONAL))


# (batch, nheads, seqlen, filter_len, options): odd, prime and power-of-two lengths, short filters, every option
CASES = [
    (1, 1, 1, 1, ()),
    (2, 3, 2, 2, ("k_rev",)),
    (2, 3, 2, 1, ("k_rev", "D")),
    (3, 5, 37, 37, ()),
    (3, 5, 37, 20, ("D",)),
    (2, 7, 64, 64, ("pregate", "postgate")),
    (2, 7, 101, 101, ("pregate", "postgate", "D")),
    (1, 4, 127, 50, ("k_rev",)),
    (3, 5, 97, 97, ("k_rev", "pregate", "postgate", "D")),
    (2, 3, 200, 13, ("k_rev", "pregate", "D")),
    (2, 2, 257, 257, ("k_rev", "postgate")),
]


def case_id(case):
    batch, nheads, seqlen, filter_len, options = case
    return f"B{batch}-H{nheads}-L{seqlen}-Lk{filter_len}-" + ("-".join(options) or "plain")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("algorithm", ["fft", "monarch"])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_forward_and_gradients_match_direct_convolution(case, algorithm, device):
    batch, nheads, seqlen, filter_len, options = case
    args = make_inputs(batch, nheads, seqlen, filter_len, device, options=options)
    leaves = {name: t.requires_grad_() for name, t in args.items()}
    y = monarch_conv(**leaves, algorithm=algorithm)
    y_ref = ref_call(leaves)
    assert y.shape == (batch, nheads, seqlen) and y.dtype == torch.float64
    scale = max(1.0, y_ref.abs().max().item())
    assert max_err(y, y_ref) < 1e-12 * scale

    dy = torch.randn_like(y)
    names = list(leaves)
    grads = torch.autograd.grad((y * dy).sum(), [leaves[n] for n in names])
    grads_ref = torch.autograd.grad((y_ref * dy).sum(), [leaves[n] for n in names])
    for name, g, g_ref in zip(names, grads, grads_ref, strict=True):
        assert g.shape == leaves[name].shape, name
        assert max_err(g, g_ref) < 1e-11 * max(1.0, g_ref.abs().max().item()), name


@pytest.mark.parametrize("options", [(), ("k_rev", "pregate", "postgate", "D")], ids=["causal", "bidir-all"])
def test_fft_reference_matches_direct_reference(options):
    args = make_inputs(2, 3, 61, 40, options=options)
    assert max_err(ref_call(args, monarch_conv_fft_ref), ref_call(args)) < 1e-12


@pytest.mark.parametrize("algorithm", ["fft", "monarch"])
@pytest.mark.parametrize("options", [(), ("k_rev",), ("pregate", "postgate", "D"), ("k_rev", "pregate", "postgate",
                                                                                     "D")])
def test_gradcheck(options, algorithm):
    args = make_inputs(2, 2, 11, 7, options=options)
    names = list(args)

    def fn(*tensors):
        return monarch_conv(**dict(zip(names, tensors, strict=True)), algorithm=algorithm)

    assert torch.autograd.gradcheck(fn, [args[n].requires_grad_() for n in names])


def test_fft_size_rule():
    def smooth(n):
        for p in (2, 3, 5, 7):
            while n % p == 0:
                n //= p
        return n == 1

    for seqlen in list(range(1, 600)) + [1000, 4097, 65537, 2**20, 1_000_003]:
        m = fft_size(seqlen)
        assert m >= 2 * seqlen and m % 2 == 0 and smooth(m), seqlen
        if seqlen < 600:
            assert not any(smooth(n) for n in range(2 * seqlen, m, 2)), seqlen
        if seqlen >= 64:
            assert m <= 2.2 * seqlen, seqlen
    assert fft_size(2**20) == 2**21
    assert fft_size(13) == 28  # 26 = 2 * 13 is not 7-smooth, and the odd 27 is skipped: M/2 must be an integer


def test_fft_size_range():
    """Up to 2^30 the search ends quickly (the widest gap between 7-smooth numbers below it is about 4 million);
    beyond, or below 1, the rule is undefined and every entry point says so instead of hanging or overflowing."""
    assert fft_size(2**30) == 2**31
    assert fft_size(2**30 - 1) == 2**31
    for bad in (0, -10, 2**30 + 1, 2**62):
        with pytest.raises(ValueError, match="seqlen must be an int in \\[1, 1073741824\\]"):
            fft_size(bad)
    for bad in (True, 3.0):
        with pytest.raises(TypeError, match="seqlen must be an int, got"):
            fft_size(bad)
    for bad in (0, 2**30 + 1, 2**63 - 1):
        with pytest.raises(RuntimeError, match="seqlen must be in \\[1, 1073741824\\]"):
            subq._C.monarch_conv_fft_size(bad)
    with pytest.raises(ValueError, match="seqlen must be an int >= k's length"):
        monarch_conv_filter(torch.randn(1, 1), 2**63 - 1)
    with pytest.raises(RuntimeError, match="seqlen \\(9223372036854775807\\) must be at least"):
        torch.ops.subq.monarch_conv_filter(torch.randn(1, 1), None, 2**63 - 1)
    with pytest.raises(RuntimeError, match="seqlen \\(0\\) must be at least"):
        torch.ops.subq.monarch_conv_filter(torch.randn(1, 1), None, 0)


@pytest.mark.parametrize("algorithm", ["fft", "monarch"])
def test_no_heads(algorithm):
    """H = 0 (an empty model slice): empty outputs and gradients, not an FFT library's error on an empty batch."""
    u = torch.randn(2, 0, 5, requires_grad=True)
    k = torch.randn(0, 4, requires_grad=True)
    y = monarch_conv(u, k, algorithm=algorithm)
    assert y.shape == (2, 0, 5)
    du, dk = torch.autograd.grad(y, (u, k), torch.randn_like(y))
    assert du.shape == u.shape and dk.shape == k.shape
    assert monarch_conv_filter(k.detach(), 5).shape == (0, fft_size(5) // 2 + 1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("algorithm", ["fft", "monarch"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["causal", "bidir"])
def test_causality(device, bidirectional, algorithm):
    """Perturb u, pregate or postgate at t: the causal op moves nothing before t (beyond FFT round-off of the
    float64 transforms); the bidirectional one does, through k_rev."""
    options = ("pregate", "postgate", "D") + (("k_rev",) if bidirectional else ())
    args = make_inputs(2, 3, 150, 150, device, options=options)
    y = monarch_conv(**args, algorithm=algorithm)
    t = 77
    for name in ("u", "pregate", "postgate"):
        moved = {k: v.clone() for k, v in args.items()}
        moved[name][:, :, t] += 10.0
        y2 = monarch_conv(**moved, algorithm=algorithm)
        before = max_err(y2[..., :t], y[..., :t])
        assert max_err(y2[..., t:], y[..., t:]) > 1e-3, name
        if bidirectional and name != "postgate":
            assert before > 1e-3, name
        else:
            assert before < 1e-12 * y.abs().max().item(), (name, before)


def test_causal_prefix_independent_of_length():
    """A causal output at t depends only on the first t + 1 inputs: truncating the sequence (which also changes the
    FFT size) gives the same prefix."""
    args = make_inputs(2, 3, 300, 40, options=("pregate", "postgate", "D"))
    y = monarch_conv(**args)
    cut = {k: (v[..., :123] if v.dim() == 3 else v) for k, v in args.items()}
    assert max_err(monarch_conv(**cut), y[..., :123]) < 1e-12


@pytest.mark.parametrize("device", DEVICES)
def test_short_filter_equals_zero_extended(device):
    args = make_inputs(2, 3, 90, 31, device, options=("k_rev", "D"))
    full = dict(args, k=torch.nn.functional.pad(args["k"], (0, 59)), k_rev=torch.nn.functional.pad(args["k_rev"],
                                                                                                   (0, 59)))
    assert max_err(monarch_conv(**args), monarch_conv(**full)) < 1e-12


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("algorithm", ["fft", "monarch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("param_dtype", ["float32", "input"])
def test_low_precision_within_error_budget(device, dtype, param_dtype, algorithm):
    options = ("k_rev", "pregate", "postgate", "D")
    pdt = torch.float32 if param_dtype == "float32" else dtype
    args = make_inputs(3, 5, 300, 300, device, dtype, options=options, param_dtype=pdt)
    leaves = {k: v.requires_grad_() for k, v in args.items()}
    y = monarch_conv(**leaves, algorithm=algorithm)
    args64 = {k: v.detach().double().requires_grad_() for k, v in args.items()}
    y_ref = ref_call(args64)
    y_plain = ref_call(leaves, monarch_conv_fft_ref)
    assert y.dtype == dtype
    assert_within_budget(y, y_ref, y_plain, f"y {dtype}")

    dy = torch.randn_like(y_ref)
    names = list(leaves)
    grads = torch.autograd.grad(y, [leaves[n] for n in names], dy.to(dtype))
    grads_ref = torch.autograd.grad(y_ref, [args64[n] for n in names], dy)
    grads_plain = torch.autograd.grad(y_plain, [leaves[n] for n in names], dy.to(dtype))
    for name, g, g_ref, g_plain in zip(names, grads, grads_ref, grads_plain, strict=True):
        assert g.dtype == leaves[name].dtype, name
        assert_within_budget(g, g_ref, g_plain, f"d{name} {dtype}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("algorithm", ["fft", "monarch"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["causal", "bidir"])
def test_precomputed_spectrum(device, bidirectional, algorithm):
    """The spectrum (made by the device's default transform) serves either algorithm: the same bin order."""
    options = ("pregate", "postgate", "D") + (("k_rev",) if bidirectional else ())
    args = make_inputs(2, 3, 100, 60, device, torch.float32, options=options)
    k, k_rev = args["k"].requires_grad_(), args.pop("k_rev", None)
    spec = monarch_conv_filter(k, 100, k_rev=k_rev)
    assert spec.shape == (3, fft_size(100) // 2 + 1) and spec.dtype == torch.complex64
    assert not spec.requires_grad  # inference only: no gradient to the filter through a spectrum
    direct = {**args, "k_rev": k_rev}
    u = args["u"].requires_grad_()
    y = monarch_conv(**{**args, "k": None}, filter_spectrum=spec, algorithm=algorithm)
    y_direct = monarch_conv(**direct)
    assert max_err(y, y_direct) < 1e-5
    # gradients of u, the gates and D still flow
    (du,) = torch.autograd.grad(y.sum(), [u])
    (du_direct,) = torch.autograd.grad(y_direct.sum(), [u])
    assert max_err(du, du_direct) < 1e-4
    # the same spectrum serves every length with the same FFT size
    seqlen = 99
    assert fft_size(seqlen) == fft_size(100)
    cut = {k: (v[..., :seqlen] if v is not None and v.dim() == 3 else v) for k, v in direct.items()}
    y_cut = monarch_conv(**{**cut, "k": None, "k_rev": None}, filter_spectrum=spec, algorithm=algorithm)
    assert max_err(y_cut, monarch_conv(**cut)) < 1e-5


def test_float64_spectrum():
    args = make_inputs(1, 2, 30, 30, options=("k_rev",))
    spec = monarch_conv_filter(args["k"], 30, k_rev=args["k_rev"])
    assert spec.dtype == torch.complex128
    assert max_err(monarch_conv(args["u"], filter_spectrum=spec), ref_call(args)) < 1e-12


def test_spectrum_serves_every_length_with_its_fft_size():
    """Made at L and used at any L' with the same FFT size, longer or shorter: the bidirectional spectrum once
    dropped k_rev[L-1], which L never reaches but a longer L' does (an error of up to 25% of the output)."""
    torch.manual_seed(0)
    pairs = 0
    for made_at in range(1, 41):
        k, k_rev = torch.randn(2, made_at, dtype=torch.float64), torch.randn(2, made_at, dtype=torch.float64)
        spec = monarch_conv_filter(k, made_at, k_rev=k_rev)
        for used_at in range(1, 81):
            if fft_size(used_at) != fft_size(made_at) or used_at == made_at:
                continue
            u = torch.randn(1, 2, used_at, dtype=torch.float64)
            taps = min(made_at, used_at)  # a filter longer than the sequence: its far taps are never reached
            want = monarch_conv(u, k[:, :taps], k_rev=k_rev[:, :taps])
            assert max_err(monarch_conv(u, filter_spectrum=spec), want) < 1e-12, (made_at, used_at)
            pairs += 1
    assert pairs > 30


@pytest.mark.parametrize("bidirectional", [False, True], ids=["causal", "bidir"])
def test_million_length(bidirectional):
    """L = 2^20 and the prime 1_000_003 (M = 2_000_376 = 2^3·3^6·7^3) against torch.fft in float64, forward and
    gradient."""
    for seqlen in (2**20, 1_000_003):
        args = make_inputs(1, 1, seqlen, 4096, options=("D", "pregate") + (("k_rev",) if bidirectional else ()))
        leaves = {k: v.requires_grad_() for k, v in args.items()}
        y = monarch_conv(**leaves)
        y_ref = ref_call(leaves, monarch_conv_fft_ref)
        assert max_err(y, y_ref) < 1e-10
        g = torch.autograd.grad(y[..., ::997].sum(), [leaves["k"], leaves["u"]])
        g_ref = torch.autograd.grad(y_ref[..., ::997].sum(), [leaves["k"], leaves["u"]])
        assert all(max_err(a, b) < 1e-9 for a, b in zip(g, g_ref, strict=True))


@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch(device):
    args = make_inputs(0, 3, 20, 20, device, options=("k_rev", "pregate", "postgate", "D"))
    leaves = {k: v.requires_grad_() for k, v in args.items()}
    y = monarch_conv(**leaves)
    assert y.shape == (0, 3, 20)
    y.sum().backward()
    assert all(torch.equal(t.grad, torch.zeros_like(t)) for t in leaves.values())


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_inputs(device):
    args = make_inputs(2, 4, 50, 50, device, options=("k_rev", "pregate", "postgate", "D"))
    strided = dict(args)
    strided["u"] = args["u"].transpose(1, 2).contiguous().transpose(1, 2)
    strided["pregate"] = torch.randn(2, 4, 100, dtype=torch.float64, device=device)[..., ::2]
    strided["k"] = args["k"].t().contiguous().t()
    assert not strided["u"].is_contiguous() and not strided["pregate"].is_contiguous()
    contiguous = {k: v.contiguous() for k, v in strided.items()}
    assert max_err(monarch_conv(**strided), monarch_conv(**contiguous)) < 1e-13


def test_nan_propagates_within_its_row():
    """The documented policy: a NaN in one (b, h) row reaches every output of that row and nothing else."""
    args = make_inputs(2, 3, 40, 40, options=("k_rev",))
    args["u"][1, 2, 5] = math.nan
    y = monarch_conv(**args)
    assert y[1, 2].isnan().all()
    y[1, 2] = 0
    assert not y.isnan().any()


def test_opcheck():
    args = make_inputs(2, 3, 21, 13, options=("k_rev", "pregate", "postgate", "D"))
    order = [args[k] for k in ("u", "k", "k_rev")] + [None] + [args[k] for k in ("pregate", "postgate", "D")]
    for t in order:
        if t is not None:
            t.requires_grad_()
    torch.library.opcheck(torch.ops.subq.monarch_conv_fwd.default, tuple(order))
    torch.library.opcheck(torch.ops.subq.monarch_conv_fwd.default, (*order, "monarch"))
    detached = tuple(t.detach() if t is not None else None for t in order)
    torch.library.opcheck(torch.ops.subq.monarch_conv_bwd.default, (torch.randn_like(args["u"]), *detached))
    torch.library.opcheck(torch.ops.subq.monarch_conv_bwd.default, (torch.randn_like(args["u"]), *detached,
                                                                    "monarch"))
    torch.library.opcheck(torch.ops.subq.monarch_conv_filter.default, (args["k"].detach(), args["k_rev"].detach(),
                                                                       21))
    spec = monarch_conv_filter(args["k"], 21, k_rev=args["k_rev"])
    u = args["u"].detach().requires_grad_()
    torch.library.opcheck(torch.ops.subq.monarch_conv_fwd.default, (u, None, None, spec, None, None, None))


@pytest.mark.parametrize("bidirectional", [False, True], ids=["causal", "bidir"])
def test_torch_compile_fullgraph(bidirectional):
    options = ("pregate", "postgate", "D") + (("k_rev",) if bidirectional else ())
    args = make_inputs(2, 3, 45, 30, "cpu", torch.float32, options=options)
    leaves = {k: v.requires_grad_() for k, v in args.items()}

    def fn(**kw):
        spec = monarch_conv_filter(kw["k"], 45, k_rev=kw.get("k_rev"))
        inference = monarch_conv(kw["u"], filter_spectrum=spec, algorithm="monarch")
        return monarch_conv(**kw).square().sum() + inference.sum()

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    out, out_ref = compiled(**leaves), fn(**leaves)
    assert torch.allclose(out, out_ref)
    g = torch.autograd.grad(out, list(leaves.values()))
    g_ref = torch.autograd.grad(out_ref, list(leaves.values()))
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-5) for a, b in zip(g, g_ref, strict=True))


def _spec(args, seqlen=70):
    return monarch_conv_filter(args["k"], seqlen)


BAD = [
    ("u 2-D", lambda a: a.update(u=a["u"][0]), ValueError, "u must be 3-D"),
    ("u int", lambda a: a.update(u=a["u"].long()), ValueError, "u must have a floating-point dtype"),
    ("u empty seq", lambda a: a.update(u=a["u"][..., :0], pregate=None, postgate=None), ValueError,
     "seqlen .* must be in \\[1, 1073741824\\]"),
    ("not a tensor", lambda a: a.update(k=1.0), TypeError, "k must be a torch.Tensor"),
    ("k heads", lambda a: a.update(k=a["k"][:2]), ValueError, "k must have shape"),
    ("k too long", lambda a: a.update(k=torch.randn(3, 71, dtype=torch.float64)), ValueError, "filter_len <= seqlen"),
    ("k 3-D", lambda a: a.update(k=a["k"][None]), ValueError, "k must be 2-D"),
    ("k dtype", lambda a: a.update(k=a["k"].half()), ValueError, "k.dtype must be u's dtype or float32"),
    ("k_rev shape", lambda a: a.update(k_rev=a["k_rev"][:, :5]), ValueError, "k_rev must have k's shape"),
    ("k_rev dtype", lambda a: a.update(k_rev=a["k_rev"].float()), ValueError, "k_rev.dtype .* must match k.dtype"),
    ("pregate shape", lambda a: a.update(pregate=a["pregate"][:1]), ValueError, "pregate must have u's shape"),
    ("postgate dtype", lambda a: a.update(postgate=a["postgate"].float()), ValueError,
     "postgate.dtype .* must match u.dtype"),
    ("D shape", lambda a: a.update(D=torch.randn(4, dtype=torch.float64)), ValueError, "D must have shape"),
    ("D dtype", lambda a: a.update(D=a["D"].half()), ValueError, "D.dtype must be"),
    ("no filter", lambda a: a.update(k=None), ValueError, "exactly one of k and filter_spectrum"),
    ("both filters", lambda a: a.update(filter_spectrum=_spec(a)), ValueError, "exactly one of k and filter_spectrum"),
    ("spectrum with k_rev", lambda a: a.update(filter_spectrum=_spec(a), k=None), ValueError,
     "k_rev is part of a precomputed"),
    ("spectrum size", lambda a: a.update(filter_spectrum=_spec(a, 200), k=None, k_rev=None), ValueError,
     "made for another FFT size"),
    ("spectrum dtype", lambda a: a.update(filter_spectrum=_spec(a).to(torch.complex64), k=None, k_rev=None),
     ValueError, "filter_spectrum.dtype must be torch.complex128"),
    ("spectrum real", lambda a: a.update(filter_spectrum=torch.randn(3, 71), k=None, k_rev=None), ValueError,
     "filter_spectrum.dtype must be"),
    ("algorithm", lambda a: a.update(algorithm="cufft"), ValueError,
     "algorithm must be one of 'auto', 'fft', 'monarch', got 'cufft'"),
]


@pytest.mark.parametrize("name,mutate,exc,match", BAD, ids=[b[0] for b in BAD])
def test_bad_inputs(name, mutate, exc, match):
    args = make_inputs(2, 3, 70, 70, options=("k_rev", "pregate", "postgate", "D"))
    mutate(args)
    with pytest.raises(exc, match=match):
        monarch_conv(**args)


def test_bad_filter_inputs():
    k = torch.randn(3, 20)
    with pytest.raises(ValueError, match="seqlen must be an int >= k's length"):
        monarch_conv_filter(k, 10)
    with pytest.raises(ValueError, match="k_rev must have k's shape"):
        monarch_conv_filter(k, 20, k_rev=k[:, :3])
    with pytest.raises(RuntimeError, match="pass exactly one of k and filter_spectrum"):
        torch.ops.subq.monarch_conv_fwd(torch.randn(1, 3, 20), None, None, None, None, None, None)
    with pytest.raises(RuntimeError, match="k's length .* must be at most"):
        torch.ops.subq.monarch_conv_fwd(torch.randn(1, 3, 10), k, None, None, None, None, None)
    with pytest.raises(RuntimeError, match="algorithm must be 'auto', 'fft' or 'monarch', got 'Monarch'"):
        torch.ops.subq.monarch_conv_fwd(torch.randn(1, 3, 20), k, None, None, None, None, None, "Monarch")


@pytest.mark.parametrize("device", DEVICES)
def test_auto_algorithm(device):
    """"auto" is ATen's FFT on CPU and the Monarch DFT on CUDA (no cuFFT there, issue 4): bit for bit the same as
    naming it."""
    args = make_inputs(2, 3, 64, 64, device, torch.float32, options=("k_rev", "D"))
    expected = monarch_conv(**args, algorithm="monarch" if device == "cuda" else "fft")
    assert torch.equal(monarch_conv(**args), expected)
    assert torch.equal(monarch_conv(**args, algorithm="auto"), expected)


@pytest.mark.gpu
def test_device_mismatch():
    args = make_inputs(1, 3, 40, 40, options=("D",))
    args["k"] = args["k"].cuda()
    with pytest.raises(ValueError, match="k is on cuda"):
        monarch_conv(**args)


# ---- the fused CUDA forward (opt-in until verified on a GPU) ---------------------------------------------------------


def _run_fused(fn, kernel="monarch_conv_fused"):
    """fn's result, and whether a kernel whose name contains `kernel` ran in it."""
    out, names = run_profiled(fn)
    return out, launched(names, kernel)


def _ref_fn(seqlen):
    """The float64 reference: direct for short rows, torch.fft (exact to float64 round-off) where the (H, L, L)
    Toeplitz matrix would be large."""
    return monarch_conv_ref if seqlen <= 128 else monarch_conv_fft_ref


def _ref64(args):
    args64 = {k: v.double() for k, v in args.items()}
    return ref_call(args64, _ref_fn(args["u"].shape[-1]))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("seqlen", [2, 3, 100, 256, 1000, 2048, 4097, 8192])
@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gates-D"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["causal", "bidir"])
def test_fused_cuda_forward(bidirectional, gated, seqlen, dtype, monkeypatch):
    """1, 2 and 3 Monarch stages (M = 4 ... 16384), prime and odd lengths; enough rows that the low-precision
    budget rests on many roundings. Stages on CUDA cores only (odd factors), on tensor cores only (256 = 16 16,
    8192 = 16 16 32), and both (2048 = 8 16 16)."""
    opt_in(monkeypatch, "monarch_conv")
    options = (("k_rev",) if bidirectional else ()) + (("pregate", "postgate", "D") if gated else ())
    args = make_inputs(4, 16, seqlen, seqlen, "cuda", dtype, options=options, param_dtype=torch.float32)
    poison_cuda_allocator()
    y, ran = _run_fused(lambda: monarch_conv(**args))
    assert ran, "the fused kernel did not run"
    assert y.dtype == dtype
    assert_within_budget(y, _ref64(args), ref_call(args, monarch_conv_fft_ref), f"y {dtype}")


@pytest.mark.gpu
def test_fused_cuda_forward_spectrum_and_fallback(monkeypatch):
    """A precomputed spectrum feeds the kernel; a size beyond the kernel's shared memory (M/2 > 16384) and
    algorithm="fft" take the composite."""
    opt_in(monkeypatch, "monarch_conv")
    args = make_inputs(2, 8, 1000, 300, "cuda", torch.float32, options=("k_rev", "pregate", "postgate", "D"))
    y_ref, y_plain = _ref64(args), ref_call(args, monarch_conv_fft_ref)
    spec = monarch_conv_filter(args["k"], 1000, k_rev=args["k_rev"])
    inference = {k: v for k, v in args.items() if k not in ("k", "k_rev")}
    y_spec, ran = _run_fused(lambda: monarch_conv(**inference, filter_spectrum=spec))
    assert ran
    assert_within_budget(y_spec, y_ref, y_plain, "y from a precomputed spectrum")

    _, ran = _run_fused(lambda: monarch_conv(**args, algorithm="fft"))
    assert not ran
    long = make_inputs(1, 2, 20000, 100, "cuda", torch.float32, options=("D",))
    assert fft_size(20000) // 2 > 16384
    y_long, ran = _run_fused(lambda: monarch_conv(**long))
    assert not ran
    assert_within_budget(y_long, _ref64(long), ref_call(long, monarch_conv_fft_ref), "y beyond the kernel")


def _fused_grads_within_budget(args, dy, spectrum=None):
    """The gradients of every leaf of args through monarch_conv for the output gradient dy (float64; the fused
    backward, checked to have run, on a NaN-poisoned allocator), each within the error budget against float64
    autograd through the reference; with spectrum, the op gets it in place of k and k_rev (which then get no
    gradient). Returns the gradients."""
    dtype = args["u"].dtype
    names = [n for n in args if spectrum is None or n not in ("k", "k_rev")]
    leaves = {n: args[n].detach().clone().requires_grad_(n in names) for n in args}
    op_args = {n: t for n, t in leaves.items() if n in names}
    y = monarch_conv(**op_args, filter_spectrum=spectrum) if spectrum is not None else monarch_conv(**op_args)
    poison_cuda_allocator()
    grads, ran = _run_fused(lambda: torch.autograd.grad(y, [leaves[n] for n in names], dy.to(dtype)),
                            "monarch_conv_fused_bwd")
    assert ran, "the fused backward did not run"

    args64 = {n: t.detach().double().requires_grad_() for n, t in args.items()}
    grads_ref = torch.autograd.grad(ref_call(args64, _ref_fn(y.shape[-1])), [args64[n] for n in names], dy)
    plain = {n: t.detach().requires_grad_() for n, t in args.items()}
    grads_plain = torch.autograd.grad(ref_call(plain, monarch_conv_fft_ref), [plain[n] for n in names],
                                      dy.to(dtype))
    for name, g, g_ref, g_plain in zip(names, grads, grads_ref, grads_plain, strict=True):
        assert g.dtype == args[name].dtype and g.shape == args[name].shape, name
        assert_within_budget(g, g_ref, g_plain, f"d{name} {dtype} L={y.shape[-1]}")
    return dict(zip(names, grads, strict=True))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("seqlen", [2, 3, 100, 256, 1000, 2048, 4097])
@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gates-D"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["causal", "bidir"])
def test_fused_cuda_backward(bidirectional, gated, seqlen, dtype, monkeypatch):
    """Every gradient (u, k, k_rev, pregate, postgate, D) of the fused backward: 1, 2 and 3 Monarch stages
    (M = 4 ... 8232), prime and odd lengths, stages on CUDA cores, tensor cores (256) and both (2048), a filter
    shorter than L (one tap at L = 2), float32 parameters."""
    opt_in(monkeypatch, "monarch_conv")
    options = (("k_rev",) if bidirectional else ()) + (("pregate", "postgate", "D") if gated else ())
    filter_len = max(1, 2 * seqlen // 3)
    args = make_inputs(4, 16, seqlen, filter_len, "cuda", dtype, options=options, param_dtype=torch.float32)
    _fused_grads_within_budget(args, torch.randn(4, 16, seqlen, device="cuda", dtype=torch.float64))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fused_cuda_backward_spectrum_params_and_determinism(dtype, monkeypatch):
    """A precomputed spectrum (gradients of u, the gates and D only); filters and D in the input dtype; two runs
    give bit-identical gradients (the batch sums run in a fixed order, no atomics)."""
    opt_in(monkeypatch, "monarch_conv")
    options = ("k_rev", "pregate", "postgate", "D")
    args = make_inputs(3, 8, 700, 500, "cuda", dtype, options=options, param_dtype=dtype)
    dy = torch.randn(3, 8, 700, device="cuda", dtype=torch.float64)
    _fused_grads_within_budget(args, dy, monarch_conv_filter(args["k"], 700, k_rev=args["k_rev"]))
    first = _fused_grads_within_budget(args, dy)
    second = _fused_grads_within_budget(args, dy)
    assert all(torch.equal(first[n], second[n]) for n in first)


@pytest.mark.gpu
def test_fused_cuda_backward_fallback(monkeypatch):
    """algorithm="fft" and a size beyond the kernels' shared memory (M/2 > 16384) take the composite backward."""
    opt_in(monkeypatch, "monarch_conv")

    def backward_ran(args, algorithm):
        leaves = [t.requires_grad_() for t in args.values()]
        y = monarch_conv(**args, algorithm=algorithm)
        _, ran = _run_fused(lambda: torch.autograd.grad(y, leaves, torch.ones_like(y)), "monarch_conv_fused_bwd")
        return ran

    assert not backward_ran(make_inputs(2, 4, 300, 300, "cuda", torch.float32, options=("k_rev", "D")), "fft")
    assert not backward_ran(make_inputs(1, 2, 20000, 100, "cuda", torch.float32, options=("D",)), "auto")
