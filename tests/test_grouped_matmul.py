"""subq.ops.grouped_matmul against the float64 reference (python/subq/reference/grouped_matmul.py)."""

from __future__ import annotations

import pytest
import torch

import subq
from conftest import DEVICES, assert_opt_in, assert_within_budget, max_err, opt_in, poison_cuda_allocator, run_profiled
from subq.ops import grouped_matmul
from subq.reference import grouped_matmul_ref

# (group sizes, rows past their sum, K, N)
CASES = [
    ([3, 5, 2], 0, 4, 6),            # plain
    ([0, 4, 0, 3, 0], 0, 5, 3),      # empty groups, first and last included
    ([2, 3], 4, 6, 5),               # sum < T: a zero tail
    ([7], 0, 3, 4),                  # G = 1
    ([7], 3, 16, 8),                 # G = 1 with a tail
    ([0, 0], 0, 4, 4),               # T = 0
    ([], 3, 4, 5),                   # G = 0: every row is tail
    ([37, 1, 90, 0, 13], 5, 24, 40),  # sizes that are not tile multiples; K, N multiples of 8 (the kernel path)
    ([13, 29], 3, 7, 9),             # K, N not multiples of the vector width (the padded path on CUDA)
    ([33, 2, 0, 61, 5, 40], 9, 12, 66),  # more groups than threads, uneven sizes
]
LOW_PRECISION = [torch.float32, torch.bfloat16, torch.float16]


def make_case(sizes, tail, k, n, *, dtype=torch.float64, device="cpu", bias=True, sizes_dtype=torch.int64):
    """Unit activations, 1/sqrt(K) weights: outputs O(1) in every dtype."""
    tokens, groups = sum(sizes) + tail, len(sizes)
    x = torch.randn(tokens, k, device=device).to(dtype)
    w = (torch.randn(groups, k, n, device=device) / k**0.5).to(dtype)
    b = torch.randn(groups, n, device=device).to(dtype) if bias else None
    return x, w, torch.tensor(sizes, dtype=sizes_dtype, device=device), b


def leaves(*tensors):
    """Fresh leaves that require grad; integer tensors (the group sizes) and None pass through."""
    return [t.detach().clone().requires_grad_() if t is not None and t.is_floating_point() else t for t in tensors]


def grads(y, inputs, dy):
    """Gradients of <y, dy> w.r.t. the inputs that are not None (zeros for inputs y does not depend on)."""
    wanted = [t for t in inputs if t is not None]
    if not y.requires_grad:  # the reference with no groups never touches w
        return [torch.zeros_like(t) for t in wanted]
    return torch.autograd.grad(y, wanted, dy, allow_unused=True, materialize_grads=True)


# ---- against the reference, float64 ---------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("case", CASES)
def test_matches_reference(case, with_bias, device):
    x, w, sizes, b = make_case(*case, device=device, bias=with_bias)
    x, w, b = leaves(x, w, b)
    y = grouped_matmul(x, w, sizes, b)
    ref = grouped_matmul_ref(x, w, sizes, b)
    assert y.shape == ref.shape and y.dtype == x.dtype
    assert max_err(y, ref) < 1e-12
    dy = torch.randn_like(y)
    for name, got, want in zip(("dx", "dw", "dbias"), grads(y, (x, w, b), dy), grads(ref, (x, w, b), dy),
                               strict=False):
        assert max_err(got, want) < 1e-12, name


@pytest.mark.parametrize("threads", [1, 3])
def test_cpu_thread_split_matches_reference(threads):
    """The CPU op at other intra-op thread counts than the machine's (one GEMM per group, each threaded)."""
    x, w, sizes, b = leaves(*make_case([70, 3, 0, 101, 26], 11, 8, 67))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        y = grouped_matmul(x, w, sizes, b)
        dy = torch.randn_like(y)
        got = grads(y, (x, w, b), dy)
    finally:
        torch.set_num_threads(before)
    ref = grouped_matmul_ref(x, w, sizes, b)
    assert max_err(y, ref) < 1e-12
    for name, g, want in zip(("dx", "dw", "dbias"), got, grads(ref, (x, w, b), dy), strict=True):
        assert max_err(g, want) < 1e-12, name


