"""subq.ops.rmsnorm_gated (Mamba-2's gated RMSNorm) against the float64 reference."""

from __future__ import annotations

import pytest
import torch

from conftest import DEVICES, assert_opt_in, assert_within_budget, max_err, poison_cuda_allocator
from subq.ops import rmsnorm_gated
from subq.reference import rmsnorm_gated_ref

BATCH_SHAPES = [(), (0,), (5,), (2, 3), (2, 1, 3)]
# (dim, group_size): one group, a width that is no vector multiple, several groups, groups above the one-warp size
# (one block per group on CUDA), odd groups
DIMS = [(64, None), (37, None), (48, 16), (2200, 1100), (45, 9)]
GATES = ["none", "before", "after"]  # no z; norm(x) * silu(z); norm(x * silu(z))
LOW_PRECISION = [torch.float32, torch.bfloat16, torch.float16]


def make_inputs(batch, dim, gate, dtype=torch.float64, weight_dtype=None, device="cpu", requires_grad=False):
    x = torch.randn(*batch, dim, dtype=dtype, device=device)
    weight = 1 + 0.3 * torch.randn(dim, dtype=weight_dtype or dtype, device=device)
    z = None if gate == "none" else torch.randn(*batch, dim, dtype=dtype, device=device)
    tensors = [t for t in (x, weight, z) if t is not None]
    for t in tensors:
        t.requires_grad_(requires_grad)
    return x, weight, z


def kwargs(group_size, gate):
    return {"group_size": group_size, "norm_before_gate": gate != "after"}


# ---- float64 against the reference ----------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("dim,group_size", DIMS)
@pytest.mark.parametrize("batch", BATCH_SHAPES)
def test_matches_reference(batch, dim, group_size, gate, device):
    x, weight, z = make_inputs(batch, dim, gate, device=device, requires_grad=True)
    y = rmsnorm_gated(x, weight, z, eps=1e-5, **kwargs(group_size, gate))
    ref = rmsnorm_gated_ref(x, weight, z, eps=1e-5, **kwargs(group_size, gate))
    assert y.shape == x.shape and y.dtype == x.dtype
    assert max_err(y, ref) < 1e-12
    inputs = [t for t in (x, weight, z) if t is not None]
    dy = torch.randn_like(y)
    got = torch.autograd.grad(y, inputs, dy)
    want = torch.autograd.grad(ref, inputs, dy)
    for name, g, w in zip(("dx", "dweight", "dz"), got, want, strict=False):
        assert g.shape == w.shape, name
        assert max_err(g, w) < 1e-11, name


@pytest.mark.parametrize("device", DEVICES)
def test_saved_statistic_is_the_group_rstd(device):
    x = torch.randn(7, 48, dtype=torch.float32, device=device)
    weight = torch.ones(48, device=device)
    y, rstd = torch.ops.subq.rmsnorm_gated_fwd(x, weight, None, 1e-6, 16, True)
    want = torch.rsqrt(x.double().reshape(7, 3, 16).square().mean(-1) + 1e-6)
    assert rstd.shape == (7, 3) and rstd.dtype == torch.float32
    assert max_err(rstd, want) < 1e-5 * want.abs().max().item()


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_inputs(device):
    base = torch.randn(6, 2, 96, dtype=torch.float64, device=device)
    weight = torch.randn(48, dtype=torch.float64, device=device)
    cases = {
        "strided features": (base[:, 0, ::2], torch.randn(6, 48, dtype=torch.float64, device=device)),
        "row slice": (base[:, 1, 5:53], base[:, 0, 40:88]),
        "transposed": (torch.randn(48, 6, dtype=torch.float64, device=device).t(), None),
        "expanded": (torch.randn(1, 48, dtype=torch.float64, device=device).expand(5, -1), None),
    }
    for name, (x, z) in cases.items():
        for before in (True, False):
            got = rmsnorm_gated(x, weight, z, group_size=24, norm_before_gate=before)
            want = rmsnorm_gated_ref(x, weight, z, group_size=24, norm_before_gate=before)
            assert max_err(got, want) < 1e-12, name
            assert got.is_contiguous(), f"{name}: the fake kernel promises a contiguous output"


