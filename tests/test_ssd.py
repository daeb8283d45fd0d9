"""subq.ops.ssd_chunk_scan against the sequential recurrence (float64), on every option that changes the math."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import DEVICES, assert_within_budget, launched, max_err, opt_in, run_profiled
from subq.ops import ssd_chunk_scan
from subq.reference import ssd_chunked_ref, ssd_ref


def make_inputs(batch, seqlen, nheads, headdim, ngroups, dstate, device="cpu", dtype=torch.float64, *,
                D=None, z=False, dt_bias=False, initial_states=False, param_dtype=None):
    """Fresh random inputs in Mamba-2's ranges: A < 0 and dt > 0, so the state decays."""
    param_dtype = param_dtype or dtype
    kw = dict(device=device, dtype=dtype)
    args = dict(
        x=torch.randn(batch, seqlen, nheads, headdim, **kw),
        dt=torch.rand(batch, seqlen, nheads, **kw).mul(0.5).add(0.02),
        A=-torch.rand(nheads, device=device, dtype=param_dtype).mul(2).add(0.1),
        B=torch.randn(batch, seqlen, ngroups, dstate, **kw),
        C=torch.randn(batch, seqlen, ngroups, dstate, **kw),
    )
    if D == "head":
        args["D"] = torch.randn(nheads, device=device, dtype=param_dtype)
    elif D == "headdim":
        args["D"] = torch.randn(nheads, headdim, device=device, dtype=param_dtype)
    if z:
        args["z"] = torch.randn(batch, seqlen, nheads, headdim, **kw)
    if dt_bias:
        args["dt_bias"] = torch.randn(nheads, device=device, dtype=param_dtype).mul(0.5)
    if initial_states:
        args["initial_states"] = torch.randn(batch, nheads, headdim, dstate, device=device, dtype=param_dtype)
    return args


def packed_seq_idx(batch, seqlen, boundaries, device="cpu"):
    seq = torch.zeros(batch, seqlen, dtype=torch.int32, device=device)
    for b in boundaries:
        seq[:, b:] += 1
    return seq


# (batch, seqlen, nheads, headdim, ngroups, dstate, chunk_size, options)
CASES = [
    (1, 1, 1, 4, 1, 4, 64, {}),
    (2, 63, 2, 8, 1, 16, 64, {"D": "head"}),
    (2, 64, 4, 8, 2, 16, 64, {"z": True, "dt_softplus": True}),
    (1, 150, 4, 5, 4, 7, 64, {"D": "headdim", "dt_bias": True, "dt_softplus": True, "dt_limit": (0.05, 0.7)}),
    (2, 200, 6, 4, 3, 8, 128, {"initial_states": True, "z": True}),
    (3, 300, 2, 4, 1, 6, 256, {"D": "head", "z": True, "dt_bias": True, "dt_softplus": True,
                               "initial_states": True}),
    (1, 257, 2, 3, 2, 5, 128, {"seq_idx": (1, 100, 128, 255)}),
    (2, 190, 4, 4, 2, 4, 64, {"seq_idx": (40, 64, 65, 128), "initial_states": True, "z": True, "D": "head",
                              "dt_softplus": True}),
]


def call_both(case, device, dtype=torch.float64):
    batch, seqlen, nheads, headdim, ngroups, dstate, chunk, opts = case
    opts = dict(opts)
    tensor_opts = {k: opts.pop(k) for k in ("D", "z", "dt_bias", "initial_states") if k in opts}
    args = make_inputs(batch, seqlen, nheads, headdim, ngroups, dstate, device, dtype, **tensor_opts)
    if "seq_idx" in opts:
        opts["seq_idx"] = packed_seq_idx(batch, seqlen, opts["seq_idx"], device)
    return args, opts, chunk


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"L{c[1]}-H{c[2]}-G{c[4]}-Q{c[6]}-" + "-".join(c[7]) or "plain")
def test_forward_and_gradients_match_recurrence(case, device):
    args, opts, chunk = call_both(case, device)
    leaves = {k: v.requires_grad_() for k, v in args.items()}
    y, final = ssd_chunk_scan(**leaves, **opts, chunk_size=chunk, return_final_states=True)
    y_ref, final_ref = ssd_ref(**leaves, **opts)
    assert max_err(y, y_ref) < 1e-10 * max(1, y_ref.abs().max().item())
    assert max_err(final, final_ref) < 1e-10 * max(1, final_ref.abs().max().item())

    dy, dfinal = torch.randn_like(y), torch.randn_like(final)
    names = list(leaves)
    grads = torch.autograd.grad((y * dy).sum() + (final * dfinal).sum(), [leaves[n] for n in names])
    grads_ref = torch.autograd.grad((y_ref * dy).sum() + (final_ref * dfinal).sum(), [leaves[n] for n in names])
    for name, g, g_ref in zip(names, grads, grads_ref, strict=True):
        assert max_err(g, g_ref) < 1e-9 * max(1, g_ref.abs().max().item()), name


