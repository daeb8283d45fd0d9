"""subq.ops.flash_chunk_attention, gau_attention and flash_step against the explicit L x L formulas (float64)."""

from __future__ import annotations

import pytest
import torch

from conftest import DEVICES, assert_within_budget, launched, max_err, opt_in, poison_cuda_allocator, run_profiled
from subq.ops import FlashDecodeState, flash_chunk_attention, flash_step, gau_attention
from subq.reference import flash_chunked_ref, flash_quadratic_ref, gau_attention_ref

FEATURES = ("q_quad", "k_quad", "q_lin", "k_lin")


def make_inputs(batch, seqlen, qk_dim, value_dim, chunk_size=None, device="cpu", dtype=torch.float64, *,
                gate=False, bias=False, bias_len=None, bias_dtype=None):
    """Fresh random inputs; the bias is large enough (±1 against scores of ~S/C) that a leak would show."""
    kw = dict(device=device, dtype=dtype)
    args = {name: torch.randn(batch, seqlen, qk_dim, **kw) for name in FEATURES}
    args["v"] = torch.randn(batch, seqlen, value_dim, **kw)
    if gate:
        args["u"] = torch.randn(batch, seqlen, value_dim, **kw)
    if bias:
        length = bias_len if bias_len is not None else 2 * chunk_size - 1
        args["rel_bias"] = torch.randn(length, device=device, dtype=bias_dtype or dtype)
    return args


def gau_inputs(args):
    out = {"q": args["q_quad"], "k": args["k_quad"], "v": args["v"]}
    return out | {k: args[k] for k in ("u", "rel_bias") if k in args}


def assert_close64(out, ref, what, rtol=1e-10):
    assert max_err(out, ref) <= rtol * max(1.0, ref.abs().max().item()), what


# (batch, seqlen, S, E, chunk_size, gate, bias): every chunk size, L a multiple of C or not, L < C, L = 1
CASES = [
    (1, 1, 4, 5, 64, False, False),
    (2, 50, 8, 6, 64, True, True),        # L < C: one short chunk
    (2, 128, 8, 6, 64, False, True),      # exact multiple
    (1, 150, 6, 10, 64, True, False),     # short last chunk
    (2, 300, 4, 7, 128, True, True),
    (1, 200, 5, 3, 256, False, True),     # L < C
    (1, 600, 4, 4, 256, True, True),
    (1, 700, 3, 5, 512, True, True),
]


def case_id(c):
    return f"B{c[0]}-L{c[1]}-C{c[4]}" + ("-gate" if c[5] else "") + ("-bias" if c[6] else "")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_chunk_attention_matches_quadratic_formula(case, causal, device):
    batch, seqlen, S, E, C, gate, bias = case
    args = make_inputs(batch, seqlen, S, E, C, device, gate=gate, bias=bias)
    leaves = {k: v.requires_grad_() for k, v in args.items()}
    out = flash_chunk_attention(**leaves, chunk_size=C, causal=causal)
    ref = flash_quadratic_ref(**leaves, chunk_size=C, causal=causal)
    assert out.shape == args["v"].shape and out.dtype == torch.float64
    assert_close64(out, ref, "out")

    dout = torch.randn_like(out)
    grads = torch.autograd.grad((out * dout).sum(), list(leaves.values()))
    grads_ref = torch.autograd.grad((ref * dout).sum(), list(leaves.values()))
    for name, g, g_ref in zip(leaves, grads, grads_ref, strict=True):
        assert_close64(g, g_ref, f"d{name}", 1e-9)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("batch,seqlen,S,E,gate,bias", [(2, 1, 6, 5, False, True), (2, 70, 6, 5, True, False),
                                                        (2, 300, 6, 5, True, True), (2, 513, 6, 5, False, True),
                                                        (130, 600, 3, 2, True, True)])
def test_gau_attention_matches_quadratic_formula(batch, seqlen, S, E, gate, bias, causal, device):
    """Lengths across the 256-key tile boundary exercise the running sums and the per-tile causal mask. Bidirectional
    tiles grow to 2^24 scores (batch * L * keys): only batch * L above 65536 (the last case) splits their keys."""
    args = gau_inputs(make_inputs(batch, seqlen, S, E, device=device, gate=gate, bias=bias, bias_len=2 * seqlen - 1))
    leaves = {k: v.requires_grad_() for k, v in args.items()}
    out = gau_attention(**leaves, causal=causal)
    ref = gau_attention_ref(**leaves, causal=causal)
    assert_close64(out, ref, "out")
    dout = torch.randn_like(out)
    grads = torch.autograd.grad((out * dout).sum(), list(leaves.values()))
    grads_ref = torch.autograd.grad((ref * dout).sum(), list(leaves.values()))
    for name, g, g_ref in zip(leaves, grads, grads_ref, strict=True):
        assert_close64(g, g_ref, f"d{name}", 1e-9)