# ---- low precision: the error budget --------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("weight_fp32", [False, True])
@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("dim,group_size", [(64, None), (200, 40), (2200, 1100)])
@pytest.mark.parametrize("rows", [33, 0])  # no rows: empty tensors' null data pointers reach the kernels
def test_low_precision_error_budget(rows, dim, group_size, dtype, gate, weight_fp32, device):
    x, weight, z = make_inputs((rows,), dim, gate, dtype, torch.float32 if weight_fp32 else dtype, device, True)
    inputs = [t for t in (x, weight, z) if t is not None]
    inputs64 = [t.detach().double().requires_grad_() for t in inputs]
    kw = kwargs(group_size, gate)
    y = rmsnorm_gated(x, weight, z, **kw)
    plain = rmsnorm_gated_ref(x, weight, z, **kw)
    ref = rmsnorm_gated_ref(*inputs64[:2], inputs64[2] if z is not None else None, **kw)
    assert y.dtype == dtype
    assert_within_budget(y, ref, plain, "y")
    dy = torch.randn_like(y)
    got = torch.autograd.grad(y, inputs, dy)
    plain_grads = torch.autograd.grad(plain, inputs, dy.to(plain.dtype))
    ref_grads = torch.autograd.grad(ref, inputs64, dy.double())
    for name, t, g, pg, rg in zip(("dx", "dweight", "dz"), inputs, got, plain_grads, ref_grads, strict=False):
        assert g.dtype == t.dtype, name
        assert_within_budget(g, rg, pg, name)


# ---- gradcheck, opcheck, torch.compile ------------------------------------------------------------------------------


@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("group_size", [None, 3])
def test_gradcheck(gate, group_size):
    x, weight, z = make_inputs((2, 3), 6, gate, requires_grad=True)
    fn = lambda x, w, z: rmsnorm_gated(x, w, z, eps=1e-3, **kwargs(group_size, gate))  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, weight, z))


def test_partial_gradients():
    x, weight, z = make_inputs((4,), 12, "after")
    z.requires_grad_()
    (dz,) = torch.autograd.grad(rmsnorm_gated(x, weight, z, group_size=4, norm_before_gate=False).sum(), (z,))
    (want,) = torch.autograd.grad(rmsnorm_gated_ref(x, weight, z, group_size=4, norm_before_gate=False).sum(), (z,))
    assert max_err(dz, want) < 1e-12


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("gate", GATES)
def test_opcheck(device, dtype, gate):
    x, weight, z = make_inputs((9,), 32, gate, dtype, device=device, requires_grad=True)
    before = gate != "after"
    torch.library.opcheck(torch.ops.subq.rmsnorm_gated_fwd.default, (x, weight, z, 1e-6, 8, before))
    y, rstd = torch.ops.subq.rmsnorm_gated_fwd(x.detach(), weight.detach(), z, 1e-6, 8, before)
    z_plain = None if z is None else z.detach()
    for mask in ([True, True, True], [False, True, False], [True, False, True]):
        args = (torch.randn_like(y), x.detach(), weight.detach(), z_plain, rstd, 8, before, mask)
        torch.library.opcheck(torch.ops.subq.rmsnorm_gated_bwd.default, args)


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    x, weight, z = make_inputs((2, 5), 48, "before", torch.float32, device=device, requires_grad=True)

    def f(x, weight, z):
        return rmsnorm_gated(x, weight, z, group_size=16).sin().sum() + rmsnorm_gated(x, weight).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out, want = compiled(x, weight, z), f(x, weight, z)
    assert max_err(out, want) < 1e-4
    for g, r in zip(torch.autograd.grad(out, (x, weight, z)), torch.autograd.grad(want, (x, weight, z)), strict=True):
        assert max_err(g, r) < 1e-4


# ---- bad input, NaN -------------------------------------------------------------------------------------------------