@pytest.mark.parametrize("device", DEVICES)
def test_chunked_reference_matches_recurrence(device):
    args, opts, chunk = call_both(CASES[-1], device)
    y, final = ssd_chunked_ref(**args, **opts, chunk_size=chunk)
    y_ref, final_ref = ssd_ref(**args, **opts)
    assert max_err(y, y_ref) < 1e-10 and max_err(final, final_ref) < 1e-10


def test_gradcheck():
    args = make_inputs(1, 70, 2, 3, 1, 4, D="head", z=True, dt_bias=True, initial_states=True)
    names = list(args)
    seq = packed_seq_idx(1, 70, (30,))

    def fn(*tensors):
        kw = dict(zip(names, tensors, strict=True))
        return ssd_chunk_scan(**kw, chunk_size=64, dt_softplus=True, dt_limit=(0.0, 5.0), seq_idx=seq,
                              return_final_states=True)

    assert torch.autograd.gradcheck(fn, [args[n].requires_grad_() for n in names], atol=1e-7)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_within_error_budget(device, dtype):
    args = make_inputs(2, 300, 4, 16, 2, 32, device, dtype, D="head", z=True, dt_bias=True,
                       param_dtype=torch.float32)
    opts = dict(dt_softplus=True)
    y = ssd_chunk_scan(**args, **opts, chunk_size=128)
    args64 = {k: v.double() for k, v in args.items()}
    y_ref, _ = ssd_chunked_ref(**args64, **opts, chunk_size=128)
    y_plain, _ = ssd_chunked_ref(**args, **opts, chunk_size=128)
    assert y.dtype == dtype
    assert_within_budget(y, y_ref, y_plain, f"y {dtype}")


@pytest.mark.parametrize("device", DEVICES)
def test_varlen_states(device):
    lengths = [37, 0, 80, 1, 90]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device=device, dtype=torch.int32)
    total = int(cu[-1])
    args = make_inputs(1, total, 2, 4, 1, 8, device, initial_states=True)
    y, final, varlen = ssd_chunk_scan(**args, chunk_size=64, cu_seqlens=cu, return_final_states=True,
                                      return_varlen_states=True)
    y_ref, final_ref, varlen_ref = ssd_ref(**args, cu_seqlens=cu)
    assert varlen.shape == (len(lengths), 2, 4, 8)
    assert max_err(y, y_ref) < 1e-10 and max_err(final, final_ref) < 1e-10
    assert max_err(varlen, varlen_ref) < 1e-10
    assert varlen[1].abs().max() == 0


@pytest.mark.parametrize("device", DEVICES)
def test_varlen_with_padded_tail(device):
    """cu_seqlens may end before seqlen: the padding after the last sequence is one more sequence (Mamba-2's
    packed batches), which does not leak into the returned states."""
    cu = torch.tensor([0, 30, 70, 90], device=device, dtype=torch.int32)
    args = make_inputs(1, 100, 2, 4, 1, 8, device)
    y, varlen = ssd_chunk_scan(**args, chunk_size=64, cu_seqlens=cu, return_varlen_states=True)
    y_ref, _, varlen_ref = ssd_ref(**args, cu_seqlens=cu)
    assert max_err(y, y_ref) < 1e-10 and max_err(varlen, varlen_ref) < 1e-10


@pytest.mark.parametrize("device", DEVICES)
def test_packed_sequences_equal_separate_runs(device):
    """seq_idx restarts the state: a packed row equals the sequences run one by one."""
    args = make_inputs(1, 150, 2, 4, 1, 8, device)
    seq = packed_seq_idx(1, 150, (70,), device)
    y = ssd_chunk_scan(**args, chunk_size=64, seq_idx=seq)
    for lo, hi in ((0, 70), (70, 150)):
        part = {k: (v[:, lo:hi] if v.dim() > 1 else v) for k, v in args.items()}
        assert max_err(y[:, lo:hi], ssd_chunk_scan(**part, chunk_size=64)) < 1e-10


