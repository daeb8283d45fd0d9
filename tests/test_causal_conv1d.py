"""subq.ops.causal_conv1d and causal_conv1d_update against the plain reference (subq.reference.causal_conv1d)."""

from __future__ import annotations

import pytest
import torch

from conftest import DEVICES, assert_opt_in, assert_within_budget, max_err, poison_cuda_allocator
from subq.ops import causal_conv1d, causal_conv1d_update
from subq.reference import causal_conv1d_ref, causal_conv1d_update_ref

WIDTHS = [2, 3, 4]
SEQLENS = [1, 2, 7, 64, 257]
LAYOUTS = ["contiguous", "channels_last", "strided"]
LOW_PRECISION = [torch.float32, torch.bfloat16, torch.float16]
# Which optional arguments a case uses: bias, activation, seq_idx, initial_states, return_final_states.
VARIANTS = {
    "plain": {},
    "bias_silu": {"bias": True, "activation": "silu"},
    "states": {"bias": True, "initial_states": True, "return_final_states": True, "activation": "swish"},
    "final_only": {"return_final_states": True},
    "seq_idx": {"bias": True, "seq_idx": True, "activation": "silu"},
}


def make_x(batch, dim, seqlen, layout, dtype=torch.float64, device="cpu"):
    """x (batch, dim, seqlen) in the given memory layout."""
    if layout == "channels_last":  # Mamba's (batch, seqlen, dim) activations, viewed channels-first
        return torch.randn(batch, seqlen, dim, dtype=dtype, device=device).transpose(1, 2)
    if layout == "strided":
        return torch.randn(batch, dim, 2 * seqlen, dtype=dtype, device=device)[..., ::2]
    return torch.randn(batch, dim, seqlen, dtype=dtype, device=device)