def test_errors_name_the_argument():
    x, w, z = torch.randn(3, 16), torch.randn(16), torch.randn(3, 16)
    cases = [
        (lambda: rmsnorm_gated(x, torch.randn(15)), ValueError, "weight must have shape (features of x,) = (16,)"),
        (lambda: rmsnorm_gated(x, w, torch.randn(3, 8)), ValueError, "z must have shape x.shape"),
        (lambda: rmsnorm_gated(x, w.half()), ValueError, "weight.dtype must be x.dtype (torch.float32) or torch.fl"),
        (lambda: rmsnorm_gated(x.half(), w.double()), ValueError, "weight.dtype must be x.dtype (torch.float16)"),
        (lambda: rmsnorm_gated(x, w, z.double()), ValueError, "z.dtype (torch.float64) must match x.dtype"),
        (lambda: rmsnorm_gated(x.long(), w), ValueError, "x must have a floating-point dtype"),
        (lambda: rmsnorm_gated(x, w.int()), ValueError, "weight must have a floating-point dtype"),
        (lambda: rmsnorm_gated(x, w, z.int()), ValueError, "z must have a floating-point dtype"),
        (lambda: rmsnorm_gated(x, w.to("meta")), ValueError, "weight is on meta but x is on cpu"),
        (lambda: rmsnorm_gated(x, w, z.to("meta")), ValueError, "z is on meta but x is on cpu"),
        (lambda: rmsnorm_gated(x, w, group_size=5), ValueError, "group_size must be a positive divisor of x.shape[-1]"),
        (lambda: rmsnorm_gated(x, w, group_size=0), ValueError, "group_size must be a positive divisor"),
        (lambda: rmsnorm_gated(x, w, group_size=4.0), TypeError, "group_size must be an int, got 4.0 (float)"),
        (lambda: rmsnorm_gated(x, w, group_size=True), TypeError, "group_size must be an int, got True (bool)"),
        (lambda: rmsnorm_gated(x, w, eps=-1.0), ValueError, "eps must be finite and >= 0"),
        (lambda: rmsnorm_gated(x, w, eps="1e-6"), TypeError, "eps must be a real number"),
        (lambda: rmsnorm_gated(x, w, norm_before_gate=1), TypeError, "norm_before_gate must be a bool"),
        (lambda: rmsnorm_gated(torch.tensor(1.0), w), ValueError, "at least 1 dimension"),
        (lambda: rmsnorm_gated(torch.randn(3, 0), torch.randn(0)), ValueError, "at least one feature"),
        (lambda: rmsnorm_gated([1.0], w), TypeError, "x must be a torch.Tensor"),
    ]
    for fn, exc, message in cases:
        with pytest.raises(exc) as info:
            fn()
        assert message in str(info.value), f"{message!r} not in {info.value!r}"


def test_direct_op_calls_are_checked():
    """torch.ops.subq.* called directly (bypassing the Python checks) raise RuntimeError, not crash."""
    x, w = torch.randn(3, 16), torch.randn(16)
    with pytest.raises(RuntimeError, match="group_size must be positive and divide"):
        torch.ops.subq.rmsnorm_gated_fwd(x, w, None, 1e-6, 5, True)
    with pytest.raises(RuntimeError, match="weight.shape\\[0\\] must be 16"):
        torch.ops.subq.rmsnorm_gated_fwd(x, torch.randn(8), None, 1e-6, 16, True)
    # a NaN, infinite or negative eps would turn the output NaN without an error
    for eps in (float("nan"), float("inf"), -1.0):
        with pytest.raises(RuntimeError, match="eps must be finite and >= 0"):
            torch.ops.subq.rmsnorm_gated_fwd(x, w, None, eps, 16, True)
    with pytest.raises(RuntimeError, match="rstd must be the"):
        torch.ops.subq.rmsnorm_gated_bwd(x, x, w, None, torch.randn(3, 2), 16, True, [True, True, False])
    with pytest.raises(RuntimeError, match="x must be float16, bfloat16, float32 or float64"):
        torch.ops.subq.rmsnorm_gated_fwd(x.int(), w, None, 1e-6, 16, True)
    # float8 passes at::isFloatingType; the glue must not hand it to a kernel as 16-bit elements
    with pytest.raises(RuntimeError, match="x must be float16, bfloat16, float32 or float64"):
        torch.ops.subq.rmsnorm_gated_fwd(x.to(torch.float8_e4m3fn), w, None, 1e-6, 16, True)