@pytest.mark.parametrize("device", DEVICES)
def test_causal(device):
    args = make_inputs(1, 140, 2, 4, 1, 8, device, z=True)
    y = ssd_chunk_scan(**args, chunk_size=64)
    t = 77
    for name in ("x", "dt", "B", "C", "z"):
        moved = {k: v.clone() for k, v in args.items()}
        moved[name][:, t] += 1.0
        y2 = ssd_chunk_scan(**moved, chunk_size=64)
        assert torch.equal(y[:, :t], y2[:, :t]), name
        assert not torch.equal(y[:, t:], y2[:, t:]), name


@pytest.mark.parametrize("device", DEVICES)
def test_batch_and_length_edges(device):
    for batch, seqlen in ((0, 10), (2, 0)):
        args = make_inputs(batch, seqlen, 2, 4, 1, 8, device, initial_states=True)
        leaves = {k: v.requires_grad_() for k, v in args.items()}
        y, final = ssd_chunk_scan(**leaves, chunk_size=64, return_final_states=True)
        assert y.shape == (batch, seqlen, 2, 4)
        assert torch.equal(final, args["initial_states"].detach())
        (y.sum() + final.sum()).backward()
        assert torch.equal(leaves["initial_states"].grad, torch.ones_like(final))


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_inputs(device):
    args = make_inputs(2, 100, 4, 8, 2, 8, device, z=True)
    strided = {k: v.transpose(0, 1).contiguous().transpose(0, 1) if v.dim() > 2 else v for k, v in args.items()}
    strided["x"] = torch.randn(2, 100, 4, 16, dtype=torch.float64, device=device)[..., ::2]
    args["x"] = strided["x"].contiguous()
    assert not strided["x"].is_contiguous()
    assert max_err(ssd_chunk_scan(**strided, chunk_size=64), ssd_chunk_scan(**args, chunk_size=64)) < 1e-12


@pytest.mark.parametrize("device", DEVICES)
def test_long_sequence_stays_finite(device):
    """L = 128K with dt at its limit: decays underflow to zero, never to NaN or Inf."""
    seqlen = 128 * 1024
    args = make_inputs(1, seqlen, 1, 4, 1, 4, device, torch.float32)
    args["dt"] = torch.full_like(args["dt"], 30.0)
    leaves = {k: v.requires_grad_() for k, v in args.items()}
    y, final = ssd_chunk_scan(**leaves, chunk_size=256, dt_softplus=True, dt_limit=(0.0, 20.0),
                              return_final_states=True)
    assert torch.isfinite(y).all() and torch.isfinite(final).all()
    (y.sum() + final.sum()).backward()
    assert all(torch.isfinite(t.grad).all() for t in leaves.values())


def test_nan_propagates():
    """The documented policy: a NaN at position t reaches every output from the start of t's chunk on (the chunk's
    matmuls mix its positions), and nothing in earlier chunks."""
    args = make_inputs(1, 200, 2, 4, 1, 4)
    args["x"][0, 70, 0, 0] = math.nan
    y = ssd_chunk_scan(**args, chunk_size=64)
    assert y[0, 64:, 0, 0].isnan().all() and not y[0, :64].isnan().any()


def test_mixed_parameter_dtypes():
    args = make_inputs(1, 80, 2, 8, 1, 8, dtype=torch.bfloat16, D="head", dt_bias=True, initial_states=True,
                       param_dtype=torch.float32)
    y, final = ssd_chunk_scan(**args, chunk_size=64, return_final_states=True)
    assert y.dtype == torch.bfloat16 and final.dtype == torch.float32