def make_seq_idx(batch, seqlen, device="cpu"):
    """Packed sequences: non-decreasing segment ids per row, several boundaries in a row."""
    return torch.randint(0, max(1, seqlen // 5), (batch, seqlen), device=device).sort(dim=1).values.int()


def make_case(batch, dim, seqlen, width, variant, layout="contiguous", dtype=torch.float64, wdtype=None,
              device="cpu"):
    """(tensor args, keyword args) of causal_conv1d; the float tensors require grad."""
    opts = VARIANTS[variant]
    wdtype = wdtype or dtype
    x = make_x(batch, dim, seqlen, layout, dtype, device).requires_grad_()
    weight = (torch.randn(dim, width, device=device) / width**0.5).to(wdtype).requires_grad_()
    bias = torch.randn(dim, device=device).to(wdtype).requires_grad_() if opts.get("bias") else None
    seq_idx = make_seq_idx(batch, seqlen, device) if opts.get("seq_idx") else None
    init = None
    if opts.get("initial_states"):
        init = torch.randn(batch, dim, width - 1, dtype=dtype, device=device).requires_grad_()
    kwargs = {
        "bias": bias,
        "seq_idx": seq_idx,
        "initial_states": init,
        "return_final_states": bool(opts.get("return_final_states")),
        "activation": opts.get("activation"),
    }
    return x, weight, kwargs


def leaves(x, weight, kwargs):
    return [t for t in (x, weight, kwargs["bias"], kwargs["initial_states"]) if t is not None]


def outputs(fn, x, weight, kwargs):
    out = fn(x, weight, **kwargs)
    return list(out) if kwargs["return_final_states"] else [out]


def grads(outs, inputs, cotangents):
    return torch.autograd.grad(outs, inputs, [c.to(o.dtype) for o, c in zip(outs, cotangents, strict=True)])


# ---- forward and every gradient against the reference, float64 ----------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("variant_index", range(len(VARIANTS)))
@pytest.mark.parametrize("seqlen_index", range(len(SEQLENS)))
@pytest.mark.parametrize("width", WIDTHS)
def test_matches_reference(width, seqlen_index, variant_index, device):
    # The layout rotates with the case, so that every (variant, seqlen) pair meets more than one layout across widths.
    seqlen, variant = SEQLENS[seqlen_index], list(VARIANTS)[variant_index]
    layout = LAYOUTS[(width + seqlen_index + variant_index) % len(LAYOUTS)]
    batch, dim = 1 + seqlen % 3, 37  # 37: not a multiple of the CUDA kernels' 32-channel tile
    x, weight, kwargs = make_case(batch, dim, seqlen, width, variant, layout, device=device)
    got = outputs(causal_conv1d, x, weight, kwargs)
    want = outputs(causal_conv1d_ref, x, weight, kwargs)
    assert got[0].shape == (batch, dim, seqlen) and got[0].stride() == x.stride() or layout == "strided"
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape
        assert max_err(g, w) < 1e-12
    cotangents = [torch.randn_like(w) for w in want]  # the final states' gradient too, when they are returned
    inputs = leaves(x, weight, kwargs)
    for name, g, w in zip("x weight bias init".split(), grads(got, inputs, cotangents),
                          grads(want, inputs, cotangents), strict=False):
        assert max_err(g, w) < 1e-11, name


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("width", WIDTHS)
def test_short_sequences_take_final_states_from_initial_states(width, device):
    """seqlen < W-1 (and 0): the final states are the tail of initial_states followed by x."""
    for seqlen in range(width - 1):
        x = torch.randn(2, 5, seqlen, dtype=torch.float64, device=device, requires_grad=True)
        weight = torch.randn(5, width, dtype=torch.float64, device=device, requires_grad=True)
        init = torch.randn(2, 5, width - 1, dtype=torch.float64, device=device, requires_grad=True)
        y, final = causal_conv1d(x, weight, initial_states=init, return_final_states=True)
        assert y.shape == (2, 5, seqlen)
        assert torch.equal(final, torch.cat([init[..., seqlen:], x], dim=-1))
        _, final_ref = causal_conv1d_ref(x, weight, initial_states=init, return_final_states=True)
        dfinal = torch.randn_like(final)
        dx, dweight, dinit = grads([final], [x, weight, init], [dfinal])
        assert torch.equal(dweight, torch.zeros_like(dweight))
        for g, w in zip((dx, dinit), grads([final_ref], [x, init], [dfinal]), strict=True):
            assert max_err(g, w) < 1e-12


@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch_and_channels(device):
    for batch, dim in ((0, 4), (3, 0)):
        x = torch.randn(batch, dim, 9, device=device, requires_grad=True)
        weight = torch.randn(dim, 4, device=device, requires_grad=True)
        bias = torch.randn(dim, device=device, requires_grad=True)
        y, final = causal_conv1d(x, weight, bias, return_final_states=True)
        assert y.shape == (batch, dim, 9) and final.shape == (batch, dim, 3)
        dx, dw, db = torch.autograd.grad(y.sum(), (x, weight, bias))
        assert dx.shape == x.shape and torch.equal(dw, torch.zeros_like(dw)) and torch.equal(db, torch.zeros_like(db))


def test_seq_idx_equals_separate_sequences():
    """Packing sequences with seq_idx gives each one the output it gets alone."""
    lengths = [5, 1, 11, 3]
    dim, width = 6, 4
    x = torch.randn(1, dim, sum(lengths), dtype=torch.float64)
    weight = torch.randn(dim, width, dtype=torch.float64)
    bias = torch.randn(dim, dtype=torch.float64)
    seq_idx = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths)).int()[None]
    y = causal_conv1d(x, weight, bias, seq_idx=seq_idx, activation="silu")
    separate = [causal_conv1d(part, weight, bias, activation="silu") for part in x.split(lengths, dim=-1)]
    assert max_err(y, torch.cat(separate, dim=-1)) < 1e-12


def test_reference_agrees_with_explicit_sum():
    """The reference's grouped conv1d is the formula in the docstring, written as a loop."""
    x = torch.randn(2, 3, 6, dtype=torch.float64)
    weight = torch.randn(3, 3, dtype=torch.float64)
    init = torch.randn(2, 3, 2, dtype=torch.float64)
    xs = torch.cat([init, x], dim=-1)
    y = torch.zeros_like(x)
    for t in range(6):
        for k in range(3):
            y[:, :, t] += weight[:, k] * xs[:, :, t + k]
    assert max_err(causal_conv1d_ref(x, weight, initial_states=init), y) < 1e-12