def test_chunked_reference_matches_quadratic_formula():
    for causal in (False, True):
        args = make_inputs(2, 150, 4, 6, 64, gate=True, bias=True)
        assert_close64(flash_chunked_ref(**args, chunk_size=64, causal=causal),
                       flash_quadratic_ref(**args, chunk_size=64, causal=causal), "chunked ref")


def test_scaling_conventions_by_hand():
    """Pins the defaults quad_scale = 1/C, lin_scale = 1/L, gau scale = 1/L and the bias index j - i + C - 1."""
    t = lambda *xs: torch.tensor(xs, dtype=torch.float64).view(1, len(xs), 1)  # noqa: E731
    q_quad, k_quad, q_lin, k_lin, v = t(1.0, 2.0), t(3.0, -4.0), t(1.0, 1.0), t(1.0, 2.0), t(1.0, 10.0)
    rel_bias = torch.zeros(127, dtype=torch.float64)
    rel_bias[64] = 0.5    # offset j - i = +1 (query 0, key 1)
    rel_bias[62] = 0.25   # offset j - i = -1 (query 1, key 0)
    C, L = 64, 2
    relu2 = lambda x: max(x, 0.0) ** 2  # noqa: E731
    quad = [[relu2(1 * 3 / C), relu2(1 * -4 / C + 0.5)], [relu2(2 * 3 / C + 0.25), relu2(2 * -4 / C)]]
    lin = [[1 * 1 / L, 1 * 2 / L], [1 * 1 / L, 1 * 2 / L]]
    vals = [1.0, 10.0]
    bidir = [sum((quad[i][j] + lin[i][j]) * vals[j] for j in range(2)) for i in range(2)]
    causal = [quad[0][0] * vals[0], sum(quad[1][j] * vals[j] for j in range(2))]  # one chunk: no linear part
    out = flash_chunk_attention(q_quad, k_quad, q_lin, k_lin, v, rel_bias=rel_bias, chunk_size=C)
    assert torch.allclose(out.flatten(), torch.tensor(bidir, dtype=torch.float64), rtol=1e-14, atol=0)
    out = flash_chunk_attention(q_quad, k_quad, q_lin, k_lin, v, rel_bias=rel_bias, chunk_size=C, causal=True)
    assert torch.allclose(out.flatten(), torch.tensor(causal, dtype=torch.float64), rtol=1e-14, atol=0)
    gau_bias = torch.tensor([0.25, 0.0, 0.5], dtype=torch.float64)  # index j - i + L - 1
    gau = [sum(relu2(q_quad.flatten()[i].item() * k_quad.flatten()[j].item() / L + gau_bias[j - i + 1].item())
               * vals[j] for j in range(2)) for i in range(2)]
    out = gau_attention(q_quad, k_quad, v, rel_bias=gau_bias)
    assert torch.allclose(out.flatten(), torch.tensor(gau, dtype=torch.float64), rtol=1e-14, atol=0)


def test_padded_keys_leak_no_bias():
    """A short last chunk: keys past L must add nothing even where relu(0 + bias)² > 0."""
    args = make_inputs(1, 70, 4, 5, 64, bias=True)
    args["rel_bias"] = torch.full_like(args["rel_bias"], 3.0)
    for causal in (False, True):
        out = flash_chunk_attention(**args, chunk_size=64, causal=causal)
        assert_close64(out, flash_quadratic_ref(**args, chunk_size=64, causal=causal), f"causal={causal}")
        # the last short chunk is the same computation as a sequence of just those positions' chunk
        tail = {k: (t[:, 64:] if k != "rel_bias" else t) for k, t in args.items()}
        quad_only = flash_chunk_attention(**tail, chunk_size=64, causal=causal, lin_scale=0.0)
        full_quad = flash_chunk_attention(**args, chunk_size=64, causal=causal, lin_scale=0.0)
        assert_close64(full_quad[:, 64:], quad_only, "short chunk")