def test_opcheck():
    args = make_inputs(1, 70, 2, 3, 1, 4, D="head", z=True, dt_bias=True, initial_states=True)
    seq = packed_seq_idx(1, 70, (30,))
    cu = torch.tensor([0, 30, 70], dtype=torch.int32)
    a = [args[k] for k in ("x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_states")]
    for t in a:
        t.requires_grad_()
    fwd_args = (*a, seq, cu, 64, True, 0.0, math.inf)
    torch.library.opcheck(torch.ops.subq.ssd_chunk_scan_fwd.default, fwd_args)
    dy = torch.randn_like(args["x"])
    dfinal = torch.randn_like(args["initial_states"])
    bwd_args = (dy, dfinal, *[t.detach() for t in a], seq, 64, True, 0.0, math.inf)
    torch.library.opcheck(torch.ops.subq.ssd_chunk_scan_bwd.default, bwd_args)


def test_torch_compile_fullgraph():
    args = make_inputs(2, 90, 2, 4, 1, 8, "cpu", torch.float32, D="head", z=True)
    leaves = {k: v.requires_grad_() for k, v in args.items()}

    def fn(**kw):
        y, final = ssd_chunk_scan(**kw, chunk_size=64, dt_softplus=True, return_final_states=True)
        return y.square().sum() + final.sum()

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    out, out_ref = compiled(**leaves), fn(**leaves)
    assert torch.allclose(out, out_ref)
    g = torch.autograd.grad(out, list(leaves.values()))
    g_ref = torch.autograd.grad(out_ref, list(leaves.values()))
    assert all(torch.allclose(a, b) for a, b in zip(g, g_ref, strict=True))


BAD = [
    ("x", lambda a: a.update(x=a["x"][0]), ValueError, "x must be 4-D"),
    ("x int", lambda a: a.update(x=a["x"].long()), ValueError, "x must have a floating-point dtype"),
    ("B shape", lambda a: a.update(B=a["B"][:, :-1]), ValueError, "B must have shape"),
    ("C shape", lambda a: a.update(C=a["C"][..., :-1]), ValueError, "C must have B's shape"),
    ("groups", lambda a: a.update(B=a["B"].repeat(1, 1, 3, 1), C=a["C"].repeat(1, 1, 3, 1)), ValueError,
     "ngroups \\(3\\) must divide"),
    ("B dtype", lambda a: a.update(B=a["B"].float()), ValueError, "B.dtype must be x's dtype"),
    ("dt shape", lambda a: a.update(dt=a["dt"][..., :1]), ValueError, "dt must have shape"),
    ("A shape", lambda a: a.update(A=a["A"][None]), ValueError, "A must have shape"),
    ("A dtype", lambda a: a.update(A=a["A"].half()), ValueError, "A.dtype must be"),
    ("D shape", lambda a: a.update(D=torch.randn(3, dtype=torch.float64)), ValueError, "D must have shape"),
    ("z shape", lambda a: a.update(z=torch.randn(1, dtype=torch.float64)), ValueError, "z must have shape"),
    ("init shape", lambda a: a.update(initial_states=torch.randn(1, 2, dtype=torch.float64)), ValueError,
     "initial_states must have shape"),
    ("chunk", lambda a: a.update(chunk_size=100), ValueError, "chunk_size must be one of"),
    ("chunk float", lambda a: a.update(chunk_size=64.0), ValueError,
     "chunk_size must be one of .* got 64.0 \\(float\\)"),
    ("limit", lambda a: a.update(dt_limit=(1.0, 0.5)), ValueError, "dt_limit must be"),
    ("seq_idx dtype", lambda a: a.update(seq_idx=torch.zeros(2, 70)), ValueError, "seq_idx must be an int32"),
    ("seq_idx shape", lambda a: a.update(seq_idx=torch.zeros(2, 7, dtype=torch.int32)), ValueError,
     "seq_idx must have shape"),
    ("cu_seqlens batch", lambda a: a.update(cu_seqlens=torch.tensor([0, 70])), ValueError, "one batch row"),
    # values, checked without a host sync (torch._assert_async: RuntimeError on the CPU, a device assert on CUDA)
    ("seq_idx decreasing", lambda a: a.update(seq_idx=torch.tensor([[0] * 30 + [1] * 10 + [0] * 30] * 2)),
     RuntimeError, "seq_idx must be non-decreasing"),
    ("varlen without cu", lambda a: a.update(return_varlen_states=True), ValueError, "needs cu_seqlens"),
    ("headdim", lambda a: a.update(x=torch.randn(2, 70, 2, 129, dtype=torch.float64)), ValueError,
     "headdim must be in"),
    ("not a tensor", lambda a: a.update(dt=1.0), TypeError, "dt must be a torch.Tensor"),
]