# ---- low precision: the error budget ------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("weight_fp32", [False, True])
@pytest.mark.parametrize("variant", ["bias_silu", "states", "seq_idx"])
def test_low_precision_error_budget(variant, weight_fp32, dtype, device):
    wdtype = torch.float32 if weight_fp32 else dtype
    x, weight, kwargs = make_case(3, 37, 257, 4, variant, "channels_last", dtype, wdtype, device)
    got = outputs(causal_conv1d, x, weight, kwargs)
    plain = outputs(causal_conv1d_ref, x, weight, kwargs)
    inputs = leaves(x, weight, kwargs)
    inputs64 = [t.detach().double().requires_grad_() for t in inputs]
    kwargs64 = dict(kwargs, bias=inputs64[2] if kwargs["bias"] is not None else None)
    kwargs64["initial_states"] = inputs64[-1] if kwargs["initial_states"] is not None else None
    ref = outputs(causal_conv1d_ref, inputs64[0], inputs64[1], kwargs64)
    for g, p, r in zip(got, plain, ref, strict=True):
        assert g.dtype == dtype
        assert_within_budget(g, r, p, "forward")
    cotangents = [torch.randn_like(r) for r in ref]
    got_grads = grads(got, inputs, cotangents)
    plain_grads = grads(plain, inputs, cotangents)
    ref_grads = grads(ref, inputs64, cotangents)
    for name, t, g, p, r in zip("x weight bias init".split(), inputs, got_grads, plain_grads, ref_grads,
                                strict=False):
        assert g.dtype == t.dtype, name
        assert_within_budget(g, r, p, name)


# ---- gradcheck, opcheck, torch.compile ----------------------------------------------------------------------------


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("width", [2, 4])
def test_gradcheck(width, variant):
    x, weight, kwargs = make_case(2, 3, 6, width, variant, "channels_last")

    def f(*tensors):
        it = iter(tensors)
        x_, w_ = next(it), next(it)
        kw = dict(kwargs)
        kw["bias"] = next(it) if kwargs["bias"] is not None else None
        kw["initial_states"] = next(it) if kwargs["initial_states"] is not None else None
        return causal_conv1d(x_, w_, **kw)

    assert torch.autograd.gradcheck(f, leaves(x, weight, kwargs))


@pytest.mark.parametrize("variant", ["states", "seq_idx"])
def test_double_backward(variant):
    x, weight, kwargs = make_case(1, 2, 4, 3, variant)

    def f(*tensors):
        kw = dict(kwargs, bias=tensors[2], initial_states=tensors[3] if len(tensors) > 3 else None)
        return causal_conv1d(tensors[0], tensors[1], **kw)

    assert torch.autograd.gradgradcheck(f, leaves(x, weight, kwargs))


def test_partial_gradients_and_fp32_weights():
    x, weight, kwargs = make_case(2, 5, 9, 3, "states", dtype=torch.bfloat16, wdtype=torch.float32)
    y, final = causal_conv1d(x.detach(), weight, **kwargs)
    dw, db = torch.autograd.grad(y.float().sum(), (weight, kwargs["bias"]))
    assert y.dtype == final.dtype == torch.bfloat16
    assert dw.dtype == db.dtype == torch.float32 and dw.shape == weight.shape


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck(device, dtype):
    opts = {"dtype": dtype, "device": device}
    x = make_x(2, 5, 11, "channels_last", dtype, device).requires_grad_()
    weight = torch.randn(5, 4, **opts, requires_grad=True)
    bias = torch.randn(5, **opts, requires_grad=True)
    init = torch.randn(2, 5, 3, **opts, requires_grad=True)
    seq_idx = make_seq_idx(2, 11, device)
    fwd, bwd = torch.ops.subq.causal_conv1d_fwd.default, torch.ops.subq.causal_conv1d_bwd.default
    torch.library.opcheck(fwd, (x, weight, bias, None, init, True, True))
    torch.library.opcheck(fwd, (x, weight, None, seq_idx, None, False, False))
    dy, dfinal = torch.randn(2, 5, 11, **opts), torch.randn(2, 5, 3, **opts)
    args = [t.detach() for t in (x, weight, bias)]
    torch.library.opcheck(bwd, (*args, None, init.detach(), dy, dfinal, True, [True, True, True, True]))
    torch.library.opcheck(bwd, (*args, seq_idx, None, dy, None, False, [False, True, False, False]))
    state = torch.randn(2, 5, 6, **opts)
    torch.library.opcheck(torch.ops.subq.causal_conv1d_update.default, (x.detach()[..., :2], state, *args[1:], True))


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    x, weight, kwargs = make_case(2, 37, 20, 4, "states", "channels_last", torch.float32, device=device)

    def f(x, weight, bias, init):
        y, final = causal_conv1d(x, weight, bias, initial_states=init, return_final_states=True, activation="silu")
        return y.sin().sum() + final.square().sum()

    args = (x, weight, kwargs["bias"], kwargs["initial_states"])
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out, want = compiled(*args), f(*args)
    assert max_err(out, want) < 1e-3
    for g, r in zip(torch.autograd.grad(out, args), torch.autograd.grad(want, args), strict=True):
        assert max_err(g, r) < 1e-4

    def decode(tokens, state, weight, bias):
        return causal_conv1d_update(tokens, state, weight, bias, activation="silu")

    tokens, state = x.detach()[:, :, :2], torch.randn(2, 37, 5, device=device)
    state_eager = state.clone()
    with torch.no_grad():
        got = torch.compile(decode, fullgraph=True, backend="aot_eager")(tokens, state, weight, kwargs["bias"])
        want = decode(tokens, state_eager, weight, kwargs["bias"])
    assert torch.equal(got, want) and torch.equal(state, state_eager)