@pytest.mark.parametrize("op", ["chunk", "gau"])
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_gradcheck(op, causal):
    if op == "chunk":
        args = make_inputs(1, 70, 3, 4, 64, gate=True, bias=True)
        names = list(args)

        def fn(*tensors):
            return flash_chunk_attention(**dict(zip(names, tensors, strict=True)), chunk_size=64, causal=causal)
    else:
        args = gau_inputs(make_inputs(1, 20, 3, 4, gate=True, bias=True, bias_len=39))
        names = list(args)

        def fn(*tensors):
            return gau_attention(**dict(zip(names, tensors, strict=True)), causal=causal, scale=0.3)

    # fast mode (random projections of the Jacobian): the full gradients are compared with the reference's above
    assert torch.autograd.gradcheck(fn, [args[n].requires_grad_() for n in names], atol=1e-7, fast_mode=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_within_error_budget(device, dtype):
    args = make_inputs(2, 300, 32, 48, 128, device, dtype, gate=True, bias=True, bias_dtype=torch.float32)
    for causal in (False, True):
        out = flash_chunk_attention(**args, chunk_size=128, causal=causal)
        args64 = {k: v.double() for k, v in args.items()}
        ref = flash_quadratic_ref(**args64, chunk_size=128, causal=causal)
        plain = flash_chunked_ref(**args, chunk_size=128, causal=causal)
        assert out.dtype == dtype
        assert_within_budget(out, ref, plain, f"flash {dtype} causal={causal}")
        g = gau_inputs(args) | {"rel_bias": args["rel_bias"].new_zeros(599)}
        out = gau_attention(**g, causal=causal)
        ref = gau_attention_ref(**{k: v.double() for k, v in g.items()}, causal=causal)
        assert_within_budget(out, ref, gau_attention_ref(**g, causal=causal), f"gau {dtype} causal={causal}")


@pytest.mark.parametrize("device", DEVICES)
def test_causal(device):
    """Perturb position t in every input: nothing before t moves (t mid-chunk, so the chunk's square is tested)."""
    args = make_inputs(1, 200, 4, 6, 64, device, gate=True, bias=True)
    out = flash_chunk_attention(**args, chunk_size=64, causal=True, lin_scale=0.01)
    gau = gau_attention(**gau_inputs(args | {"rel_bias": args["v"].new_ones(399)}), causal=True)
    t = 100
    for name in (*FEATURES, "v", "u"):
        moved = {k: v.clone() for k, v in args.items()}
        moved[name][:, t] += 1.0
        out2 = flash_chunk_attention(**moved, chunk_size=64, causal=True, lin_scale=0.01)
        assert torch.equal(out[:, :t], out2[:, :t]), name
        if name in ("q_quad", "k_quad", "v", "u"):
            gau2 = gau_attention(**gau_inputs(moved | {"rel_bias": args["v"].new_ones(399)}), causal=True)
            assert torch.equal(gau[:, :t], gau2[:, :t]), f"gau {name}"
    moved = {k: v.clone() for k, v in args.items()}
    moved["k_lin"][:, t] += 1.0  # k_lin reaches only later chunks
    out2 = flash_chunk_attention(**moved, chunk_size=64, causal=True, lin_scale=0.01)
    assert torch.equal(out[:, :128], out2[:, :128]) and not torch.equal(out[:, 128:], out2[:, 128:])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,gate,bias", [(torch.float64, True, True), (torch.float64, False, False),
                                             (torch.float32, True, True)])
def test_decode_equals_forward(dtype, gate, bias, device):
    batch, seqlen, S, E, C = 2, 150, 6, 5, 64
    args = make_inputs(batch, seqlen, S, E, C, device, dtype, gate=gate, bias=bias)
    lin_scale = 1.0 / seqlen
    full = flash_chunk_attention(**args, chunk_size=C, causal=True, lin_scale=lin_scale)
    state = FlashDecodeState.allocate(batch, C, S, E, device=device, dtype=dtype)
    steps = []
    for i in range(seqlen):
        token = {k: (v[:, i] if k != "rel_bias" else v) for k, v in args.items()}
        if i % 2:  # both token layouts: (B, S) and (B, 1, S)
            token = {k: (v[:, None] if k != "rel_bias" else v) for k, v in token.items()}
        y = flash_step(state, **token, lin_scale=lin_scale)
        steps.append(y if y.dim() == 2 else y[:, 0])
    assert state.position == seqlen
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    assert_close64(torch.stack(steps, 1), full, "decode", tol)