@pytest.mark.parametrize("name,mutate,exc,match", BAD, ids=[b[0] for b in BAD])
def test_bad_inputs(name, mutate, exc, match):
    args = make_inputs(2, 70, 2, 4, 1, 8)
    args.update(chunk_size=64)
    mutate(args)
    with pytest.raises(exc, match=match):
        ssd_chunk_scan(**args)


@pytest.mark.parametrize("cu", [[0, 40, 30, 70], [-3, 40, 70], [0, 40, 80], [2, 40, 70]])
def test_bad_cu_seqlens_values(cu):
    """Boundaries that go back, start anywhere but 0 or end past seqlen would give meaningless states."""
    args = make_inputs(1, 70, 2, 4, 1, 8)
    with pytest.raises(RuntimeError, match="cu_seqlens must start at 0, never decrease, and end at most at x's seqlen"):
        ssd_chunk_scan(**args, chunk_size=64, cu_seqlens=torch.tensor(cu), return_varlen_states=True)
    raw = [args[n] for n in ("x", "dt", "A", "B", "C")] + [None] * 5
    with pytest.raises(RuntimeError, match="cu_seqlens must start at 0, never decrease, and end at most at x's seqlen"):
        torch.ops.subq.ssd_chunk_scan_fwd(*raw, torch.tensor(cu), 64, False, 0.0, float("inf"))
    with pytest.raises(RuntimeError, match="cu_seqlens must be int32 or int64"):
        torch.ops.subq.ssd_chunk_scan_fwd(*raw, torch.tensor(cu).float(), 64, False, 0.0, float("inf"))


def test_raw_op_refuses_a_chunk_size_below_one():
    """Which chunk sizes the op takes is subq.ops.ssd's rule (CHUNK_SIZES); the raw op keeps only the composite's
    chunk arithmetic defined: 0 would divide by zero."""
    args = make_inputs(1, 70, 2, 4, 1, 8)
    raw = [args[n] for n in ("x", "dt", "A", "B", "C")] + [None] * 6
    with pytest.raises(RuntimeError, match="chunk_size must be >= 1, got 0"):
        torch.ops.subq.ssd_chunk_scan_fwd(*raw, 0, False, 0.0, float("inf"))


@pytest.mark.gpu
def test_device_mismatch():
    args = make_inputs(1, 70, 2, 4, 1, 8)
    args["B"] = args["B"].cuda()
    with pytest.raises(ValueError, match="B is on cuda"):
        ssd_chunk_scan(**args, chunk_size=64)


# ---- the fused CUDA forward (opt-in until verified on a GPU) ---------------------------------------------------------

