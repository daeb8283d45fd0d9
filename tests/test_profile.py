"""subq-profile: FLOP formulas against brute-force counts, the CLI end to end on the CPU, --compare, bad arguments."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

from subq.ops import FlashDecodeState
from subq.profile import check, cli, report
from subq.profile.check import own_state
from subq.profile.ops import OPS
from subq.profile.ops.base import PASSES, compiled
from subq.profile.ops.flash_step import flash_step_plain
from subq.profile.ops.grouped_matmul import group_sizes
from subq.profile.runner import make_call
from subq.reference import flash_chunked_ref, monarch_matmul_ref, ssd_ref
from subq.reference.monarch_conv import toeplitz

ROOT = Path(__file__).resolve().parents[1]
MATMUL_EVENTS = {"aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm"}
MONARCH_SIZES = [{"batch": 2, "seqlen": 24, "n": 64, "nblocks": 4}, {"batch": 1, "seqlen": 5, "n": 48, "nblocks": 16}]
SSD_SIZES = [
    {"batch": 2, "seqlen": 128, "nheads": 4, "headdim": 8, "dstate": 16, "ngroups": 2, "chunk_size": 64},
    {"batch": 1, "seqlen": 100, "nheads": 3, "headdim": 5, "dstate": 7, "ngroups": 1, "chunk_size": 64},  # padded
]
GAU_SIZES = [{"batch": 2, "seqlen": 300, "qk_dim": 8, "value_dim": 16, "causal": c} for c in (0, 1)]  # 2 key tiles
FLASH_STEP_SIZES = [{"batch": 2, "qk_dim": 8, "value_dim": 16, "chunk_size": 64, "position": t}
                    for t in (0, 64, 100)]  # the first token, a chunk's first (folds the state), one mid-chunk


def profiled_matmul_flops(fn) -> int:
    """Matmul FLOPs of every mm/bmm the dispatcher runs, C++ calls inside subq's ops included."""
    with profile(activities=[ProfilerActivity.CPU], with_flops=True, acc_events=True) as prof:
        fn()
    return sum(e.flops or 0 for e in prof.events() if e.name in MATMUL_EVENTS)


def counted_flops(fn) -> int:
    """Matmul FLOPs seen at the Python dispatch level (torch's FlopCounterMode)."""
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()


# ---- matmul FLOPs: what each timed callable executes --------------------------------------------------------------


@pytest.mark.parametrize("op", ["blockdiag_matmul", "monarch_matmul"])
@pytest.mark.parametrize("size", MONARCH_SIZES, ids=["tile", "small"])
@pytest.mark.parametrize("pass_name", PASSES)
def test_monarch_matmul_flops_match_the_executed_products(op, size, pass_name):
    spec = OPS[op]
    inputs = spec.make_inputs(size, torch.float32, torch.device("cpu"))
    for impl in spec.impls:
        call = make_call(impl, inputs, size, pass_name)
        assert profiled_matmul_flops(call) == impl.matmul_flops(size, pass_name), impl.name


@pytest.mark.parametrize("size", [{"tokens": 37, "groups": 5, "k": 16, "n": 24}, {"tokens": 3, "groups": 4, "k": 8,
                                                                                  "n": 8}], ids=["uneven", "empty"])
@pytest.mark.parametrize("pass_name", PASSES)
def test_grouped_matmul_flops_match_the_executed_products(size, pass_name):
    spec = OPS["grouped_matmul"]
    inputs = spec.make_inputs(size, torch.float32, torch.device("cpu"))
    for impl in spec.impls:
        call = make_call(impl, inputs, size, pass_name)
        assert profiled_matmul_flops(call) == impl.matmul_flops(size, pass_name), impl.name


@pytest.mark.parametrize("size", SSD_SIZES, ids=["groups", "padded"])
@pytest.mark.parametrize("pass_name", PASSES)
def test_ssd_matmul_flops_match_the_executed_products(size, pass_name):
    spec = OPS["ssd_chunk_scan"]
    inputs = spec.make_inputs(size, torch.float32, torch.device("cpu"))
    for name in ("subq", "ssd_chunked_ref"):
        impl = spec.impl(name)
        call = make_call(impl, inputs, size, pass_name)
        assert profiled_matmul_flops(call) == impl.matmul_flops(size, pass_name), name
    ref = spec.impl("ssd_chunked_ref")
    assert counted_flops(make_call(ref, inputs, size, pass_name)) == ref.matmul_flops(size, pass_name)


@pytest.mark.parametrize("causal", [0, 1])
@pytest.mark.parametrize("pass_name", PASSES)
def test_flash_reference_matmul_flops_match_the_executed_products(pass_name, causal):
    size = {"batch": 2, "seqlen": 100, "qk_dim": 8, "value_dim": 16, "chunk_size": 64, "causal": causal}  # padded
    spec = OPS["flash_chunk_attention"]
    inputs = spec.make_inputs(size, torch.float32, torch.device("cpu"))
    ref = spec.impl("flash_chunked_ref")
    assert counted_flops(make_call(ref, inputs, size, pass_name)) == ref.matmul_flops(size, pass_name)