def test_nan_propagates():
    """The documented policy: causal, a NaN at t reaches every output from the start of t's chunk on and nothing in
    earlier chunks; bidirectional, every output."""
    args = make_inputs(1, 200, 4, 5, 64, gate=True, bias=True)
    args["v"][0, 70, 0] = float("nan")
    out = flash_chunk_attention(**args, chunk_size=64, causal=True)
    assert out[0, 64:, 0].isnan().all() and not out[0, :64].isnan().any()
    assert flash_chunk_attention(**args, chunk_size=64)[0, :, 0].isnan().all()


@pytest.mark.parametrize("device", DEVICES)
def test_batch_and_length_edges(device):
    for batch, seqlen in ((0, 10), (2, 0)):
        args = make_inputs(batch, seqlen, 4, 5, 64, device, gate=True, bias=True)
        leaves = {k: v.requires_grad_() for k, v in args.items()}
        out = flash_chunk_attention(**leaves, chunk_size=64, causal=True)
        assert out.shape == (batch, seqlen, 5)
        out.sum().backward()
        assert all(t.grad is not None and not t.grad.any() for t in leaves.values())
        g = gau_inputs(args | {"rel_bias": args["v"].new_zeros(max(2 * seqlen - 1, 0))})
        assert gau_attention(**g).shape == (batch, seqlen, 5)


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_inputs(device):
    args = make_inputs(2, 100, 4, 6, 64, device, gate=True)
    strided = {k: torch.randn(2, 100, 2 * v.shape[-1], dtype=v.dtype, device=device)[..., ::2] for k, v in
               args.items()}
    contiguous = {k: v.contiguous() for k, v in strided.items()}
    assert not strided["v"].is_contiguous()
    for causal in (False, True):
        assert max_err(flash_chunk_attention(**strided, chunk_size=64, causal=causal),
                       flash_chunk_attention(**contiguous, chunk_size=64, causal=causal)) < 1e-12
    assert max_err(gau_attention(**gau_inputs(strided)), gau_attention(**gau_inputs(contiguous))) < 1e-12


def test_mixed_bias_dtype():
    args = make_inputs(1, 80, 8, 8, 64, dtype=torch.bfloat16, gate=True, bias=True, bias_dtype=torch.float32)
    leaves = {k: v.requires_grad_() for k, v in args.items()}
    out = flash_chunk_attention(**leaves, chunk_size=64)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert leaves["rel_bias"].grad.dtype == torch.float32 and leaves["v"].grad.dtype == torch.bfloat16


def test_raw_ops_refuse_a_chunk_size_below_one():
    """Which chunk sizes the op takes is subq.ops.flash's rule (CHUNK_SIZES); the raw ops keep only the composite's
    chunk arithmetic defined: 0 would divide by zero."""
    args = make_inputs(1, 70, 3, 4)
    features = [args[k] for k in FEATURES]
    with pytest.raises(RuntimeError, match="chunk_size must be >= 1, got 0"):
        torch.ops.subq.flash_chunk_attention_fwd(*features, args["v"], None, None, 0, False, 0.1, 0.02)
    state = FlashDecodeState.allocate(1, 64, 3, 4, dtype=torch.float64)
    token = [torch.randn(1, 3, dtype=torch.float64) for _ in FEATURES]
    with pytest.raises(RuntimeError, match="k_quad_cache.shape\\[1\\] \\(the chunk size\\) must be >= 1, got 0"):
        torch.ops.subq.flash_step(*token, torch.randn(1, 4, dtype=torch.float64), None, None, state.lin_state,
                                  state.chunk_kv, state.k_quad_cache[:, :0], state.v_cache[:, :0], 0, 0.1, 0.1)