FUSED_CASES = [
    (2, 300, 4, 64, 1, 128, 256, {}),
    (1, 1, 2, 32, 1, 16, 64, {}),
    (2, 257, 6, 48, 3, 40, 128, {"D": "headdim", "z": True, "dt_bias": True, "dt_softplus": True,
                                 "dt_limit": (0.01, 0.5), "initial_states": True}),
    (1, 190, 4, 128, 2, 256, 64, {"seq_idx": (40, 64, 65, 128), "initial_states": True, "D": "head", "z": True}),
    (3, 1000, 8, 64, 1, 64, 256, {"D": "head", "z": True, "dt_softplus": True}),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", FUSED_CASES, ids=lambda c: f"L{c[1]}-H{c[2]}-P{c[3]}-G{c[4]}-N{c[5]}-Q{c[6]}")
def test_fused_cuda_forward(case, dtype, monkeypatch):
    opt_in(monkeypatch, "ssd_chunk_scan")
    batch, seqlen, nheads, headdim, ngroups, dstate, chunk, opts = case
    opts = dict(opts)
    tensor_opts = {k: opts.pop(k) for k in ("D", "z", "dt_bias", "initial_states") if k in opts}
    args = make_inputs(batch, seqlen, nheads, headdim, ngroups, dstate, "cuda", dtype, param_dtype=torch.float32,
                       **tensor_opts)
    if "seq_idx" in opts:
        opts["seq_idx"] = packed_seq_idx(batch, seqlen, opts["seq_idx"], "cuda")
    (y, final), names = run_profiled(
        lambda: ssd_chunk_scan(**args, **opts, chunk_size=chunk, return_final_states=True))
    assert launched(names, "chunk_scan_kernel"), "the fused kernels did not run"
    args64 = {k: v.double() for k, v in args.items()}
    y_ref, final_ref = ssd_chunked_ref(**args64, **opts, chunk_size=chunk)
    y_plain, final_plain = ssd_chunked_ref(**args, **opts, chunk_size=chunk)
    assert_within_budget(y, y_ref, y_plain, f"y {dtype}")
    assert_within_budget(final, final_ref, final_plain, f"final_states {dtype}")
    opt_in(monkeypatch, "ssd_chunk_scan", on=False)
    y_composite = ssd_chunk_scan(**args, **opts, chunk_size=chunk)
    assert max_err(y, y_composite) <= 2 * max_err(y_plain, y_ref) + 1e-3


# ---- the fused CUDA backward (same flag) ---------------------------------------------------------------------------

# Every chunk size, L % Q != 0, P and N off the 64-tiles (P = 80: a full and a partial P tile), groups, both D
# shapes, z, the whole dt chain, initial states, seq_idx; "final": False sends no gradient to the final states.
FUSED_BWD_CASES = [
    (2, 300, 4, 64, 1, 128, 256, {"D": "head", "dt_softplus": True}),
    (1, 1, 2, 32, 1, 16, 64, {"final": False}),
    (2, 257, 6, 48, 3, 40, 128, {"D": "headdim", "z": True, "dt_bias": True, "dt_softplus": True,
                                 "dt_limit": (0.01, 0.5), "initial_states": True}),
    (1, 190, 4, 128, 2, 256, 64, {"seq_idx": (40, 64, 65, 128), "initial_states": True, "D": "head", "z": True}),
    (2, 520, 4, 80, 1, 72, 256, {"z": True, "dt_bias": True, "dt_softplus": True, "seq_idx": (100, 256, 400),
                                 "final": False}),
    (1, 200, 6, 16, 2, 8, 128, {"D": "headdim", "dt_limit": (0.1, 0.3), "initial_states": True}),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", FUSED_BWD_CASES, ids=lambda c: f"L{c[1]}-H{c[2]}-P{c[3]}-G{c[4]}-N{c[5]}-Q{c[6]}")
def test_fused_cuda_backward(case, dtype, monkeypatch):
    """Every gradient of the fused path against float64 autograd through the chunked reference, within the error
    budget of the same reference run in the low precision (assert_within_budget also rejects NaN and Inf)."""
    opt_in(monkeypatch, "ssd_chunk_scan")
    batch, seqlen, nheads, headdim, ngroups, dstate, chunk, opts = case
    opts = dict(opts)
    with_final = opts.pop("final", True)
    tensor_opts = {k: opts.pop(k) for k in ("D", "z", "dt_bias", "initial_states") if k in opts}
    args = make_inputs(batch, seqlen, nheads, headdim, ngroups, dstate, "cuda", dtype, param_dtype=torch.float32,
                       **tensor_opts)
    if "seq_idx" in opts:
        opts["seq_idx"] = packed_seq_idx(batch, seqlen, opts["seq_idx"], "cuda")
    names = list(args)
    dy = torch.randn(batch, seqlen, nheads, headdim, device="cuda", dtype=dtype)
    dfinal = torch.randn(batch, nheads, headdim, dstate, device="cuda")

    def grads(inputs, run):
        leaves = {k: v.detach().clone().requires_grad_() for k, v in inputs.items()}
        y, final = run(leaves)
        loss = (y * dy.to(y.dtype)).sum()
        if with_final:
            loss = loss + (final * dfinal.to(final.dtype)).sum()
        return torch.autograd.grad(loss, [leaves[n] for n in names])

    def fused(leaves):
        return ssd_chunk_scan(**leaves, **opts, chunk_size=chunk, return_final_states=True)

    def reference(leaves):
        return ssd_chunked_ref(**leaves, **opts, chunk_size=chunk)

    got, kernels = run_profiled(lambda: grads(args, fused))
    assert launched(kernels, "chunk_dx_kernel"), "the fused backward did not run"
    ref = grads({k: v.double() for k, v in args.items()}, reference)
    plain = grads(args, reference)
    for name, g, g_ref, g_plain in zip(names, got, ref, plain, strict=True):
        assert g.dtype == args[name].dtype, name
        assert_within_budget(g, g_ref, g_plain, f"d{name} {dtype}")