@pytest.mark.parametrize("size", GAU_SIZES, ids=["bidirectional", "causal"])
@pytest.mark.parametrize("pass_name", PASSES)
def test_gau_matmul_flops_match_the_executed_products(size, pass_name):
    spec = OPS["gau_attention"]
    inputs = spec.make_inputs(size, torch.float32, torch.device("cpu"))
    for name in ("subq", "gau_attention_ref"):
        impl = spec.impl(name)
        assert profiled_matmul_flops(make_call(impl, inputs, size, pass_name)) == impl.matmul_flops(size, pass_name)
    ref = spec.impl("gau_attention_ref")
    assert counted_flops(make_call(ref, inputs, size, pass_name)) == ref.matmul_flops(size, pass_name)


@pytest.mark.parametrize("size", FLASH_STEP_SIZES, ids=["first", "fold", "mid"])
def test_flash_step_matmul_flops_match_the_executed_products(size):
    spec = OPS["flash_step"]
    inputs = spec.make_inputs(size, torch.float32, torch.device("cpu"))
    for impl in spec.impls:
        assert profiled_matmul_flops(make_call(impl, inputs, size, "fwd")) == impl.matmul_flops(size, "fwd"), impl.name
    plain = spec.impl("flash_step_plain")
    assert counted_flops(make_call(plain, inputs, size, "fwd")) == plain.matmul_flops(size, "fwd")


# monarch_conv (FFT estimate), causal_conv1d, rmsnorm_gated and ssd_step (elementwise counts) execute no matrix
# product that a counter could check exactly: their formulas are documented estimates, not tested against a count.


@pytest.mark.parametrize("size", SSD_SIZES, ids=["groups", "padded"])
def test_attention_matmul_flops_are_half_the_math_backends_square(size):
    spec = OPS["ssd_chunk_scan"]
    inputs = spec.make_inputs(size, torch.float32, torch.device("cpu"))
    impl = spec.impl("sdpa_causal")
    with sdpa_kernel(SDPBackend.MATH):
        square = counted_flops(make_call(impl, inputs, size, "fwd"))
    assert impl.matmul_flops(size, "fwd") * 2 == square
    assert impl.matmul_flops(size, "fwd+bwd") == 3.5 * impl.matmul_flops(size, "fwd")


@pytest.mark.parametrize("size", GAU_SIZES, ids=["bidirectional", "causal"])
def test_gau_attention_baseline_is_sdpa_at_the_same_width(size):
    spec = OPS["gau_attention"]
    inputs = spec.make_inputs(size, torch.float32, torch.device("cpu"))
    impl = spec.impl("sdpa")
    assert inputs["sdpa_q"].shape[1] * inputs["sdpa_q"].shape[-1] == size["value_dim"]  # E / S heads of S
    with sdpa_kernel(SDPBackend.MATH):
        square = counted_flops(make_call(impl, inputs, size, "fwd"))
    assert impl.matmul_flops(size, "fwd") * (2 if size["causal"] else 1) == square


# ---- useful FLOPs: the math, counted one scalar operation at a time -----------------------------------------------


def counted_recurrence(x, dt, A, B, C):
    """The SSD recurrence (batch 1, one group) in Python scalars, counting each multiply and add of the state update
    and the output. The decay exp(dt A) is one product and one exp per (t, h), not per state entry: not counted."""
    _, L, H, P = x.shape
    N = B.shape[-1]
    x, dt, A, B, C = (t.tolist() for t in (x[0], dt[0], A, B[0, :, 0], C[0, :, 0]))
    y = [[[0.0] * P for _ in range(H)] for _ in range(L)]
    flops = 0
    for h in range(H):
        state = [[0.0] * N for _ in range(P)]
        for t in range(L):
            a = math.exp(dt[t][h] * A[h])
            for p in range(P):
                u = dt[t][h] * x[t][h][p]
                flops += 1
                acc = 0.0
                for n in range(N):
                    state[p][n] = a * state[p][n] + u * B[t][n]
                    acc += state[p][n] * C[t][n]
                    flops += 3 + 2
                y[t][h][p] = acc
    return torch.tensor(y, dtype=torch.float64)[None], flops


def test_ssd_useful_flops_count_the_recurrence():
    size = {"batch": 1, "seqlen": 7, "nheads": 2, "headdim": 3, "dstate": 4, "ngroups": 1, "chunk_size": 64}
    spec = OPS["ssd_chunk_scan"]
    inputs = {k: v.detach().double() for k, v in spec.make_inputs(size, torch.float64, torch.device("cpu")).items()}
    y, flops = counted_recurrence(inputs["x"], inputs["dt"], inputs["A"], inputs["B"], inputs["C"])
    want, _ = ssd_ref(inputs["x"], inputs["dt"], inputs["A"], inputs["B"], inputs["C"])
    torch.testing.assert_close(y, want)  # the counter runs the real math
    for name in ("subq", "ssd_chunked_ref"):
        assert spec.impl(name).useful_flops(size, "fwd") == flops
        assert spec.impl(name).useful_flops(size, "fwd+bwd") == 3 * flops