def test_opcheck():
    args = make_inputs(1, 70, 3, 4, 64, gate=True, bias=True)
    tensors = [args[k].requires_grad_() for k in (*FEATURES, "v", "u", "rel_bias")]
    for causal in (False, True):
        torch.library.opcheck(torch.ops.subq.flash_chunk_attention_fwd.default, (*tensors, 64, causal, 0.1, 0.02))
        dout = torch.randn_like(args["v"])
        torch.library.opcheck(torch.ops.subq.flash_chunk_attention_bwd.default,
                              (dout, *[t.detach() for t in tensors], 64, causal, 0.1, 0.02))
        g = [args["q_quad"], args["k_quad"], args["v"], args["u"], torch.randn(139, dtype=torch.float64,
                                                                                 requires_grad=True)]
        torch.library.opcheck(torch.ops.subq.gau_attention_fwd.default, (*g, causal, 0.05))
        torch.library.opcheck(torch.ops.subq.gau_attention_bwd.default, (dout, *[t.detach() for t in g], causal,
                                                                         0.05))
    state = FlashDecodeState.allocate(1, 64, 3, 4, dtype=torch.float64)
    token = [t.detach()[:, 5] for t in tensors[:6]]
    torch.library.opcheck(torch.ops.subq.flash_step.default,
                          (*token, tensors[6].detach(), state.lin_state, state.chunk_kv, state.k_quad_cache,
                           state.v_cache, 5, 0.1, 0.02))


def test_torch_compile_fullgraph():
    args = make_inputs(2, 90, 4, 6, 64, dtype=torch.float32, gate=True, bias=True)
    leaves = {k: v.requires_grad_() for k, v in args.items()}

    def fn(**kw):
        out = flash_chunk_attention(**kw, chunk_size=64, causal=True)
        g = gau_attention(kw["q_quad"], kw["k_quad"], kw["v"], kw["u"], causal=True)
        return out.square().sum() + g.square().sum()

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    out, out_ref = compiled(**leaves), fn(**leaves)
    assert torch.allclose(out, out_ref)
    g = torch.autograd.grad(out, list(leaves.values()))
    g_ref = torch.autograd.grad(out_ref, list(leaves.values()))
    assert all(torch.allclose(a, b) for a, b in zip(g, g_ref, strict=True))


BAD = [
    ("v 2-D", lambda a: a.update(v=a["v"][0]), ValueError, "v must be 3-D"),
    ("int", lambda a: a.update(q_lin=a["q_lin"].long()), ValueError, "q_lin must have a floating-point dtype"),
    ("k shape", lambda a: a.update(k_quad=a["k_quad"][:, :-1]), ValueError, "k_quad must have q_quad's shape"),
    ("q_lin dtype", lambda a: a.update(q_lin=a["q_lin"].float()), ValueError, "q_lin.dtype .* must match v.dtype"),
    ("v length", lambda a: a.update(v=a["v"][:, :-1]), ValueError, "v must have q_quad's leading dims"),
    ("u shape", lambda a: a.update(u=a["v"][..., :-1]), ValueError, "u must have v's shape"),
    ("S too big", lambda a: a.update(**{k: torch.randn(2, 70, 257, dtype=torch.float64) for k in FEATURES}),
     ValueError, "feature size S must be in 1..256"),
    ("E too big", lambda a: a.update(v=torch.randn(2, 70, 4097, dtype=torch.float64)), ValueError,
     "feature size E must be in 1..4096"),
    ("chunk", lambda a: a.update(chunk_size=100), ValueError, "chunk_size must be one of"),
    ("chunk float", lambda a: a.update(chunk_size=64.0), ValueError,
     "chunk_size must be one of .*, got 64.0 \\(float\\)"),
    ("bias len", lambda a: a.update(rel_bias=torch.randn(127, dtype=torch.float64), chunk_size=128), ValueError,
     "rel_bias must have shape \\(2 \\* chunk_size - 1,\\) = \\(255,\\)"),
    ("bias dtype", lambda a: a.update(rel_bias=torch.randn(127, dtype=torch.float16)), ValueError,
     "rel_bias.dtype must be v's dtype or float32"),
    ("not a tensor", lambda a: a.update(v=1.0), TypeError, "v must be a torch.Tensor"),
]


@pytest.mark.parametrize("name,mutate,exc,match", BAD, ids=[b[0] for b in BAD])
def test_bad_inputs(name, mutate, exc, match):
    args = make_inputs(2, 70, 4, 6, 64, gate=True)
    args.update(chunk_size=64)
    mutate(args)
    with pytest.raises(exc, match=match):
        flash_chunk_attention(**args)


