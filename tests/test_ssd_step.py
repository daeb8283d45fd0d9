"""subq.ops.ssd_step (one Mamba-2 decoding step, state updated in place) against the float64 reference."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import DEVICES, assert_opt_in, assert_within_budget, max_err, poison_cuda_allocator
from subq.ops import ssd_step
from subq.reference import ssd_step_ref

# (Bt, H, P, N, G): one group, several groups, heads = groups, channels and state sizes off the vector widths,
# Mamba-2's usual head (P = 64, N = 128)
SHAPES = [(2, 4, 3, 5, 1), (3, 6, 16, 16, 3), (1, 4, 7, 33, 4), (2, 8, 64, 128, 2), (0, 4, 8, 16, 2)]
# (D shape, z, dt_bias, dt_softplus, dt_limit)
OPTIONS = [
    (None, False, False, False, (0.0, math.inf)),
    ("h", True, True, True, (0.0, math.inf)),
    ("hp", False, True, True, (0.05, 0.3)),
    ("h", True, False, False, (-math.inf, 0.2)),
    ("hp", True, True, False, (0.0, math.inf)),
]
LOW_PRECISION = [torch.float32, torch.bfloat16, torch.float16]


def make_inputs(shape, options, dtype=torch.float64, param_dtype=torch.float32, state_dtype=None, device="cpu"):
    batch, heads, head_dim, state_dim, groups = shape
    d_shape, with_z, with_bias, softplus, limit = options
    opts = {"dtype": dtype, "device": device}
    p_opts = {"dtype": dtype if dtype == torch.float64 else param_dtype, "device": device}
    return {
        "state": torch.randn(batch, heads, head_dim, state_dim, dtype=state_dtype or dtype, device=device),
        "x": torch.randn(batch, heads, head_dim, **opts),
        "dt": (torch.rand(batch, heads, **opts) * 0.5) if not softplus else torch.randn(batch, heads, **opts) - 1,
        "A": -torch.rand(heads, **p_opts) * 2 - 0.1,
        "B": torch.randn(batch, groups, state_dim, **opts) / state_dim**0.5,
        "C": torch.randn(batch, groups, state_dim, **opts) / state_dim**0.5,
        "D": None if d_shape is None else torch.randn(heads, *((head_dim,) if d_shape == "hp" else ()), **p_opts),
        "z": torch.randn(batch, heads, head_dim, **opts) if with_z else None,
        "dt_bias": torch.randn(heads, **p_opts) * 0.1 if with_bias else None,
        "dt_softplus": softplus,
        "dt_limit": limit,
    }


def run_op(inputs):
    """(y, new_state) from the op, on a copy of the state."""
    args = dict(inputs)
    state = args.pop("state").clone()
    y = ssd_step(state, **args)
    return y, state


# ---- float64 against the reference ----------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("options", OPTIONS)
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference(shape, options, device):
    inputs = make_inputs(shape, options, device=device)
    before = inputs["state"].clone()
    y_ref, state_ref = ssd_step_ref(**inputs)
    assert torch.equal(inputs["state"], before), "the reference must not mutate"
    y, state = run_op(inputs)
    assert y.shape == inputs["x"].shape and y.dtype == torch.float64
    assert max_err(y, y_ref) < 1e-12
    assert max_err(state, state_ref) < 1e-12


def test_reference_is_the_formula_written_out():
    """One (b, h, p) by hand: softplus, clamp, decay, rank-1 update, readout, skip, gate."""
    inputs = make_inputs((2, 4, 3, 5, 2), ("hp", True, True, True, (0.1, 0.6)))
    y_ref, state_ref = ssd_step_ref(**inputs)
    b, h, p, g = 1, 3, 2, 1
    dt = F.softplus(inputs["dt"][b, h] + inputs["dt_bias"][h]).clamp(0.1, 0.6)
    new_row = torch.exp(dt * inputs["A"][h]) * inputs["state"][b, h, p] + dt * inputs["x"][b, h, p] * inputs["B"][b, g]
    y = (new_row @ inputs["C"][b, g] + inputs["D"][h, p] * inputs["x"][b, h, p]) * F.silu(inputs["z"][b, h, p])
    assert max_err(new_row, state_ref[b, h, p]) < 1e-14
    assert max_err(y, y_ref[b, h, p]) < 1e-14


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("groups", [1, 2])
def test_token_by_token_equals_the_sequential_recurrence(device, groups):
    """T steps of ssd_step from a zero state give the naive recurrence h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T,
    y_t = h_t C_t + D x_t, computed over the whole sequence with explicit per-head loops."""
    batch, heads, head_dim, state_dim, steps = 2, 4, 5, 6, 7
    opts = {"dtype": torch.float64, "device": device}
    x = torch.randn(steps, batch, heads, head_dim, **opts)
    dt = torch.rand(steps, batch, heads, **opts)
    A = -torch.rand(heads, **opts)
    B = torch.randn(steps, batch, groups, state_dim, **opts)
    C = torch.randn(steps, batch, groups, state_dim, **opts)
    D = torch.randn(heads, **opts)
    state = torch.zeros(batch, heads, head_dim, state_dim, **opts)
    ys = torch.stack([ssd_step(state, x[t], dt[t], A, B[t], C[t], D) for t in range(steps)])

    want = torch.empty_like(ys)
    for b in range(batch):
        for h in range(heads):
            g = h // (heads // groups)
            hidden = torch.zeros(head_dim, state_dim, **opts)
            for t in range(steps):
                hidden = torch.exp(dt[t, b, h] * A[h]) * hidden + dt[t, b, h] * torch.outer(x[t, b, h], B[t, b, g])
                want[t, b, h] = hidden @ C[t, b, g] + D[h] * x[t, b, h]
            assert max_err(state[b, h], hidden) < 1e-12
    assert max_err(ys, want) < 1e-12


@pytest.mark.parametrize("device", DEVICES)
def test_updates_non_contiguous_state_in_place(device):
    inputs = make_inputs((2, 4, 8, 16, 2), OPTIONS[1], device=device)
    y_ref, state_ref = ssd_step_ref(**inputs)
    args = dict(inputs)
    storage = args.pop("state").permute(3, 0, 1, 2).contiguous()  # (N, Bt, H, P): the N stride is not 1
    state = storage.permute(1, 2, 3, 0)
    pointer = state.data_ptr()
    y = ssd_step(state, **args)
    assert state.data_ptr() == pointer
    assert max_err(storage.permute(1, 2, 3, 0), state_ref) < 1e-12
    assert max_err(y, y_ref) < 1e-12


@pytest.mark.parametrize("device", DEVICES)
def test_strided_inputs(device):
    inputs = make_inputs((3, 4, 8, 16, 2), OPTIONS[2], device=device)
    y_ref, state_ref = ssd_step_ref(**inputs)
    for name in ("x", "B", "C"):
        t = inputs[name]
        inputs[name] = torch.stack([t, t], dim=-1).flatten(-2)[..., ::2]  # same values, last stride 2
    inputs["dt"] = inputs["dt"].t().contiguous().t()
    y, state = run_op(inputs)
    assert max_err(y, y_ref) < 1e-12 and max_err(state, state_ref) < 1e-12


# ---- low precision: the error budget --------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("state_fp32", [True, False])
@pytest.mark.parametrize("dtype", LOW_PRECISION)
# N = 0: state, B and C are empty (null data pointers on CUDA) and y is D x, gated
@pytest.mark.parametrize("shape", [(4, 8, 64, 128, 2), (3, 6, 7, 20, 3), (2, 4, 8, 0, 2)])
def test_low_precision_error_budget(shape, dtype, state_fp32, device):
    inputs = make_inputs(shape, OPTIONS[1], dtype, torch.float32, torch.float32 if state_fp32 else dtype, device)
    inputs64 = {k: v.double() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    y_ref, state_ref = ssd_step_ref(**inputs64)
    y_plain, state_plain = ssd_step_ref(**inputs)
    y, state = run_op(inputs)
    assert y.dtype == dtype and state.dtype == inputs["state"].dtype
    assert_within_budget(y, y_ref, y_plain, "y")
    assert_within_budget(state, state_ref, state_plain, "state")


# ---- opcheck, torch.compile -----------------------------------------------------------------------------------------


def _op_args(inputs):
    lo, hi = inputs["dt_limit"]
    keys = ("state", "x", "dt", "A", "B", "C", "D", "z", "dt_bias", "dt_softplus")
    return (*(inputs[k] for k in keys), lo, hi)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("options", [OPTIONS[0], OPTIONS[2], OPTIONS[3]])
def test_opcheck(device, dtype, options):
    inputs = make_inputs((2, 4, 8, 16, 2), options, dtype, device=device)
    torch.library.opcheck(torch.ops.subq.ssd_step.default, _op_args(inputs))


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    inputs = make_inputs((2, 4, 8, 16, 2), OPTIONS[1], torch.float32, device=device)
    args = dict(inputs)
    state_eager, state_compiled = args.pop("state"), inputs["state"].clone()

    def decode_two(state, **kw):
        first = ssd_step(state, **kw)
        return first + ssd_step(state, **kw)  # the second step reads the state the first one wrote

    compiled = torch.compile(decode_two, fullgraph=True, backend="aot_eager")
    out = compiled(state_compiled, **args)
    want = decode_two(state_eager, **args)
    assert max_err(out, want) < 1e-5
    assert max_err(state_compiled, state_eager) < 1e-5


# ---- bad input, NaN -------------------------------------------------------------------------------------------------


def test_errors_name_the_argument():
    base = make_inputs((2, 4, 3, 5, 2), ("h", True, True, False, (0.0, math.inf)), torch.float32)

    def call(**changes):
        return lambda: ssd_step(**{**base, **changes})

    cases = [
        (call(x=torch.randn(2, 4)), ValueError, "x must be 3-D (Bt, H, P)"),
        (call(state=torch.randn(2, 4, 3, 6)), ValueError, "state must have shape (Bt, H, P, N) = (2, 4, 3, 5)"),
        (call(dt=torch.randn(2, 3)), ValueError, "dt must have shape (Bt, H) = (2, 4)"),
        (call(A=torch.randn(3)), ValueError, "A must have shape (H,) = (4,)"),
        (call(B=torch.randn(2, 3, 5), C=torch.randn(2, 3, 5)), ValueError, "G = B.shape[1] = 3 must divide the heads"),
        (call(B=torch.randn(3, 2, 5)), ValueError, "B.shape[0] must be the batch size Bt = 2"),
        (call(C=torch.randn(2, 2, 4)), ValueError, "C must have shape B.shape (Bt, G, N) = (2, 2, 5)"),
        (call(D=torch.randn(4, 2)), ValueError, "D must have shape (H,) = (4,) or (H, P) = (4, 3)"),
        (call(z=torch.randn(2, 4, 4)), ValueError, "z must have shape x.shape"),
        (call(dt_bias=torch.randn(2)), ValueError, "dt_bias must have shape (H,) = (4,)"),
        (call(x=base["x"].int()), ValueError, "x must have a floating-point dtype"),
        (call(state=base["state"].long()), ValueError, "state must have a floating-point dtype"),
        (call(dt=base["dt"].int()), ValueError, "dt must have a floating-point dtype"),
        (call(B=base["B"].half()), ValueError, "B.dtype (torch.float16) must match x.dtype (torch.float32)"),
        (call(state=base["state"].double()), ValueError, "state.dtype must be x.dtype (torch.float32) or torch.flo"),
        (call(A=base["A"].half()), ValueError, "A.dtype must be x.dtype"),
        (call(D=base["D"].double()), ValueError, "D.dtype must be x.dtype"),
        (call(dt_bias=base["dt_bias"].half()), ValueError, "dt_bias.dtype must be x.dtype"),
        (call(z=base["z"].to("meta")), ValueError, "z is on meta but x is on cpu"),
        (call(state=base["state"].to("meta")), ValueError, "state is on meta but x is on cpu"),
        (call(A=base["A"].to("meta")), ValueError, "A is on meta but x is on cpu"),
        (call(dt_limit=(0.5, 0.1)), ValueError, "dt_limit must be (lo, hi) with lo <= hi"),
        (call(dt_limit=(float("nan"), 1.0)), ValueError, "dt_limit must be (lo, hi) with lo <= hi and no NaN"),
        (call(dt_limit=(0.1,)), TypeError, "dt_limit must be a (lo, hi) pair"),
        (call(dt_limit=0.1), TypeError, "dt_limit must be a (lo, hi) pair"),
        (call(dt_limit=("a", "b")), TypeError, "dt_limit[i] must be a real number"),
        (call(dt_softplus=1), TypeError, "dt_softplus must be a bool"),
        (call(state=[1.0]), TypeError, "state must be a torch.Tensor"),
    ]
    for fn, exc, message in cases:
        with pytest.raises(exc) as info:
            fn()
        assert message in str(info.value), f"{message!r} not in {info.value!r}"


def test_direct_op_calls_are_checked():
    """torch.ops.subq.ssd_step called directly (bypassing the Python checks) raises RuntimeError, not crash."""
    inputs = make_inputs((2, 4, 3, 5, 2), OPTIONS[0], torch.float32)
    args = list(_op_args(inputs))
    bad = {
        0: (torch.randn(2, 4, 3, 6), "state must have shape"),
        4: (torch.randn(2, 3, 5), "B must be \\(Bt, G, N\\) with G dividing H"),
        3: (torch.randn(4).int(), "A.dtype must be x.dtype"),
        11: (-1.0, "dt_limit must be"),
        1: (inputs["x"].to(torch.float8_e4m3fn), "x must be float16, bfloat16, float32 or float64"),
    }
    for index, (value, message) in bad.items():
        call = list(args)
        call[index] = value
        with pytest.raises(RuntimeError, match=message):
            torch.ops.subq.ssd_step(*call)

    # the state is written in place: an expanded state (rows sharing memory) or one aliasing an input is refused
    call = list(args)
    call[0] = args[0][:1].expand_as(args[0])
    with pytest.raises(RuntimeError, match="state is written in place, so its elements must not share memory"):
        torch.ops.subq.ssd_step(*call)
    call = list(args)
    call[1] = args[0].view(-1)[: args[1].numel()].view(args[1].shape)  # x (Bt, H, P) on the state's memory
    with pytest.raises(RuntimeError, match="state is written in place and must not share memory with x"):
        torch.ops.subq.ssd_step(*call)


@pytest.mark.parametrize("device", DEVICES)
def test_nan_policy(device):
    """A NaN in x[b, h, p] reaches state row (b, h, p) and y[b, h, p] only; a NaN in dt[b, h] all of head (b, h);
    nothing crosses batch entries. The clamp keeps NaN (like torch.clamp), it does not replace it by a limit."""
    inputs = make_inputs((2, 4, 3, 5, 2), ("h", True, True, True, (0.05, 0.3)), torch.float32, device=device)
    inputs["x"][0, 1, 2] = float("nan")
    inputs["dt"][1, 3] = float("nan")
    y, state = run_op(inputs)
    y_nan = torch.zeros_like(y, dtype=torch.bool)
    y_nan[0, 1, 2] = True
    y_nan[1, 3] = True
    assert torch.equal(torch.isnan(y), y_nan)
    state_nan = y_nan[..., None].expand_as(state)
    assert torch.equal(torch.isnan(state), state_nan)


# ---- CUDA specifics -------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("state_dim", [1, 16, 40, 64, 128, 256])
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("contiguous_state", [True, False])
def test_cuda_team_sizes_and_layouts(state_dim, state_dtype, contiguous_state):
    """Every team size (4..32 lanes), the vector and the scalar state path, P beyond one block's tile."""
    shape = (3, 8, 130, state_dim, 2)
    inputs = make_inputs(shape, OPTIONS[1], torch.bfloat16, torch.float32, state_dtype, "cuda")
    if not contiguous_state:
        inputs["state"] = inputs["state"].transpose(2, 3).contiguous().transpose(2, 3)
    inputs64 = {k: v.double() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    y_ref, state_ref = ssd_step_ref(**inputs64)
    y_plain, state_plain = ssd_step_ref(**inputs)
    poison_cuda_allocator()
    y, state = run_op(inputs)  # clone() keeps the strides, so the transposed layout reaches the kernel
    assert state.stride(3) == (1 if contiguous_state else 130)
    assert_within_budget(y, y_ref, y_plain, "y")
    assert_within_budget(state, state_ref, state_plain, "state")


@pytest.mark.gpu
def test_cuda_kernel_is_opt_in(monkeypatch):
    """Until verified on a GPU the kernel runs only with its opt-in flag set; the default CUDA path is
    the ATen composite."""
    inputs = make_inputs((3, 8, 64, 128, 2), OPTIONS[1], torch.bfloat16, torch.float32, torch.float32, "cuda")
    inputs64 = {k: v.double() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    y_ref, state_ref = ssd_step_ref(**inputs64)
    y_plain, state_plain = ssd_step_ref(**inputs)

    def run():
        y, state = run_op(inputs)
        assert_within_budget(y, y_ref, y_plain, "y")
        assert_within_budget(state, state_ref, state_plain, "state")

    assert_opt_in(monkeypatch, "ssd_step", ["ssd_step_kernel"], run)


@pytest.mark.gpu
def test_cuda_large_batch():
    inputs = make_inputs((512, 32, 64, 128, 8), OPTIONS[2], torch.bfloat16, torch.float32, torch.float32, "cuda")
    inputs64 = {k: v.double() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    y_ref, state_ref = ssd_step_ref(**inputs64)
    y_plain, state_plain = ssd_step_ref(**inputs)
    y, state = run_op(inputs)
    assert_within_budget(y, y_ref, y_plain, "y")
    assert_within_budget(state, state_ref, state_plain, "state")