# ---- causality and decoding ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("width", WIDTHS)
def test_causality(width, device):
    x, weight, kwargs = make_case(2, 37, 100, width, "seq_idx", "channels_last", torch.float32, device=device)
    x = x.detach()
    y = causal_conv1d(x, weight.detach(), kwargs["bias"].detach(), seq_idx=kwargs["seq_idx"], activation="silu")
    for t in (0, 1, 63, 64, 65, 99):
        x2 = x.clone()
        x2[:, :, t] += 1.0
        y2 = causal_conv1d(x2, weight.detach(), kwargs["bias"].detach(), seq_idx=kwargs["seq_idx"], activation="silu")
        assert torch.equal(y2[..., :t], y[..., :t]), f"output before t={t} moved"
        assert not torch.equal(y2[..., t], y[..., t])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("extra_state", [0, 3])
def test_update_equals_forward(extra_state, width, dtype, device):
    """Decoding token by token, and a few tokens at a time, reproduces the full forward and its final states."""
    batch, dim, seqlen = 3, 37, 12
    x = make_x(batch, dim, seqlen, "channels_last", dtype, device)
    weight = torch.randn(dim, width, device=device)  # float32 weights with any x dtype
    bias = torch.randn(dim, device=device)
    history = torch.randn(batch, dim, width - 1 + extra_state, dtype=dtype, device=device)
    init = history[..., extra_state:]
    y, final = causal_conv1d(x, weight, bias, initial_states=init, return_final_states=True, activation="silu")
    tol = 1e-12 if dtype == torch.float64 else 1e-5 if dtype == torch.float32 else 1e-2

    state = history.clone()
    steps = [causal_conv1d_update(x[:, :, t], state, weight, bias, activation="silu") for t in range(seqlen)]
    assert steps[0].shape == (batch, dim)
    assert max_err(torch.stack(steps, dim=-1), y) <= tol * max(1.0, y.abs().max().item())
    assert torch.equal(state[..., extra_state:], final)
    assert torch.equal(state, torch.cat([history, x], dim=-1)[..., seqlen:])

    state = history.clone()
    chunks = [causal_conv1d_update(c, state, weight, bias, activation="silu") for c in x.split([5, 1, 6], dim=-1)]
    assert max_err(torch.cat(chunks, dim=-1), y) <= tol * max(1.0, y.abs().max().item())
    assert torch.equal(state[..., extra_state:], final)

    state_ref = history.clone()
    ref = causal_conv1d_update_ref(x[:, :, :4], state_ref, weight, bias, activation="silu")
    state = history.clone()
    got = causal_conv1d_update(x[:, :, :4], state, weight, bias, activation="silu")
    assert max_err(got, ref) <= tol * 10 * max(1.0, ref.abs().max().item())
    assert torch.equal(state, state_ref)