def test_bad_inputs_gau_and_step():
    args = gau_inputs(make_inputs(2, 70, 4, 6))
    with pytest.raises(ValueError, match="rel_bias must have shape \\(2 \\* seqlen - 1,\\) = \\(139,\\)"):
        gau_attention(**args, rel_bias=torch.zeros(127, dtype=torch.float64))
    with pytest.raises(ValueError, match="k must have q's shape"):
        gau_attention(args["q"], args["k"][..., :-1], args["v"])
    state = FlashDecodeState.allocate(2, 64, 4, 6, dtype=torch.float64)
    token = {k: torch.randn(2, 4, dtype=torch.float64) for k in FEATURES}
    with pytest.raises(ValueError, match="state.lin_state must have shape \\(batch, S, E\\) from the inputs = "
                                         "\\(2, 4, 7\\), got \\(2, 4, 6\\)"):
        flash_step(state, **token, v=torch.randn(2, 7, dtype=torch.float64), lin_scale=0.1)
    with pytest.raises(TypeError, match="state must be a FlashDecodeState"):
        flash_step(None, **token, v=torch.randn(2, 6, dtype=torch.float64), lin_scale=0.1)
    with pytest.raises(RuntimeError, match="lin_state.dtype must be"):
        wrong = FlashDecodeState.allocate(2, 64, 4, 6, dtype=torch.float32)
        torch.ops.subq.flash_step(*token.values(), torch.randn(2, 6, dtype=torch.float64), None, None,
                                  wrong.lin_state, wrong.chunk_kv, wrong.k_quad_cache, wrong.v_cache, 0, 0.1, 0.1)
    v = torch.randn(2, 6, dtype=torch.float64)
    # the cache's rank is checked before its chunk size is read from shape[1]
    with pytest.raises(RuntimeError, match="k_quad_cache must be 3-D, got shape \\[\\]"):
        torch.ops.subq.flash_step(*token.values(), v, None, None, state.lin_state, state.chunk_kv,
                                  torch.tensor(1.0, dtype=torch.float64), state.v_cache, 0, 0.1, 0.1)
    with pytest.raises(ValueError, match="state.k_quad_cache must be 3-D \\(batch, chunk_size, S\\), got shape \\(\\)"):
        flash_step(FlashDecodeState(state.lin_state, state.chunk_kv, torch.tensor(1.0), state.v_cache), **token, v=v,
                   lin_scale=0.1)
    with pytest.raises(TypeError, match="state.position must be an int, got True \\(bool\\)"):
        flash_step(FlashDecodeState(state.lin_state, state.chunk_kv, state.k_quad_cache, state.v_cache, True),
                   **token, v=v, lin_scale=0.1)
    with pytest.raises(ValueError, match="chunk_size must be one of .*, got 64.0 \\(float\\)"):
        FlashDecodeState.allocate(2, 64.0, 4, 6)

    # the four states are written in place: no state may alias another or an input
    def step_with(lin_state, chunk_kv):
        return torch.ops.subq.flash_step(*token.values(), v, None, None, lin_state, chunk_kv, state.k_quad_cache,
                                         state.v_cache, 0, 0.1, 0.1)
    with pytest.raises(RuntimeError, match="lin_state is written in place and must not share memory with chunk_kv"):
        step_with(state.lin_state, state.lin_state)


def test_state_checks_name_the_tensor_and_values():
    """Found by an outside fuzz: each message named the wrong thing, or none."""
    state = FlashDecodeState.allocate(2, 64, 8, 6, dtype=torch.float64)
    token = {k: torch.randn(2, 8, dtype=torch.float64) for k in FEATURES}
    token["v"] = torch.randn(2, 6, dtype=torch.float64)
    state.v_cache = torch.zeros(2, 32, 6, dtype=torch.float64)  # was: "allocated for (2, 8, 6), inputs give (2, 8, 6)"
    with pytest.raises(ValueError, match="state.v_cache must have shape \\(batch, chunk_size, E\\) from the inputs "
                                         "= \\(2, 64, 6\\), got \\(2, 32, 6\\)"):
        flash_step(state, **token, lin_scale=0.1)
    state = FlashDecodeState.allocate(2, 64, 8, 6, dtype=torch.float64)
    state.chunk_kv = state.chunk_kv.float()
    with pytest.raises(ValueError, match="state.chunk_kv.dtype must be torch.float64 for inputs of dtype"):
        flash_step(state, **token, lin_scale=0.1)
    state = FlashDecodeState.allocate(2, 64, 8, 6, dtype=torch.float64)
    for scale in ("quad_scale", "lin_scale"):
        with pytest.raises(TypeError, match=f"{scale} must be a real number, got 'x' \\(str\\)"):
            flash_step(state, **token, **{"lin_scale": 0.1, scale: "x"})
        with pytest.raises(ValueError, match=f"{scale} must be a finite real number, got nan"):
            flash_step(state, **token, **{"lin_scale": 0.1, scale: float("nan")})
    with pytest.raises(TypeError, match="quad_scale must be a real number, got 'x'"):
        flash_chunk_attention(**make_inputs(1, 8, 8, 6), quad_scale="x", chunk_size=64)
    with pytest.raises(TypeError, match="scale must be a real number, got 'x'"):
        gau_attention(**gau_inputs(make_inputs(1, 8, 8, 6)), scale="x")
    with pytest.raises(ValueError, match="batch must be an int >= 0, got -1"):
        FlashDecodeState.allocate(-1, 64, 8, 6)
    with pytest.raises(ValueError, match="qk_dim must be an int in \\[1, 256\\], got 0"):
        FlashDecodeState.allocate(1, 64, 0, 6)
    state.position = 2**70  # once: "Expected ... 'int' but instead found type 'int'"
    with pytest.raises(ValueError, match="state.position must be an int in \\[0, 9223372036854775806\\], got 11805"):
        flash_step(state, **token, lin_scale=0.1)
    state.position = 0
    assert not torch.isnan(flash_step(state, **token, lin_scale=0.1)).any() and state.position == 1