@pytest.mark.parametrize("device", DEVICES)
def test_tail_rows_are_zero_and_groups_use_their_own_weight(device):
    x, w, sizes, b = make_case([4, 0, 3], 5, 8, 8, device=device)
    y = grouped_matmul(x, w, sizes, b)
    assert (y[7:] == 0).all()
    w2 = w.clone()
    w2[2] += 1.0
    moved = (grouped_matmul(x, w2, sizes, b) != y).any(dim=1)
    assert moved[4:7].all() and not moved[:4].any() and not moved[7:].any()


@pytest.mark.parametrize("device", DEVICES)
def test_group_sizes_dtypes_agree(device):
    x, w, sizes, b = make_case([5, 0, 6], 2, 8, 16, device=device)
    want = grouped_matmul(x, w, sizes, b)
    for dtype in (torch.int32, torch.int16, torch.uint8):
        assert max_err(grouped_matmul(x, w, sizes.to(dtype), b), want) == 0, dtype


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_inputs(device):
    x, w, sizes, b = make_case([6, 9], 1, 8, 16, device=device)
    x_strided = torch.randn(16, 24, dtype=x.dtype, device=device)[:, 3:11]
    w_t = w.transpose(1, 2).contiguous().transpose(1, 2)
    b_strided = torch.randn(2, 32, dtype=x.dtype, device=device)[:, ::2]
    assert max_err(grouped_matmul(x_strided, w_t, sizes, b_strided),
                   grouped_matmul_ref(x_strided, w, sizes, b_strided)) < 1e-12


# ---- low precision: the error budget --------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("case", [([37, 0, 90, 13], 5, 24, 40), ([13, 29], 3, 7, 9), ([200], 0, 64, 32)])
def test_low_precision_error_budget(case, dtype, device):
    x, w, sizes, b = leaves(*make_case(*case, dtype=dtype, device=device))
    y = grouped_matmul(x, w, sizes, b)
    plain = grouped_matmul_ref(x, w, sizes, b)
    x64, w64, b64 = leaves(x.double(), w.double(), b.double())
    ref = grouped_matmul_ref(x64, w64, sizes, b64)
    assert y.dtype == dtype
    assert_within_budget(y, ref, plain, "y")
    dy = torch.randn_like(y)
    for name, g, pg, rg in zip(("dx", "dw", "dbias"), grads(y, (x, w, b), dy), grads(plain, (x, w, b), dy),
                               grads(ref, (x64, w64, b64), dy.double()), strict=True):
        assert g.dtype == dtype, name
        assert_within_budget(g, rg, pg, name)


# ---- gradcheck, opcheck, torch.compile -----------------------------------------------------------------------------


@pytest.mark.parametrize("case", [([2, 0, 3], 1, 3, 2), ([4], 0, 2, 3)])
def test_gradcheck(case):
    x, w, sizes, b = leaves(*make_case(*case))
    assert torch.autograd.gradcheck(lambda x, w, b: grouped_matmul(x, w, sizes, b), (x, w, b))
    assert torch.autograd.gradcheck(lambda x, w: grouped_matmul(x, w, sizes), (x, w))