@pytest.mark.parametrize("device", DEVICES)
def test_update_with_strided_state(device):
    """conv_state is written in place through its own strides (here a channels-last view)."""
    weight = torch.randn(6, 4, dtype=torch.float64, device=device)
    storage = torch.randn(2, 5, 6, dtype=torch.float64, device=device)
    state = storage.transpose(1, 2)  # (2, 6, 5), non-contiguous
    expected_state = state.clone()
    x = torch.randn(2, 6, 2, dtype=torch.float64, device=device)
    want = causal_conv1d_update_ref(x, expected_state, weight)
    got = causal_conv1d_update(x, state, weight)
    assert max_err(got, want) < 1e-12
    assert torch.equal(storage.transpose(1, 2), expected_state)


# ---- bad input ----------------------------------------------------------------------------------------------------


def test_errors_name_the_argument():
    x, w, b = torch.randn(2, 4, 8), torch.randn(4, 3), torch.randn(4)
    seq = torch.zeros(2, 8, dtype=torch.int32)
    state = torch.randn(2, 4, 2)
    cases = [
        (lambda: causal_conv1d([1.0], w), TypeError, "x must be a torch.Tensor"),
        (lambda: causal_conv1d(torch.randn(4, 8), w), ValueError, "x must be 3-D (batch, dim, seqlen)"),
        (lambda: causal_conv1d(x.int(), w), ValueError, "x must have a floating-point dtype"),
        (lambda: causal_conv1d(x, torch.randn(4, 3, 1)), ValueError, "weight must be 2-D (dim, width)"),
        (lambda: causal_conv1d(x, torch.randn(5, 3)), ValueError, "weight.shape[0] must be the channels of x, 4"),
        (lambda: causal_conv1d(x, torch.randn(4, 5)), ValueError, "width) must be 2, 3 or 4"),
        (lambda: causal_conv1d(x, torch.randn(4, 1)), ValueError, "width) must be 2, 3 or 4"),
        (lambda: causal_conv1d(x, w.half()), ValueError, "weight.dtype (torch.float16) must be x.dtype"),
        (lambda: causal_conv1d(x.half(), w.double()), ValueError, "weight.dtype (torch.float64) must be x.dtype"),
        (lambda: causal_conv1d(x, w.to("meta")), ValueError, "weight is on meta but x is on cpu"),
        (lambda: causal_conv1d(x, w, torch.randn(5)), ValueError, "bias must have shape (dim,) = (4,)"),
        (lambda: causal_conv1d(x, w, b.long()), ValueError, "bias must have a floating-point dtype"),
        (lambda: causal_conv1d(x, w, activation="relu"), ValueError, "activation must be None, 'silu' or 'swish'"),
        (lambda: causal_conv1d(x, w, seq_idx=seq.long()), ValueError, "seq_idx must have dtype torch.int32"),
        (lambda: causal_conv1d(x, w, seq_idx=seq[:, :7]), ValueError, "seq_idx must have shape (batch, seqlen)"),
        (lambda: causal_conv1d(x, w, seq_idx=[0]), TypeError, "seq_idx must be a torch.Tensor"),
        (lambda: causal_conv1d(x, w, seq_idx=seq, initial_states=state), ValueError, "cannot be combined with seq_idx"),
        (lambda: causal_conv1d(x, w, initial_states=torch.randn(2, 4, 3)), ValueError,
         "initial_states must have shape (batch, dim, width - 1) = (2, 4, 2)"),
        (lambda: causal_conv1d(x, w, initial_states=state.double()), ValueError,
         "initial_states.dtype (torch.float64) must match x.dtype"),
        (lambda: causal_conv1d_update(torch.randn(2, 4, 1, 1), state, w), ValueError, "x must be 2-D (batch, dim) or"),
        (lambda: causal_conv1d_update(x[..., 0], torch.randn(2, 4, 1), w), ValueError,
         "conv_state.shape[2] (state_len) must be at least width - 1 = 2"),
        (lambda: causal_conv1d_update(x[..., 0], torch.randn(2, 5, 2), w), ValueError,
         "conv_state must have shape (batch, dim, state_len) = (2, 4, state_len)"),
        (lambda: causal_conv1d_update(x[..., 0], state.half(), w), ValueError, "conv_state.dtype (torch.float16)"),
        (lambda: causal_conv1d_update(x[..., 0], state, torch.randn(4, 7)), ValueError, "must be 2, 3 or 4"),
        (lambda: causal_conv1d_update(x[..., 0], state, w, activation="gelu"), ValueError, "activation must be"),
    ]
    for fn, exc, message in cases:
        with pytest.raises(exc) as info:
            fn()
        assert message in str(info.value), f"{message!r} not in {info.value!r}"