@pytest.mark.parametrize("field", ["lin_state", "chunk_kv", "k_quad_cache", "v_cache"])
def test_state_on_another_device_is_refused(field):
    """A meta state among CPU inputs once sent flash_step to the fake kernel: uninitialised output, state
    untouched, position advanced, no error."""
    state = FlashDecodeState.allocate(2, 64, 8, 6)
    setattr(state, field, getattr(state, field).to("meta"))
    token = {k: torch.randn(2, 8) for k in FEATURES} | {"v": torch.randn(2, 6)}
    with pytest.raises(ValueError, match=f"state.{field} is on meta but v is on cpu"):
        flash_step(state, **token, lin_scale=0.1)
    assert state.position == 0


@pytest.mark.parametrize("poison", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("name", ["q", "k", "v"])
def test_gau_causal_outputs_before_a_nan_are_untouched(name, poison):
    """A NaN or Inf from position t on (a padded tail) leaves the outputs before t as they are on the first t
    positions alone, and for k and v their gradients too: once it made every output NaN. L = 300 crosses a key
    tile (256)."""
    seqlen, scale = 300, 0.05
    args = gau_inputs(make_inputs(1, seqlen, 8, 6, gate=True))
    for t in (5, 270):
        poisoned = {k: x.clone() for k, x in args.items()}
        poisoned[name][0, t:] = poison
        leaves = {k: x.requires_grad_() for k, x in poisoned.items()}
        out = gau_attention(**leaves, causal=True, scale=scale)
        assert out[:, :t].isfinite().all() and not out[:, t].isfinite().all()
        head = {k: x[:, :t].detach().clone().requires_grad_() for k, x in poisoned.items()}
        want = gau_attention(**head, causal=True, scale=scale)
        assert max_err(out[:, :t], want) < 1e-12
        if name == "q":  # q's NaN row of the kernel meets its outputs' zero gradients in the backward: 0 * NaN
            continue
        dout = torch.randn_like(want)
        grads = torch.autograd.grad(out[:, :t], list(leaves.values()), dout)
        grads_want = torch.autograd.grad(want, list(head.values()), dout)
        for g, g_want in zip(grads, grads_want, strict=True):
            assert max_err(g[:, :t], g_want) < 1e-12


@pytest.mark.gpu
def test_device_mismatch():
    args = make_inputs(1, 70, 4, 6, 64)
    args["k_lin"] = args["k_lin"].cuda()
    with pytest.raises(ValueError, match="k_lin is on cuda"):
        flash_chunk_attention(**args, chunk_size=64)


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_largest_sizes_gpu(causal):
    """S = 256, E = 4096, C = 512 in bf16, forward and backward, within the error budget of plain PyTorch."""
    args = make_inputs(1, 1500, 256, 4096, 512, "cuda", torch.bfloat16, gate=True, bias=True,
                       bias_dtype=torch.float32)
    leaves = {k: v.requires_grad_() for k, v in args.items()}
    out = flash_chunk_attention(**leaves, chunk_size=512, causal=causal)
    leaves64 = {k: v.detach().double().requires_grad_() for k, v in args.items()}
    ref = flash_chunked_ref(**leaves64, chunk_size=512, causal=causal)
    plain = flash_chunked_ref(**leaves, chunk_size=512, causal=causal)
    assert_within_budget(out, ref, plain, "out")
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, list(leaves.values()), dout)
    grads_ref = torch.autograd.grad(ref, list(leaves64.values()), dout.double())
    grads_plain = torch.autograd.grad(plain, list(leaves.values()), dout)
    for name, g, g_ref, g_plain in zip(leaves, grads, grads_ref, grads_plain, strict=True):
        assert_within_budget(g, g_ref, g_plain, f"d{name}")