@pytest.mark.parametrize("device", DEVICES)
def test_nan_stays_in_its_group(device):
    """Policy: a NaN in x poisons its own (row, group) through the statistic and nothing else; a NaN in z with the
    gate after the norm reaches its own element only, with the gate before it the whole group."""
    x, weight, z = make_inputs((4,), 32, "before", torch.float32, device=device)
    x[1, 3] = float("nan")
    z[2, 20] = float("nan")
    y = rmsnorm_gated(x, weight, z, group_size=16)
    nan = torch.isnan(y)
    expected = torch.zeros_like(nan)
    expected[1, :16] = True
    expected[2, 20] = True
    assert torch.equal(nan, expected)
    y = rmsnorm_gated(x, weight, z, group_size=16, norm_before_gate=False)
    expected[2, 16:] = True
    assert torch.equal(torch.isnan(y), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("gate", ["before", "after"])
def test_extreme_gates_match_the_reference(gate, dtype):
    """The CPU's fused loops compute silu with their own exp: its clamps (exp saturates to 0 below -87 and to inf
    above 88) must give ATen's results at and past them, with infinities and NaN, forward and backward."""
    x, weight, z = make_inputs((3,), 40, gate, torch.float32)
    z[0, :8] = torch.tensor([-1e4, -100.0, -88.5, -87.0, 87.0, 88.5, 100.0, 1e4])
    z[1, 0], z[1, 5], z[2, 7] = float("inf"), -float("inf"), float("nan")
    x, weight, z = (t.to(dtype).requires_grad_() for t in (x, weight, z))
    dy = torch.randn(3, 40).to(dtype)
    y = rmsnorm_gated(x, weight, z, **kwargs(20, gate))
    grads = torch.autograd.grad(y, (x, weight, z), dy)
    refs = [t.detach().double().requires_grad_() for t in (x, weight, z)]
    y_ref = rmsnorm_gated_ref(*refs, **kwargs(20, gate))
    grads_ref = torch.autograd.grad(y_ref, refs, dy.double())
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for got, want in zip((y, *grads), (y_ref, *grads_ref)):
        torch.testing.assert_close(got.double(), want.to(got.dtype).double(), rtol=tol, atol=tol, equal_nan=True)


# ---- CUDA specifics -------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("dim,group_size", [(4096, 512), (4100, 4100), (24, 8), (8192, 2048)])
def test_cuda_writes_every_element_and_is_deterministic(dtype, dim, group_size):
    """Vector and scalar paths, warp and block units; NaN-poisoned allocator; the weight gradient bitwise equal
    on repeated runs (fixed-order reduction)."""
    poison_cuda_allocator()
    x, weight, z = make_inputs((3001,), dim, "before", dtype, torch.float32, "cuda", True)
    y = rmsnorm_gated(x, weight, z, group_size=group_size)
    assert torch.isfinite(y).all()
    dy = torch.randn_like(y)
    first = torch.autograd.grad(y, (x, weight, z), dy, retain_graph=True)
    second = torch.autograd.grad(y, (x, weight, z), dy)
    for a, b in zip(first, second, strict=True):
        assert torch.isfinite(a).all()
        assert torch.equal(a, b)
    ref = rmsnorm_gated_ref(x.double(), weight.double(), z.double(), group_size=group_size)
    plain = rmsnorm_gated_ref(x, weight, z, group_size=group_size)
    assert_within_budget(y, ref, plain, "y")


@pytest.mark.gpu
def test_cuda_kernels_are_opt_in(monkeypatch):
    """Until verified on a GPU the kernels run only with SUBQ_EXPERIMENTAL_MAMBA2_KERNELS=1; the default CUDA path is
    the ATen composite."""
    x, weight, z = make_inputs((257,), 1024, "before", torch.bfloat16, torch.float32, "cuda", True)
    ref = rmsnorm_gated_ref(x.double(), weight.double(), z.double(), group_size=256)
    plain = rmsnorm_gated_ref(x, weight, z, group_size=256)
    dy = torch.randn_like(plain)
    grads_plain = torch.autograd.grad(plain, (x, weight, z), dy)
    leaves64 = [t.detach().double().requires_grad_() for t in (x, weight, z)]
    grads_ref = torch.autograd.grad(rmsnorm_gated_ref(*leaves64, group_size=256), leaves64, dy.double())

    def run():
        y = rmsnorm_gated(x, weight, z, group_size=256)
        assert_within_budget(y, ref, plain, "y")
        for name, g, pg, rg in zip(("dx", "dweight", "dz"), torch.autograd.grad(y, (x, weight, z), dy), grads_plain,
                                   grads_ref, strict=True):
            assert_within_budget(g, rg, pg, name)

    kernels = ["rmsnorm_gated_fwd_kernel", "rmsnorm_gated_bwd_kernel"]
    assert_opt_in(monkeypatch, "SUBQ_EXPERIMENTAL_MAMBA2_KERNELS", kernels, run)


@pytest.mark.gpu
def test_cuda_misaligned_rows_take_the_scalar_path():
    base = torch.randn(17, 129, device="cuda", dtype=torch.bfloat16)
    x = base[:, 1:]  # rows start one element past a 16-byte boundary
    weight = torch.randn(128, device="cuda")
    y = rmsnorm_gated(x, weight, group_size=64)
    ref = rmsnorm_gated_ref(x.double(), weight.double(), group_size=64)
    assert_within_budget(y, ref, rmsnorm_gated_ref(x, weight, group_size=64), "y")