def test_attention_useful_flops_count_the_causal_pairs():
    size = {"batch": 2, "seqlen": 9, "nheads": 3, "headdim": 5, "dstate": 4, "ngroups": 1, "chunk_size": 64}
    pairs = int(torch.ones(size["seqlen"], size["seqlen"]).tril().sum())  # (query, key) with key <= query
    per_pair = 2 * size["headdim"] + 2 * size["headdim"]  # q . k and p * v
    impl = OPS["ssd_chunk_scan"].impl("sdpa_causal")
    assert impl.useful_flops(size, "fwd") == size["batch"] * size["nheads"] * pairs * per_pair


def test_ssd_step_useful_flops_count_one_token_of_the_recurrence():
    size = {"batch": 1, "nheads": 2, "headdim": 3, "dstate": 4, "ngroups": 1}
    spec = OPS["ssd_step"]
    inputs = spec.make_inputs(size, torch.float64, torch.device("cpu"))
    token = [inputs[n][:, None] for n in ("x", "dt")] + [inputs["A"]] + [inputs[n][:, None] for n in ("B", "C")]
    _, flops = counted_recurrence(*token)
    assert flops == 2 * 3 * (5 * 4 + 1)
    for impl in spec.impls:
        assert impl.useful_flops(size, "fwd") == impl.matmul_flops(size, "fwd") == flops, impl.name


@pytest.mark.parametrize("causal", [0, 1])
def test_gau_useful_flops_count_the_attended_pairs(causal):
    size = {"batch": 2, "seqlen": 9, "qk_dim": 3, "value_dim": 5, "causal": causal}
    mask = torch.ones(9, 9)
    pairs = int((mask.tril() if causal else mask).sum())
    spec = OPS["gau_attention"]
    for name in ("subq", "gau_attention_ref"):  # one head: q . k over S, p v over E
        assert spec.impl(name).useful_flops(size, "fwd") == 2 * pairs * (2 * 3 + 2 * 5), name
    # softmax attention at the same width: E / S heads, each q . k over S and p v over S
    assert spec.impl("sdpa").useful_flops(size, "fwd") == 2 * pairs * (2 * 5 + 2 * 5)


def test_flash_step_useful_flops_sum_to_the_forward():
    """Over positions 0..L-1 the steps' useful FLOPs are flash_chunk_attention's, up to the last chunk's state (the
    forward never builds it; the steps do)."""
    b, S, E, C, L = 2, 3, 5, 64, 150
    step = OPS["flash_step"].subq
    total = sum(step.useful_flops({"batch": b, "qk_dim": S, "value_dim": E, "chunk_size": C, "position": t}, "fwd")
                for t in range(L))
    forward = OPS["flash_chunk_attention"].subq.useful_flops(
        {"batch": b, "seqlen": L, "qk_dim": S, "value_dim": E, "chunk_size": C, "causal": 1}, "fwd")
    assert total == forward + 2 * b * S * E * (L - 2 * C)


@pytest.mark.parametrize("op", ["blockdiag_matmul", "monarch_matmul"])
def test_monarch_useful_flops_count_the_factor_nonzeros(op):
    size = MONARCH_SIZES[0]
    spec = OPS[op]
    inputs = spec.make_inputs(size, torch.float64, torch.device("cpu"))
    factors = [inputs["w1"]] + ([inputs["w2"]] if "w2" in inputs else [])
    nonzeros = sum(int(torch.block_diag(*w.detach()).count_nonzero()) for w in factors)
    tokens = size["batch"] * size["seqlen"]
    assert spec.subq.useful_flops(size, "fwd") == 2 * tokens * nonzeros
    assert spec.impl("dense").useful_flops(size, "fwd") == 2 * tokens * int(inputs["dense_w"].count_nonzero())