def test_direct_op_calls_are_checked():
    """torch.ops.subq.causal_conv1d_* called directly (bypassing the Python checks) raise RuntimeError."""
    x, w, buffer = torch.randn(2, 4, 8), torch.randn(4, 3), torch.randn(16)
    fwd, bwd, update = (torch.ops.subq.causal_conv1d_fwd, torch.ops.subq.causal_conv1d_bwd,
                        torch.ops.subq.causal_conv1d_update)
    cases = [
        (lambda: fwd(x, torch.randn(4, 5), None, None, None, False, False), "must be 2, 3 or 4"),
        (lambda: fwd(x, torch.randn(3, 3), None, None, None, False, False), "weight.shape[0] must be 4"),
        (lambda: fwd(x, w.half(), None, None, None, False, False), "must be x.dtype (Float) or float32"),
        (lambda: fwd(x, w, None, torch.zeros(2, 8), None, False, False), "seq_idx must be int32"),
        (lambda: fwd(x, w, None, torch.zeros(2, 8, dtype=torch.int32), torch.zeros(2, 4, 2), False, False),
         "cannot be combined"),
        (lambda: fwd(x, w, None, None, torch.zeros(2, 4, 3), False, False), "initial_states.shape[2] must be 2"),
        (lambda: bwd(x, w, None, None, None, torch.randn(2, 4, 7), None, False, [True] * 4), "dy.shape[2] must be 8"),
        (lambda: bwd(x, w, None, None, None, torch.randn(2, 4, 8), torch.randn(2, 4, 5), False, [True] * 4),
         "dfinal_states.shape[2] must be 2"),
        (lambda: update(x, torch.randn(2, 4, 1), w, None, False), "state_len) must be at least"),
        # conv_state is written in place
        (lambda: update(x[..., :1], torch.zeros(1, 4, 2).expand(2, 4, 2), w, None, False),
         "conv_state is written in place, so its elements must not share memory"),
        (lambda: update(buffer[:8].view(2, 4, 1), buffer.view(2, 4, 2), w, None, False),
         "conv_state is written in place and must not share memory with x"),
    ]
    for fn, message in cases:
        with pytest.raises(RuntimeError) as info:
            fn()
        assert message in str(info.value), f"{message!r} not in {info.value!r}"


# ---- CUDA specifics -----------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("shape", [(1, 33, 1), (2, 64, 65), (3, 1000, 4099)])
def test_cuda_kernels_write_every_element(shape, layout, dtype):
    batch, dim, seqlen = shape
    x, weight, kwargs = make_case(batch, dim, seqlen, 4, "states", layout, dtype, device="cuda")
    poison_cuda_allocator()
    y, final = causal_conv1d(x, weight, **kwargs)
    assert torch.isfinite(y).all() and torch.isfinite(final).all()
    poison_cuda_allocator()
    for g in torch.autograd.grad((y, final), leaves(x, weight, kwargs), (torch.randn_like(y), torch.randn_like(final))):
        assert torch.isfinite(g).all()