# ---- the fused CUDA forward and backward (opt-in until verified on a GPU) --------------------------------------------

# (batch, seqlen, S, E, chunk_size, gate, bias): every C; L < C, L % C != 0 and an exact multiple; S off the
# 32-feature step and E off the 64/128-value tiles; the largest S; one position.
FUSED_CASES = [
    (2, 300, 32, 48, 64, True, True),
    (1, 50, 16, 130, 64, False, True),      # L < C
    (2, 256, 64, 256, 128, True, False),    # exact multiple
    (1, 700, 100, 200, 256, False, False),  # short last chunk with whole query tiles past L
    (1, 1000, 256, 72, 512, True, True),
    (3, 1, 8, 8, 128, True, True),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("case", FUSED_CASES, ids=case_id)
def test_fused_cuda_forward(case, causal, dtype, monkeypatch):
    opt_in(monkeypatch, "flash_chunk_attention")
    batch, seqlen, S, E, C, gate, bias = case
    args = make_inputs(batch, seqlen, S, E, C, "cuda", dtype, gate=gate, bias=bias, bias_dtype=torch.float32)
    poison_cuda_allocator()
    out, names = run_profiled(lambda: flash_chunk_attention(**args, chunk_size=C, causal=causal))
    assert launched(names, "chunk_output_kernel"), "the fused kernels did not run"
    assert out.dtype == dtype
    ref = flash_quadratic_ref(**{k: v.double() for k, v in args.items()}, chunk_size=C, causal=causal)
    plain = flash_chunked_ref(**args, chunk_size=C, causal=causal)
    assert_within_budget(out, ref, plain, f"fused {dtype} causal={causal}")
    opt_in(monkeypatch, "flash_chunk_attention", on=False)
    composite = flash_chunk_attention(**args, chunk_size=C, causal=causal)
    assert max_err(out, composite) <= 2 * max_err(plain, ref) + 1e-3


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("case", FUSED_CASES, ids=case_id)
def test_fused_cuda_backward(case, causal, dtype, monkeypatch):
    """Every gradient of the fused backward (the forward fused too) against float64 autograd through the quadratic
    formula, within the error budget of autograd through the plain chunked PyTorch in the same dtype; the gradients
    are allocated from NaN-poisoned memory, so an unwritten element fails."""
    opt_in(monkeypatch, "flash_chunk_attention")
    batch, seqlen, S, E, C, gate, bias = case
    args = make_inputs(batch, seqlen, S, E, C, "cuda", dtype, gate=gate, bias=bias, bias_dtype=torch.float32)
    leaves = {k: v.requires_grad_() for k, v in args.items()}
    out = flash_chunk_attention(**leaves, chunk_size=C, causal=causal)
    dout = torch.randn_like(out)
    poison_cuda_allocator()
    grads, names = run_profiled(lambda: torch.autograd.grad(out, list(leaves.values()), dout))
    assert launched(names, "score_gradient_kernel"), "the fused backward did not run"
    leaves64 = {k: v.detach().double().requires_grad_() for k, v in args.items()}
    ref = flash_quadratic_ref(**leaves64, chunk_size=C, causal=causal)
    grads_ref = torch.autograd.grad(ref, list(leaves64.values()), dout.double())
    plain = flash_chunked_ref(**leaves, chunk_size=C, causal=causal)
    grads_plain = torch.autograd.grad(plain, list(leaves.values()), dout)
    for name, g, g_ref, g_plain in zip(leaves, grads, grads_ref, grads_plain, strict=True):
        assert g.dtype == leaves[name].dtype, f"d{name}: dtype {g.dtype}"
        assert_within_budget(g, g_ref, g_plain, f"fused d{name} {dtype} causal={causal}")