def test_partial_gradients():
    x, w, sizes, b = make_case([3, 4], 2, 3, 5)
    b.requires_grad_()
    (got,) = torch.autograd.grad(grouped_matmul(x, w, sizes, b).sum(), (b,))
    (want,) = torch.autograd.grad(grouped_matmul_ref(x, w, sizes, b).sum(), (b,))
    assert max_err(got, want) < 1e-12


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck(device, dtype):
    x, w, sizes, b = leaves(*make_case([5, 0, 6], 2, 8, 16, dtype=dtype, device=device))
    torch.library.opcheck(torch.ops.subq.grouped_matmul_fwd.default, (x, w, sizes, b))
    torch.library.opcheck(torch.ops.subq.grouped_matmul_fwd.default, (x, w, sizes, None))
    dy = torch.randn(x.shape[0], w.shape[2], dtype=dtype, device=device)
    for mask in ([True, True, True], [False, True, False], [True, False, False]):
        args = (dy, x.detach(), w.detach(), sizes, mask)
        torch.library.opcheck(torch.ops.subq.grouped_matmul_bwd.default, args)


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    x, w, sizes, b = leaves(*make_case([5, 0, 6], 2, 8, 16, dtype=torch.float32, device=device))

    def f(x, w, sizes, b):
        return grouped_matmul(x, w, sizes, b).sin().sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out, want = compiled(x, w, sizes, b), f(x, w, sizes, b)
    assert max_err(out, want) < 1e-5
    for got, ref in zip(torch.autograd.grad(out, (x, w, b)), torch.autograd.grad(want, (x, w, b)), strict=True):
        assert max_err(got, ref) < 1e-5


# ---- bad input ------------------------------------------------------------------------------------------------------


def test_errors_name_the_argument():
    x, w, sizes, b = make_case([2, 3], 1, 4, 5, dtype=torch.float32)
    cases = [
        (lambda: grouped_matmul(x[0], w, sizes), ValueError, "x must be 2-D (tokens, in_features)"),
        (lambda: grouped_matmul(x, w[0], sizes), ValueError, "w must be 3-D (groups, in_features, out_features)"),
        (lambda: grouped_matmul(x[:, :3], w, sizes), ValueError, "x.shape[1] must be in_features = w.shape[1] = 4"),
        (lambda: grouped_matmul(x, w.double(), sizes), ValueError, "w.dtype (torch.float64) must match x.dtype"),
        (lambda: grouped_matmul(x, w, sizes, b.half()), ValueError, "bias.dtype (torch.float16) must match x.dtype"),
        (lambda: grouped_matmul(x, w.to("meta"), sizes), ValueError, "w is on meta but x is on cpu"),
        (lambda: grouped_matmul(x, w, sizes.to("meta")), ValueError, "group_sizes is on meta but x is on cpu"),
        (lambda: grouped_matmul(x, w, sizes, b.to("meta")), ValueError, "bias is on meta but x is on cpu"),
        (lambda: grouped_matmul(x, w, sizes.float()), ValueError, "group_sizes must be an integer tensor"),
        (lambda: grouped_matmul(x, w, sizes[:1]), ValueError, "group_sizes must have shape (groups,) = (2,)"),
        (lambda: grouped_matmul(x, w, [2, 3]), TypeError, "group_sizes must be a torch.Tensor"),
        (lambda: grouped_matmul(x, w, sizes, b[:, :4]), ValueError, "bias must have shape (groups, out_features)"),
        (lambda: grouped_matmul(x.long(), w.long(), sizes), ValueError, "x must have a floating-point dtype"),
        (lambda: grouped_matmul(x, w, torch.tensor([3, -1])), ValueError, "group_sizes[1] = -1"),
        (lambda: grouped_matmul(x, w, torch.tensor([4, 3])), ValueError, "must sum to at most x.shape[0] = 6"),
        # a running sum that would overflow int64 is caught at the group that passes the rows
        (lambda: grouped_matmul(x, w, torch.tensor([1, 2**63 - 1])), ValueError,
         "group_sizes[:2] already sums past it"),
    ]
    for fn, exc, message in cases:
        with pytest.raises(exc) as info:
            fn()
        assert message in str(info.value), f"{message!r} not in {info.value!r}"


def test_bad_sizes_in_the_backward():
    x, w, _, _ = make_case([2, 3], 1, 4, 5)
    with pytest.raises(ValueError, match="must be non-negative"):
        torch.ops.subq.grouped_matmul_bwd(torch.randn(6, 5, dtype=x.dtype), x, w, torch.tensor([-1, 2]),
                                          [True, True, True])