@pytest.mark.gpu
def test_cuda_kernels_are_opt_in(monkeypatch):
    """Until verified on a GPU the kernels (forward, backward, update) run only with
    SUBQ_EXPERIMENTAL_MAMBA2_KERNELS=1; the default CUDA path is the ATen composite."""
    x, weight, kwargs = make_case(2, 64, 300, 4, "states", "channels_last", torch.bfloat16, device="cuda")
    inputs = leaves(x, weight, kwargs)
    inputs64 = [t.detach().double().requires_grad_() for t in inputs]
    kwargs64 = dict(kwargs, bias=inputs64[2], initial_states=inputs64[3])
    plain, ref = outputs(causal_conv1d_ref, x, weight, kwargs), outputs(causal_conv1d_ref, *inputs64[:2], kwargs64)
    cotangents = [torch.randn_like(t) for t in plain]
    grads_plain = grads(plain, inputs, cotangents)
    grads_ref = grads(ref, inputs64, [t.double() for t in cotangents])
    state = torch.randn(2, 64, 3, device="cuda", dtype=torch.bfloat16)
    step_ref = causal_conv1d_update_ref(x[:, :, :2].detach().double(), state.double(), weight.detach().double(),
                                        kwargs["bias"].detach().double(), activation="silu")

    def run():
        got = outputs(causal_conv1d, x, weight, kwargs)
        for name, g, p, r in zip(("y", "final_states"), got, plain, ref, strict=True):
            assert_within_budget(g, r, p, name)
        for name, g, p, r in zip("x weight bias init".split(), grads(got, inputs, cotangents), grads_plain,
                                 grads_ref, strict=True):
            assert_within_budget(g, r, p, f"d{name}")
        step = causal_conv1d_update(x[:, :, :2].detach(), state.clone(), weight.detach(), kwargs["bias"].detach(),
                                    activation="silu")
        assert max_err(step, step_ref) <= 1e-2 * max(1.0, step_ref.abs().max().item())

    kernels = ["causal_conv1d_fwd_kernel", "causal_conv1d_bwd_kernel", "causal_conv1d_update_kernel"]
    assert_opt_in(monkeypatch, "SUBQ_EXPERIMENTAL_MAMBA2_KERNELS", kernels, run)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_cuda_large_matches_reference_and_is_deterministic(dtype):
    """Many time tiles and batch rows feed the weight-gradient reduction; two runs give identical bits."""
    x, weight, kwargs = make_case(4, 2 * 1024 + 3, 8192 + 5, 4, "seq_idx", "channels_last", dtype, device="cuda")
    y = causal_conv1d(x, weight, **kwargs)
    inputs = leaves(x, weight, kwargs)
    inputs64 = [t.detach().double().requires_grad_() for t in inputs]
    ref = causal_conv1d_ref(inputs64[0], inputs64[1], inputs64[2], kwargs["seq_idx"], activation="silu")
    plain = causal_conv1d_ref(x, weight, kwargs["bias"], kwargs["seq_idx"], activation="silu")
    assert_within_budget(y, ref, plain, "y")
    dy = torch.randn_like(y)
    first = torch.autograd.grad(y, inputs, dy, retain_graph=True)
    second = torch.autograd.grad(y, inputs, dy)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)
    ref_grads = torch.autograd.grad(ref, inputs64, dy.double())
    plain_grads = torch.autograd.grad(plain, inputs, dy)
    for name, g, p, r in zip(("dx", "dweight", "dbias"), first, plain_grads, ref_grads, strict=True):
        assert_within_budget(g, r, p, name)


@pytest.mark.gpu
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("seqlen", [0, *SEQLENS])
@pytest.mark.parametrize("width", WIDTHS)
def test_cuda_kernels_match_reference_float32(width, seqlen, variant, layout):
    """The float64 sweep above runs the ATen composite on CUDA; this one runs the float32 kernels over it."""
    batch, dim = 1 + seqlen % 3, 37
    x, weight, kwargs = make_case(batch, dim, seqlen, width, variant, layout, torch.float32, device="cuda")
    inputs = leaves(x, weight, kwargs)
    inputs64 = [t.detach().double().requires_grad_() for t in inputs]
    kwargs64 = dict(kwargs, bias=inputs64[2] if kwargs["bias"] is not None else None)
    kwargs64["initial_states"] = inputs64[-1] if kwargs["initial_states"] is not None else None
    got = outputs(causal_conv1d, x, weight, kwargs)
    want = outputs(causal_conv1d_ref, inputs64[0], inputs64[1], kwargs64)
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape and max_err(g, w) < 1e-5 * max(1.0, w.abs().max().item())
    cotangents = [torch.randn_like(w) for w in want]
    for name, g, w in zip("x weight bias init".split(), grads(got, inputs, cotangents),
                          grads(want, inputs64, cotangents), strict=False):
        assert max_err(g, w) < 1e-4 * max(1.0, w.abs().max().item()), name