def test_min_bytes_are_the_inputs_and_output_once():
    size = MONARCH_SIZES[0]
    spec, e = OPS["monarch_matmul"], 2
    tokens, n, nb = size["batch"] * size["seqlen"], size["n"], size["nblocks"]
    inputs, output = (tokens * n + 2 * nb * (n // nb) ** 2) * e, tokens * n * e
    assert spec.min_bytes(spec.subq, size, torch.bfloat16, "fwd") == inputs + output
    assert spec.min_bytes(spec.subq, size, torch.bfloat16, "fwd+bwd") == 3 * inputs + 2 * output


def test_ssd_step_min_bytes_read_and_write_the_state():
    size = {"batch": 2, "nheads": 4, "headdim": 3, "dstate": 5, "ngroups": 2}
    state = 2 * 4 * 3 * 5 * 4  # fp32, whatever the dtype
    token = 2 * 4 * 3 * 2 + 2 * 4 * 2 + 4 * 4 + 2 * (2 * 2 * 5 * 2)  # x, dt (bf16), A (fp32), B, C (bf16)
    spec = OPS["ssd_step"]
    for impl in spec.impls:
        assert spec.min_bytes(impl, size, torch.bfloat16, "fwd") == 2 * state + token + 2 * 4 * 3 * 2, impl.name


@pytest.mark.parametrize("position, state_matrices, cache_rows", [(0, 3, 1), (64, 4, 1), (100, 3, 37)],
                         ids=["first", "fold", "mid"])
def test_flash_step_min_bytes_follow_the_position(position, state_matrices, cache_rows):
    """chunk_kv read and written, lin_state read (and written when a chunk's first token folds the finished chunk
    in), the cache rows of the chunk so far: all fp32; the token's five inputs and the output in the dtype."""
    size = {"batch": 2, "qk_dim": 8, "value_dim": 16, "chunk_size": 64, "position": position}
    state = 4 * 2 * (state_matrices * 8 * 16 + cache_rows * (8 + 16))
    token = 2 * 2 * (4 * 8 + 16 + 16)
    spec = OPS["flash_step"]
    for impl in spec.impls:
        assert spec.min_bytes(impl, size, torch.bfloat16, "fwd") == state + token, impl.name


# ---- the new entries' callables: all run at the quick sizes; those computing subq's function agree with it --------

SAME_FUNCTION = {"ssd_step": ("ssd_step_ref", "mamba_einsum"), "gau_attention": ("gau_attention_ref",),
                 "flash_step": ("flash_step_plain",), "grouped_matmul": ("torch_loop",)}


@pytest.mark.parametrize("op", list(SAME_FUNCTION))
def test_every_callable_runs_at_the_quick_sizes_and_agrees_with_subq(op):
    spec = OPS[op]
    for size in spec.sizes(quick=True, overrides={}):
        inputs = spec.make_inputs(size, torch.float32, torch.device("cpu"))
        with torch.no_grad():
            outputs = {impl.name: impl.forward(own_state(spec, inputs), size) for impl in spec.impls}
        for name, out in outputs.items():
            assert out.numel() == inputs["dy"].numel() and torch.isfinite(out).all(), (name, size)  # SDPA: heads
        for name in SAME_FUNCTION[op]:
            torch.testing.assert_close(outputs[name], outputs["subq"], msg=f"{name} at {size}")


@pytest.mark.parametrize("op", ["ssd_step", "flash_step"])
def test_decode_baselines_update_the_state_as_subq_does(op):
    spec = OPS[op]
    size = spec.sizes(quick=True, overrides={})[0]
    inputs = spec.make_inputs(size, torch.float32, torch.device("cpu"))
    states = {impl.name: own_state(spec, inputs) for impl in spec.impls}
    with torch.no_grad():
        for impl in spec.impls:
            impl.forward(states[impl.name], size)
    for impl in spec.baselines:
        for name in spec.state:
            torch.testing.assert_close(states[impl.name][name], states["subq"][name], msg=f"{impl.name} {name}")
    assert any(not torch.equal(states["subq"][n], inputs[n]) for n in spec.state)  # the step did update it


def test_flash_step_plain_decodes_causal_flash_attention():
    """The baseline is the op's contract: L steps from an empty state give causal flash_chunk_attention."""
    b, L, S, E, C = 2, 100, 4, 6, 64
    q_quad, k_quad, q_lin, k_lin = (torch.randn(b, L, S, dtype=torch.float64) for _ in range(4))
    v = torch.randn(b, L, E, dtype=torch.float64)
    state = FlashDecodeState.allocate(b, C, S, E, dtype=torch.float64)
    steps = torch.stack([flash_step_plain(state, q_quad[:, t], k_quad[:, t], q_lin[:, t], k_lin[:, t], v[:, t],
                                          lin_scale=0.1) for t in range(L)], dim=1)
    want = flash_chunked_ref(q_quad, k_quad, q_lin, k_lin, v, chunk_size=C, causal=True, lin_scale=0.1)
    torch.testing.assert_close(steps, want)


# ---- the side-by-side baselines and the float64 check (what bench/bench_<op>.py ran before) -------------------------


def test_ssd_counts_are_one_formula_with_what_each_callable_executes():
    """The chunk algorithm's forward is 2 b c (G Q^2 N + H Q^2 P + 2 H Q N P); the reference executes C B^T once per
    head instead of per group, subq's backward recomputes steps 1, 3 and 4."""
    size = {"batch": 2, "seqlen": 300, "nheads": 6, "headdim": 8, "dstate": 16, "ngroups": 2, "chunk_size": 64}
    b, c, H, P, N, G, Q = 2, 5, 6, 8, 16, 2, 64
    spec = OPS["ssd_chunk_scan"]
    subq_fwd, ref_fwd = (spec.impl(n).matmul_flops(size, "fwd") for n in ("subq", "ssd_chunked_ref"))
    assert subq_fwd == 2 * b * c * (G * Q * Q * N + H * Q * Q * P + 2 * H * Q * N * P)
    assert ref_fwd - subq_fwd == 2 * b * c * (H - G) * Q * Q * N
    assert spec.impl("ssd_chunked_ref").matmul_flops(size, "fwd+bwd") == 3 * ref_fwd
    assert spec.subq.matmul_flops(size, "fwd+bwd") == 2 * b * c * (4 * G * Q * Q * N + 3 * H * Q * Q * P
                                                                   + 8 * H * Q * N * P)
    for name in ("subq_fused", "ssd_chunked_ref_compiled", "fla_chunk_simple_gla"):  # variants share their formula
        base = "subq" if name == "subq_fused" else "ssd_chunked_ref"
        assert spec.impl(name).matmul_flops(size, "fwd+bwd") == spec.impl(base).matmul_flops(size, "fwd+bwd")


def naive_simple_gla(q, k, v, g, scale):
    """Gated linear attention by its recurrence, S_t = exp(g_t) S_{t-1} + k_t v_t^T, o_t = scale q_t S_t, in
    flash-linear-attention's (batch, time, heads, features) layout."""
    state = q.new_zeros(q.shape[0], q.shape[2], q.shape[3], v.shape[3])
    out = []
    for t in range(q.shape[1]):
        state = g[:, t, :, None, None].exp() * state + k[:, t, :, :, None] * v[:, t, :, None, :]
        out.append(scale * torch.einsum("bhn,bhnp->bhp", q[:, t], state))
    return torch.stack(out, dim=1), state


def test_fla_formulation_computes_the_ssd(monkeypatch):
    """fla is not installed here: its kernel is replaced by the recurrence it computes, which checks the mapping of
    the SSD's inputs onto gated linear attention (q = C, k = B per head, v = dt x, g = dt A)."""
    fla_module = type(sys)("fla.ops.simple_gla")
    fla_module.chunk_simple_gla = lambda q, k, v, g, scale: naive_simple_gla(q, k, v, g, scale)
    monkeypatch.setitem(sys.modules, "fla.ops.simple_gla", fla_module)
    spec = OPS["ssd_chunk_scan"]
    size = {"batch": 2, "seqlen": 20, "nheads": 4, "headdim": 3, "dstate": 5, "ngroups": 2, "chunk_size": 64}
    inputs = check.in_float64(spec.make_inputs(size, torch.float64, torch.device("cpu")))
    with torch.no_grad():
        got = spec.impl("fla_chunk_simple_gla").forward(inputs, size)
        want = ssd_ref(*(inputs[n] for n in ("x", "dt", "A", "B", "C")))[0]
    torch.testing.assert_close(got, want)


def test_callables_that_cannot_run_here_are_skipped_with_a_reason():
    cpu = torch.device("cpu")
    skipped = OPS["ssd_chunk_scan"].skipped_on(cpu)
    assert {"subq_fused", "ssd_chunked_ref_compiled"} <= set(skipped)
    assert "CUDA" in skipped["ssd_chunked_ref_compiled"] and "SUBQ_EXPERIMENTAL_SSD_KERNELS" in skipped["subq_fused"]
    assert "torch._grouped_mm" in OPS["grouped_matmul"].skipped_on(cpu)["torch_grouped_mm"]
    names = [i.name for i in OPS["monarch_matmul"].impls_on(cpu)]
    assert names == ["subq", "two_bmm", "dense"]


def test_opt_in_variant_holds_its_flag_over_forward_and_backward():
    impl = OPS["monarch_matmul"].impl("subq_sm90")
    seen = []

    class Spy(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            seen.append(("fwd", os.environ.get(impl.flag)))
            return x.clone()

        @staticmethod
        def backward(ctx, dy):
            seen.append(("bwd", os.environ.get(impl.flag)))
            return dy

    spy = dataclasses.replace(impl, forward=lambda i, s: Spy.apply(i["x"]), leaves=("x",))
    inputs = {"x": torch.randn(3, 4, requires_grad=True), "dy": torch.randn(3, 4)}
    before = os.environ.get(impl.flag)
    make_call(spy, inputs, {}, "fwd+bwd")()
    make_call(dataclasses.replace(spy, flag=None), inputs, {}, "fwd")()
    assert seen == [("fwd", "1"), ("bwd", "1"), ("fwd", before)]
    assert os.environ.get(impl.flag) == before


def test_compiled_baseline_compiles_once_on_first_call(monkeypatch):
    calls = []

    def fake_compile(fn, dynamic):
        calls.append(dynamic)
        return fn

    monkeypatch.setattr(torch, "compile", fake_compile)
    reference = OPS["ssd_chunk_scan"].impl("ssd_chunked_ref")
    variant = compiled(reference)
    assert calls == [] and variant.name == "ssd_chunked_ref_compiled"
    size = SSD_SIZES[1]
    inputs = OPS["ssd_chunk_scan"].make_inputs(size, torch.float32, torch.device("cpu"))
    with torch.no_grad():
        for _ in range(2):
            torch.testing.assert_close(variant.forward(inputs, size), reference.forward(inputs, size))
    assert calls == [False]  # static shapes, compiled once
    assert variant.unavailable(torch.device("cuda")) is None and variant.unavailable(torch.device("cpu"))


def test_plan_counts_only_the_callables_that_run():
    args = cli.build_parser().parse_args(["--quick", "--device", "cpu", "--ops", "ssd_chunk_scan", "--fwd"])
    plan, _ = cli.make_plan(args)
    assert plan.steps() == 2 * 3  # two sizes; subq, the reference and SDPA (fused, compiled and fla need CUDA)


def test_two_bmm_is_the_monarch_product():
    """The Monarch baseline itself, forward and gradients, against the float64 reference."""
    size = MONARCH_SIZES[0]
    spec = OPS["monarch_matmul"]
    inputs = check.in_float64(spec.make_inputs(size, torch.float32, torch.device("cpu")))
    two_bmm = spec.impl("two_bmm")
    reference = dataclasses.replace(two_bmm, forward=lambda i, s: monarch_matmul_ref(i["x"], i["w1"], i["w2"]))
    got, want = (check.outputs(impl, inputs, size, gradients=True) for impl in (two_bmm, reference))
    assert got.keys() == {"y", "dx", "dw1", "dw2"}
    assert check.worst(got, want) < 1e-12


@pytest.mark.parametrize("op", ["monarch_matmul", "ssd_chunk_scan", "ssd_step", "grouped_matmul"])
def test_check_passes_subq_against_the_float64_baseline(op):
    spec = OPS[op]
    size = spec.sizes(quick=True, overrides={})[0]
    inputs = spec.make_inputs(size, torch.float32, torch.device("cpu"))
    result = check.check(spec, inputs, size, torch.float32, torch.device("cpu"), gradients="fwd+bwd" in spec.passes)
    assert result["ok"], result
    assert result["reference_dtype"] == "float64" and result["tol"] == 1e-4
    assert set(result["by_impl"]) == {"subq"}  # the opt-in variants are CUDA only


@pytest.mark.parametrize("wrong", ["output", "gradient", "raises"])
def test_check_fails_a_wrong_subq(wrong):
    """A subq whose output is off by 1 %, whose gradients are 1.5x, or that raises: each fails the check."""
    spec = OPS["monarch_matmul"]
    right = spec.subq.forward

    def forward(i, s):
        y = right(i, s)
        if wrong == "raises":
            raise RuntimeError("subq kernel: bad launch\nmore")
        return 1.01 * y if wrong == "output" else y.detach() + 1.5 * (y - y.detach())

    bad = dataclasses.replace(spec, impls=(dataclasses.replace(spec.subq, forward=forward), *spec.baselines))
    size = MONARCH_SIZES[0]
    inputs = bad.make_inputs(size, torch.float32, torch.device("cpu"))
    result = check.check(bad, inputs, size, torch.float32, torch.device("cpu"), gradients=True)
    assert not result["ok"]
    if wrong == "raises":
        assert result["errors"] == {"subq": "RuntimeError: subq kernel: bad launch"}
    else:
        assert result["max_rel_err"] > 100 * result["tol"]
    row = {"op": bad.name, "size_label": bad.label(size), "pass": "fwd", "impls": [], "check_subq_vs": result}
    assert report.checks_summary([row])["failed"] == 1
    assert "!!! CHECK FAILED monarch_matmul b2 L24 n64 nb4 vs float64 two_bmm" in report.table([row])


@pytest.mark.parametrize("skewed", [0, 1])
def test_grouped_matmul_routing_splits_every_token(skewed):
    size = {"tokens": 1000, "groups": 16, "k": 8, "n": 8, "skewed": skewed}
    counts = group_sizes(size)
    assert sum(counts) == 1000 and len(counts) == 16
    if skewed:
        assert counts == sorted(counts, reverse=True) and counts[0] > 600 and counts[-1] < 5
    else:
        assert max(counts) - min(counts) <= 1
    inputs = OPS["grouped_matmul"].make_inputs(size, torch.float32, torch.device("cpu"))
    assert inputs["group_sizes"].tolist() == counts and inputs["offsets"][-1] == 1000


@pytest.mark.parametrize("bidirectional", [0, 1])
def test_monarch_conv_useful_flops_count_the_toeplitz_entries(bidirectional):
    size = {"batch": 2, "channels": 3, "seqlen": 10, "bidirectional": bidirectional}
    spec = OPS["monarch_conv"]
    inputs = spec.make_inputs(size, torch.float64, torch.device("cpu"))
    entries = int(toeplitz(inputs["k"].detach(), 10, inputs.get("k_rev")).count_nonzero())
    for impl in spec.impls:
        assert impl.useful_flops(size, "fwd") == 2 * 2 * entries, impl.name
    assert ("k_rev" in inputs) == bool(bidirectional)


def test_flash_bidirectional_useful_flops_count_every_pair_in_a_chunk():
    b, L, S, E, C = 2, 100, 3, 5, 64
    size = {"batch": b, "seqlen": L, "qk_dim": S, "value_dim": E, "chunk_size": C, "causal": 0}
    pairs = 64 * 64 + 36 * 36
    assert OPS["flash_chunk_attention"].subq.useful_flops(size, "fwd") == b * (pairs * (2 * S + 2 * E) + 4 * S * E * L)


# ---- the CLI end to end on the CPU ---------------------------------------------------------------------------------

TINY = ["--quick", "--device", "cpu", "--seqlen", "64", "--grid", "n=64", "nblocks=4", "headdim=16", "dstate=16",
        "causal=1", "position=127", "--repeats", "2", "--no-progress"]
ROW_KEYS = {"op", "size_label", "pass", "input_sets", "impls", "ms", "tflops", "pct_peak", "useful_tflops", "gbs",
            "pct_bandwidth", "matmul_flops", "useful_flops", "min_bytes", "intensity", "speedup_subq_vs", "errors",
            "check_subq_vs", "skipped", "peak_extra_bytes"}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("profile")
    assert cli.main([*TINY, "--out", str(out)]) == 0
    return out


def test_cli_writes_json_in_the_bench_results_schema(tiny_run):
    payload = json.loads((tiny_run / "profile_cpu.json").read_text())
    bench = json.loads((ROOT / "bench" / "results" / "monarch_h100.json").read_text())
    assert payload.keys() == bench.keys()
    assert {"ms", "tflops", "pct_peak", "speedup_subq_vs", "errors", "pass"} <= bench["rows"][0].keys()
    assert payload["peak"]["matmul_tflops"] > 0 and payload["peak"]["copy_gbs"] > 0
    assert payload["env"]["timer"] == "perf_counter"
    # quick grids with the overrides: one size per op (seqlen=64; monarch nblocks=4; one causal, one position);
    # two passes each, one for a decode step
    assert len(payload["rows"]) == sum(len(spec.passes) for spec in OPS.values())
    for row in payload["rows"]:
        assert ROW_KEYS <= row.keys()
        assert row["errors"] == {}
        assert all(row["ms"][impl] > 0 for impl in row["impls"])
        assert row["speedup_subq_vs"].keys() == set(row["impls"][1:])
        assert row.get("seqlen", 64) == 64
    assert {row["op"] for row in payload["rows"]} == set(OPS)


def test_cli_writes_csv_and_png(tiny_run):
    payload = json.loads((tiny_run / "profile_cpu.json").read_text())
    with (tiny_run / "profile_cpu.csv").open() as f:
        lines = list(csv.DictReader(f))
    assert len(lines) == sum(len(row["impls"]) for row in payload["rows"])
    assert all(float(line["ms"]) > 0 for line in lines)
    pytest.importorskip("matplotlib")
    png = (tiny_run / "profile_cpu.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_cli_quick_default_grid_fwd_only(tmp_path, capsys):
    assert cli.main(["--quick", "--device", "cpu", "--fwd", "--repeats", "1", "--no-progress",
                     "--out", str(tmp_path)]) == 0
    payload = json.loads((tmp_path / "profile_cpu.json").read_text())
    assert {row["pass"] for row in payload["rows"]} == {"fwd"}
    assert len(payload["rows"]) == sum(len(spec.sizes(True, {})) for spec in OPS.values())
    table = capsys.readouterr().out
    assert "TFLOP/s" in table and "%peak" in table and "speedup" in table


NEW_OPS = ["monarch_conv", "flash_chunk_attention", "causal_conv1d", "rmsnorm_gated", "ssd_step", "gau_attention",
           "flash_step", "grouped_matmul"]


def test_list_names_every_op(capsys):
    assert cli.main(["--list"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in NEW_OPS)


def test_quick_run_of_the_new_ops_writes_rows(tmp_path):
    argv = ["--quick", "--device", "cpu", "--ops", *NEW_OPS, "--seqlen", "256", "--repeats", "1", "--no-progress"]
    assert cli.main([*argv, "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "profile_cpu.json").read_text())["rows"]
    for name in NEW_OPS:
        mine = [row for row in rows if row["op"] == name]
        assert {row["pass"] for row in mine} == set(OPS[name].passes), name
        for row in mine:
            assert row["errors"] == {}, name
            assert all(row["ms"][impl] > 0 for impl in row["impls"]), name
            assert row["check_subq_vs"]["max_rel_err"] < 1e-3, name
            assert row["min_bytes"]["subq"] > 0 and row["useful_flops"]["subq"] > 0, name


def test_without_matplotlib_everything_but_the_plot_is_written(tmp_path, capsys, monkeypatch):
    def missing(*args, **kwargs):
        raise ImportError("No module named 'matplotlib'")

    monkeypatch.setattr(cli.roofline, "plot", missing)
    argv = ["--quick", "--device", "cpu", "--ops", "blockdiag_matmul", "--fwd", "--repeats", "1", "--no-progress"]
    assert cli.main([*argv, "--out", str(tmp_path)]) == 0
    assert capsys.readouterr().err.strip().splitlines() == [
        "subq-profile: no roofline plot: matplotlib is not installed (pip install matplotlib)"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blockdiag_matmul_cpu.csv", "blockdiag_matmul_cpu.json"]


def test_compare_prints_the_ratio_per_row(tiny_run, tmp_path, capsys):
    a = tiny_run / "profile_cpu.json"
    payload = json.loads(a.read_text())
    for row in payload["rows"]:
        row["ms"] = {impl: 2 * ms for impl, ms in row["ms"].items()}
    b = tmp_path / "slower.json"
    b.write_text(json.dumps(payload))
    capsys.readouterr()
    assert cli.main(["--compare", str(a), str(b)]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.rstrip().endswith(" 2")]
    assert len(lines) == sum(len(row["impls"]) for row in payload["rows"])


def test_compare_reads_the_bench_results(capsys):
    bench = ROOT / "bench" / "results" / "monarch_h100.json"
    assert cli.main(["--compare", str(bench), str(bench)]) == 0
    out = capsys.readouterr().out
    assert out.count(" 1\n") == 3 * len(json.loads(bench.read_text())["rows"])


# ---- bad arguments: one line, exit status 2, no traceback ----------------------------------------------------------


def assert_one_line_error(capsys, argv, needle):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    assert err.startswith("subq-profile: error:") and needle in err, err


@pytest.mark.parametrize("argv, needle", [
    (["--ops", "flash_attention"], "unknown op 'flash_attention'"),
    (["--dtype", "fp8", "--device", "cpu"], "--dtype 'fp8'"),
    (["--device", "tpu"], "--device"),
    (["--device", "cpu", "--seqlen", "abc"], "invalid int value"),
    (["--device", "cpu", "--ops", "monarch_matmul", "--grid", "n=100", "nblocks=16"], "not a multiple"),
    (["--device", "cpu", "--grid", "n"], "AXIS=V"),
    (["--device", "cpu", "--ops", "monarch_matmul", "--grid", "dstate=16"], "no selected op has that axis"),
    (["--device", "cpu", "--ops", "ssd_chunk_scan", "--grid", "chunk_size=32"], "chunk_size"),
    (["--device", "cpu", "--ops", "ssd_step", "--bwd"], "ssd_step has no backward"),
    (["--device", "cpu", "--ops", "gau_attention", "--grid", "causal=2"], "causal must be 0 or 1"),
    (["--device", "cpu", "--ops", "gau_attention", "--grid", "qk_dim=100"], "must divide value_dim"),
    (["--device", "cpu", "--ops", "flash_step", "--grid", "position=-1"], "position must be at least 0"),
    (["--compare", "/nonexistent/a.json", "/nonexistent/b.json"], "cannot read"),
    (["--device", "cpu", "--ops", "rmsnorm_gated", "--repeats", "0"], "--repeats must be at least 1, got 0"),
    (["--device", "cpu", "--ops", "rmsnorm_gated", "--threads", "0"], "--threads must be at least 1, got 0"),
    (["--device", "cpu", "--ops", "grouped_matmul", "--grid", "skewed=2"], "skewed must be 0 or 1"),
    (["--device", "cpu", "--ops", "rmsnorm_gated", "--seqlen", "0"], "L0 D4096: every size must be at least 1"),
    (["--device", "cpu", "--ops", "rmsnorm_gated", "--batch", "-1"], "b-1 L1024 D4096: every size must be at least 1"),
])
def test_bad_arguments(capsys, argv, needle):
    assert_one_line_error(capsys, argv, needle)


def test_size_that_does_not_fit(capsys):
    argv = ["--device", "cpu", "--ops", "monarch_matmul", "--seqlen", "100000000", "--grid", "n=65536", "nblocks=4"]
    assert_one_line_error(capsys, argv, "needs about")


def test_memory_is_estimated_before_allocating(capsys, monkeypatch):
    monkeypatch.setattr(cli, "free_bytes", lambda device: 2**20)
    assert_one_line_error(capsys, ["--quick", "--device", "cpu", "--ops", "ssd_chunk_scan"], "choose smaller sizes")


def test_dtype_the_device_cannot_run(capsys, monkeypatch):
    import subq.profile.device as device

    real = device._probe

    def no_half(dtype, dev):
        if dtype == torch.float16:
            raise RuntimeError('"addmm_impl_cpu_" not implemented for \'Half\'')
        real(dtype, dev)

    monkeypatch.setattr(device, "_probe", no_half)
    assert_one_line_error(capsys, ["--device", "cpu", "--dtype", "fp16"], "cannot run torch.float16")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message for a machine without CUDA")
def test_cuda_requested_without_a_gpu(capsys):
    assert_one_line_error(capsys, ["--device", "cuda"], "no CUDA device")


def test_module_entry_point_exits_with_one_line():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "python"),
                                                                     os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-m", "subq.profile", "--ops", "nope"], capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"subq-profile: error: unknown op 'nope'; known ops: {', '.join(OPS)}"]