def test_direct_op_calls_are_checked():
    """torch.ops.subq.* called directly (bypassing the Python checks) raise, not crash."""
    x, w, sizes, b = make_case([2, 3], 1, 4, 5)
    with pytest.raises(RuntimeError, match=r"x.shape\[1\] must be 4"):
        torch.ops.subq.grouped_matmul_fwd(x[:, :3], w, sizes, None)
    with pytest.raises(RuntimeError, match="group_sizes must be an integer tensor"):
        torch.ops.subq.grouped_matmul_fwd(x, w, sizes.double(), None)
    with pytest.raises(RuntimeError, match=r"bias.shape\[1\] must be 5"):
        torch.ops.subq.grouped_matmul_fwd(x, w, sizes, b[:, :2])
    with pytest.raises(RuntimeError, match=r"dy.shape\[0\] must be 6"):
        torch.ops.subq.grouped_matmul_bwd(torch.randn(5, 5, dtype=x.dtype), x, w, sizes, [True, True, True])
    with pytest.raises(RuntimeError, match="x must be float16, bfloat16, float32 or float64"):
        torch.ops.subq.grouped_matmul_fwd(x.int(), w.int(), sizes, None)


def test_nan_stays_in_its_group():
    x, w, sizes, _ = make_case([3, 4], 1, 4, 5, dtype=torch.float32)
    x[1, 2] = float("nan")
    y = grouped_matmul(x, w, sizes)
    assert torch.isnan(y[1]).all() and torch.isfinite(y[[0, 2, 3, 4, 5, 6, 7]]).all()


# ---- CUDA specifics -------------------------------------------------------------------------------------------------


def _needs_kernels():
    if not subq.cuda_built():
        pytest.skip("this build has no CUDA kernels (CPU-only extension)")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("case", [([37, 0, 90, 13], 5, 24, 40), ([13, 29], 3, 7, 9), ([], 4, 8, 8), ([0, 0], 3, 8, 8)])
def test_cuda_kernels_write_every_element(case, dtype):
    x, w, sizes, b = leaves(*make_case(*case, dtype=dtype, device="cuda"))
    poison_cuda_allocator()
    y = grouped_matmul(x, w, sizes, b)
    assert torch.isfinite(y).all()
    assert (y[sum(case[0]):] == 0).all()
    for g in grads(y, (x, w, b), torch.randn_like(y)):
        assert torch.isfinite(g).all()


@pytest.mark.gpu
@pytest.mark.parametrize("kernels", [True, False], ids=["cutlass", "composite"])
def test_cuda_never_waits_for_the_host(kernels, monkeypatch):
    if not kernels:
        opt_in(monkeypatch, "grouped_matmul", on=False)
    x, w, sizes, b = leaves(*make_case([37, 0, 90, 13], 5, 24, 40, dtype=torch.bfloat16, device="cuda"))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        y = grouped_matmul(x, w, sizes, b)
        torch.autograd.grad(y, (x, w, b), torch.ones_like(y))
        grouped_matmul(x[:, :7], w[:, :7], sizes, b)  # the padded path
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
def test_cuda_kernels_are_opt_in(monkeypatch):
    """Until verified on a GPU the CUTLASS kernels run only with their opt-in flag set; the default CUDA
    path is the expanded composite."""
    x, w, sizes, b = leaves(*make_case([64, 0, 200, 31], 9, 64, 128, dtype=torch.bfloat16, device="cuda"))
    plain = grouped_matmul_ref(x, w, sizes, b)
    x64, w64, b64 = leaves(x.double(), w.double(), b.double())
    ref = grouped_matmul_ref(x64, w64, sizes, b64)
    dy = torch.randn_like(plain)
    grads_plain, grads_ref = grads(plain, (x, w, b), dy), grads(ref, (x64, w64, b64), dy.double())

    def run():
        y = grouped_matmul(x, w, sizes, b)
        assert_within_budget(y, ref, plain, "y")
        for name, g, pg, rg in zip(("dx", "dw", "dbias"), grads(y, (x, w, b), dy), grads_plain, grads_ref,
                                   strict=True):
            assert_within_budget(g, rg, pg, name)

    assert_opt_in(monkeypatch, "grouped_matmul", ["GemmGrouped"], run)


@pytest.mark.gpu
def test_cuda_aligned_shapes_take_one_cutlass_launch():
    _needs_kernels()
    x, w, sizes, b = make_case([64, 0, 200, 31], 9, 64, 128, dtype=torch.bfloat16, device="cuda")
    _, names = run_profiled(lambda: grouped_matmul(x, w, sizes, b))
    assert sum("GemmGrouped" in name for name in names) == 1, names


@pytest.mark.gpu
def test_cuda_invalid_sizes_are_clamped():
    """The device cannot report bad sizes without a sync; it clamps them and stays in bounds."""
    _needs_kernels()
    x, w, _, b = make_case([10, 10, 10], 0, 16, 8, dtype=torch.float32, device="cuda")
    for sizes, clamped in (([-5, 12, 4], [0, 12, 4]), ([20, 20, 20], [20, 10, 0]), ([2**40, 1, 1], [30, 0, 0])):
        y = grouped_matmul(x, w, torch.tensor(sizes, device="cuda"), b)
        want = grouped_matmul_ref(x.double(), w.double(), torch.tensor(clamped), b.double())
        assert max_err(y, want) < 1e-4, sizes


@pytest.mark.gpu
def test_cuda_misaligned_pointers_take_the_padded_path():
    x, w, sizes, b = make_case([30, 17], 2, 16, 24, dtype=torch.float16, device="cuda")
    x_offset = torch.randn(x.numel() + 1, device="cuda").half()[1:].view_as(x)
    ref = grouped_matmul_ref(x_offset.double(), w.double(), sizes, b.double())
    assert_within_budget(grouped_matmul(x_offset, w, sizes, b), ref, grouped_matmul_ref(x_offset, w, sizes, b), "y")


@pytest.mark.gpu
def test_cuda_tf32_switch():
    x, w, sizes, b = make_case([300, 0, 500], 10, 256, 128, dtype=torch.float32, device="cuda")
    ref = grouped_matmul_ref(x.double(), w.double(), sizes, b.double())
    previous = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        exact = max_err(grouped_matmul(x, w, sizes, b), ref)
        torch.backends.cuda.matmul.allow_tf32 = True
        tf32 = max_err(grouped_matmul(x, w, sizes, b), ref)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    scale = ref.abs().max().item()
    assert exact < 1e-5 * scale, exact
    assert tf32 < 1e-2 * scale, tf32


@pytest.mark.gpu
def test_cuda_many_groups_and_rows():
    """More groups than the setup kernel's block (its chunked scan) and rows beyond one wave of tiles."""
    sizes = torch.randint(0, 300, (700,)).tolist()
    sizes[5] = 0
    x, w, group_sizes, b = leaves(*make_case(sizes, 77, 64, 32, dtype=torch.bfloat16, device="cuda"))
    y = grouped_matmul(x, w, group_sizes, b)
    plain = grouped_matmul_ref(x, w, group_sizes, b)
    x64, w64, b64 = leaves(x.double(), w.double(), b.double())
    ref = grouped_matmul_ref(x64, w64, group_sizes, b64)
    assert_within_budget(y, ref, plain, "y")
    dy = torch.randn_like(y)
    for name, g, pg, rg in zip(("dx", "dw", "dbias"), grads(y, (x, w, b), dy), grads(plain, (x, w, b), dy),
                               grads(ref, (x64, w64, b64), dy.double()), strict=True):
        assert_within_budget(g, rg, pg, name)


@pytest.mark.gpu
def test_cuda_matches_cpu_in_float32():
    x, w, sizes, b = make_case([100, 3, 0, 250], 20, 128, 64, dtype=torch.float32)
    want = grouped_matmul(x, w, sizes, b)
    got = grouped_matmul(x.cuda(), w.cuda(), sizes.cuda(), b.cuda())
    assert max_err(got.cpu(), want) < 1e-2
