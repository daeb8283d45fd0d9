"""subq.ops.monarch_matmul (orders 1 and 2) against the dense float64 reference."""

from __future__ import annotations

import pytest
import torch

import subq
from conftest import DEVICES, assert_within_budget, launched, max_err, opt_in, poison_cuda_allocator, run_profiled
from subq.ops import blockdiag_matmul, monarch_matmul
from subq.profile.ops.monarch import two_bmm
from subq.reference import blockdiag_matmul_ref, monarch_dense_matrix, monarch_matmul_ref

# (nb, bo, bi): square, rectangular both ways, single block, tiny blocks, vector-width multiples (CUDA kernel path)
BLOCKDIAG_SHAPES = [(4, 4, 4), (3, 5, 2), (2, 3, 7), (1, 6, 6), (16, 1, 1), (4, 16, 8), (2, 8, 24)]
# (k, q, p, l, s, r) with l*r == k*q: square Monarch, rectangular in and out, q != l, aligned (kernel) shapes
MONARCH_SHAPES = [
    (4, 4, 4, 4, 4, 4),
    (2, 6, 3, 3, 5, 4),
    (4, 3, 5, 6, 7, 2),
    (3, 2, 2, 1, 4, 6),
    (2, 8, 8, 4, 16, 4),
    (4, 16, 8, 8, 8, 8),
    (2, 16, 16, 4, 8, 8),
]
BATCH_SHAPES = [(), (0,), (5,), (2, 3), (2, 1, 3)]
LOW_PRECISION = [torch.float32, torch.bfloat16, torch.float16]


def factors(shape, dtype=torch.float64, device="cpu", requires_grad=False):
    k, q, p, l, s, r = shape
    w1 = torch.randn(k, q, p, dtype=dtype, device=device) / p**0.5
    w2 = torch.randn(l, s, r, dtype=dtype, device=device) / r**0.5
    return w1.requires_grad_(requires_grad), w2.requires_grad_(requires_grad)


# ---- forward and gradients against the reference, float64 ---------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batch", BATCH_SHAPES)
@pytest.mark.parametrize("shape", BLOCKDIAG_SHAPES)
def test_blockdiag_matches_reference(shape, batch, device):
    nb, bo, bi = shape
    x = torch.randn(*batch, nb * bi, dtype=torch.float64, device=device, requires_grad=True)
    w = torch.randn(nb, bo, bi, dtype=torch.float64, device=device, requires_grad=True)
    y = blockdiag_matmul(x, w)
    ref = blockdiag_matmul_ref(x, w)
    assert y.shape == (*batch, nb * bo)
    assert max_err(y, ref) < 1e-12
    dy = torch.randn_like(y)
    for got, want in zip(torch.autograd.grad(y, (x, w), dy), torch.autograd.grad(ref, (x, w), dy), strict=True):
        assert max_err(got, want) < 1e-12


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batch", BATCH_SHAPES)
@pytest.mark.parametrize("shape", MONARCH_SHAPES)
def test_monarch_matches_reference(shape, batch, device):
    k, q, p, l, s, r = shape
    x = torch.randn(*batch, k * p, dtype=torch.float64, device=device, requires_grad=True)
    w1, w2 = factors(shape, device=device, requires_grad=True)
    y = monarch_matmul(x, w1, w2)
    ref = monarch_matmul_ref(x, w1, w2)
    assert y.shape == (*batch, l * s)
    assert max_err(y, ref) < 1e-12
    dy = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, w1, w2), dy)
    want = torch.autograd.grad(ref, (x, w1, w2), dy)
    for name, g, w in zip(("dx", "dw1", "dw2"), got, want, strict=True):
        assert max_err(g, w) < 1e-12, name


def test_reference_dense_matrix_agrees_with_steps():
    shape = (2, 6, 3, 3, 5, 4)
    x = torch.randn(7, 6, dtype=torch.float64)
    w1, w2 = factors(shape)
    assert max_err(x @ monarch_dense_matrix(w1, w2).t(), monarch_matmul_ref(x, w1, w2)) < 1e-12


def test_square_monarch_is_the_paper_formula():
    """Square case written out by hand: y[s*l + j] = sum_i w2[j, s, i] * sum_pp w1[i, j, pp] x[i*p + pp]."""
    m = 4
    x = torch.randn(3, m * m, dtype=torch.float64)
    w1, w2 = factors((m, m, m, m, m, m))
    xb = x.reshape(3, m, m)
    y = torch.einsum("jsi,ijp,bip->bsj", w2, w1, xb).reshape(3, m * m)
    assert max_err(monarch_matmul(x, w1, w2), y) < 1e-12


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_inputs(device):
    shape = (2, 8, 8, 4, 16, 4)
    k, q, p, l, s, r = shape
    base = torch.randn(6, 2 * k * p, dtype=torch.float64, device=device)
    w1, w2 = factors(shape, device=device)
    cases = {
        "strided rows": base[:, ::2],
        "row slice": base[:, 3 : 3 + k * p],
        "transposed batch": torch.randn(k * p, 6, dtype=torch.float64, device=device).t(),
        "expanded": torch.randn(1, k * p, dtype=torch.float64, device=device).expand(5, -1),
    }
    w1_t = w1.transpose(1, 2).contiguous().transpose(1, 2)  # same values, non-contiguous strides
    for name, x in cases.items():
        assert max_err(monarch_matmul(x, w1_t, w2), monarch_matmul_ref(x, w1, w2)) < 1e-12, name
        wb = w1[:, :, :8]
        assert max_err(blockdiag_matmul(x, wb), blockdiag_matmul_ref(x, wb)) < 1e-12, name


def random_monarch_shape(gen: torch.Generator) -> tuple[int, ...]:
    """(k, q, p, l, s, r) with l*r == k*q: l is a random divisor of the intermediate width k*q."""
    k, q, p, s = (int(v) for v in torch.randint(1, 7, (4,), generator=gen))
    divisors = [d for d in range(1, k * q + 1) if k * q % d == 0]
    l = divisors[int(torch.randint(len(divisors), (1,), generator=gen))]
    return k, q, p, l, s, k * q // l


def random_batch(gen: torch.Generator) -> tuple[int, ...]:
    """0 to 3 batch dims of 0 to 4 each (so some batches are empty)."""
    ndim = int(torch.randint(0, 4, (1,), generator=gen))
    return tuple(int(v) for v in torch.randint(0, 5, (ndim,), generator=gen))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", range(24))
def test_random_shapes_match_reference(seed, device):
    """A seeded sweep beyond the hand-picked shapes: random factor sizes (rectangular, q != l), random batch dims,
    and in odd cases a non-contiguous x, for both orders, forward and every gradient."""
    gen = torch.Generator().manual_seed(seed)
    shape = random_monarch_shape(gen)
    k, q, p, l, s, r = shape
    batch = random_batch(gen)
    x = torch.randn(*batch, 2 * k * p, dtype=torch.float64, device=device)
    x = (x[..., ::2] if seed % 2 else x[..., : k * p].contiguous()).requires_grad_()
    w1, w2 = factors(shape, device=device, requires_grad=True)
    for inputs, fn, ref_fn in (((x, w1, w2), monarch_matmul, monarch_matmul_ref),
                               ((x, w1), blockdiag_matmul, blockdiag_matmul_ref)):
        y, ref = fn(*inputs), ref_fn(*inputs)
        assert y.shape == ref.shape and max_err(y, ref) < 1e-12, (shape, batch)
        dy = torch.randn_like(y)
        got, want = torch.autograd.grad(y, inputs, dy), torch.autograd.grad(ref, inputs, dy)
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert max_err(g, w) < 1e-12, (shape, batch, i)


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_gradients(device):
    """Non-contiguous x, weights and output gradient: the backward reads them through their strides too."""
    shape = (2, 8, 8, 4, 16, 4)
    k, q, p, l, s, r = shape
    x = torch.randn(k * p, 6, dtype=torch.float64, device=device).t().requires_grad_()
    w1, w2 = (w.transpose(1, 2).contiguous().transpose(1, 2).requires_grad_() for w in factors(shape, device=device))
    dy = torch.randn(6, 2 * l * s, dtype=torch.float64, device=device)[:, ::2]
    got = torch.autograd.grad(monarch_matmul(x, w1, w2), (x, w1, w2), dy)
    want = torch.autograd.grad(monarch_matmul_ref(x, w1, w2), (x, w1, w2), dy)
    for name, g, w in zip(("dx", "dw1", "dw2"), got, want, strict=True):
        assert max_err(g, w) < 1e-12, name
    got = torch.autograd.grad(blockdiag_matmul(x, w1), (x, w1), dy[:, : k * q])
    want = torch.autograd.grad(blockdiag_matmul_ref(x, w1), (x, w1), dy[:, : k * q])
    for name, g, w in zip(("dx", "dw"), got, want, strict=True):
        assert max_err(g, w) < 1e-12, name


# ---- low precision: the error budget ------------------------------------------------------------------------------


def _low_precision_case(device, dtype, shape, tokens):
    k, q, p, l, s, r = shape
    x64 = torch.randn(tokens, k * p, dtype=torch.float64, device=device)
    w1_64, w2_64 = factors(shape, device=device)
    return [t.to(dtype).requires_grad_() for t in (x64, w1_64, w2_64)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", LOW_PRECISION)
# l == 1 (a single output block: no output permutation, one GEMM batch) is its own store path on CUDA.
@pytest.mark.parametrize("shape", [(2, 8, 8, 4, 16, 4), (4, 16, 8, 8, 8, 8), (4, 3, 5, 6, 7, 2), (4, 16, 8, 1, 16, 64)])
@pytest.mark.parametrize("tokens", [1, 37, 256])
def test_monarch_low_precision_error_budget(device, dtype, shape, tokens):
    _check_monarch_within_budget(*_low_precision_case(device, dtype, shape, tokens))


def _check_monarch_within_budget(x, w1, w2):
    """Output and every gradient of monarch_matmul in x's dtype within the error budget against float64."""
    y = monarch_matmul(x, w1, w2)
    plain = monarch_matmul_ref(x, w1, w2)
    inputs64 = [t.detach().double().requires_grad_() for t in (x, w1, w2)]
    ref = monarch_matmul_ref(*inputs64)
    assert y.dtype == x.dtype
    assert_within_budget(y, ref, plain, "y")
    dy = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, w1, w2), dy)
    plain_grads = torch.autograd.grad(plain, (x, w1, w2), dy)
    ref_grads = torch.autograd.grad(ref, inputs64, dy.double())
    for name, g, pg, rg in zip(("dx", "dw1", "dw2"), got, plain_grads, ref_grads, strict=True):
        assert g.dtype == x.dtype
        assert_within_budget(g, rg, pg, name)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("shape", [(4, 16, 8), (2, 8, 24), (3, 5, 2)])
def test_blockdiag_low_precision_error_budget(device, dtype, shape):
    nb, bo, bi = shape
    x = torch.randn(77, nb * bi, device=device, dtype=dtype, requires_grad=True)
    w = (torch.randn(nb, bo, bi, device=device) / bi**0.5).to(dtype).requires_grad_()
    y = blockdiag_matmul(x, w)
    plain = blockdiag_matmul_ref(x, w)
    x64, w64 = (t.detach().double().requires_grad_() for t in (x, w))
    ref = blockdiag_matmul_ref(x64, w64)
    assert_within_budget(y, ref, plain, "y")
    dy = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, w), dy)
    plain_grads = torch.autograd.grad(plain, (x, w), dy)
    ref_grads = torch.autograd.grad(ref, (x64, w64), dy.double())
    for name, g, pg, rg in zip(("dx", "dw"), got, plain_grads, ref_grads, strict=True):
        assert_within_budget(g, rg, pg, name)


# ---- gradcheck, opcheck, torch.compile --------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(2, 3, 2, 3, 2, 2), (3, 2, 2, 2, 3, 3)])
def test_monarch_gradcheck(shape):
    k, q, p, l, s, r = shape
    x = torch.randn(3, k * p, dtype=torch.float64, requires_grad=True)
    w1, w2 = factors(shape, requires_grad=True)
    assert torch.autograd.gradcheck(monarch_matmul, (x, w1, w2))


def test_blockdiag_gradcheck():
    x = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 4, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(blockdiag_matmul, (x, w))


def test_double_backward():
    shape = (2, 3, 2, 3, 2, 2)
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    w1, w2 = factors(shape, requires_grad=True)
    assert torch.autograd.gradgradcheck(monarch_matmul, (x, w1, w2))
    w = torch.randn(2, 3, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(blockdiag_matmul, (x, w))


def test_partial_gradients():
    shape = (2, 3, 2, 3, 2, 2)
    x = torch.randn(4, 4, dtype=torch.float64)
    w1, w2 = factors(shape)
    w2.requires_grad_()
    (g,) = torch.autograd.grad(monarch_matmul(x, w1, w2).sum(), (w2,))
    (want,) = torch.autograd.grad(monarch_matmul_ref(x, w1, w2).sum(), (w2,))
    assert max_err(g, want) < 1e-12


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("tokens, transposed", [(9, False), (9, True), (0, False)])
def test_opcheck(device, dtype, tokens, transposed):
    opts = {"dtype": dtype, "device": device}
    x = torch.randn(16, tokens, **opts).t() if transposed else torch.randn(tokens, 16, **opts)
    x.requires_grad_()
    w = torch.randn(4, 8, 4, **opts, requires_grad=True)
    w1 = torch.randn(4, 8, 4, **opts, requires_grad=True)
    w2 = torch.randn(8, 2, 4, **opts, requires_grad=True)
    torch.library.opcheck(torch.ops.subq.blockdiag_fwd.default, (x, w))
    torch.library.opcheck(torch.ops.subq.blockdiag_bwd.default, (torch.randn(tokens, 32, **opts), x, w, [True, True]))
    torch.library.opcheck(torch.ops.subq.blockdiag_bwd.default, (torch.randn(tokens, 32, **opts), x, w, [False, True]))
    y, inter = torch.ops.subq.monarch_fwd(x.detach(), w1.detach(), w2.detach())
    torch.library.opcheck(torch.ops.subq.monarch_fwd.default, (x, w1, w2))
    dy = torch.randn_like(y)
    for mask in ([True, True, True], [False, True, False]):
        args = (dy, x.detach(), inter, w1.detach(), w2.detach(), mask)
        torch.library.opcheck(torch.ops.subq.monarch_bwd.default, args)


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    shape = (2, 8, 8, 4, 16, 4)
    x = torch.randn(2, 5, 16, device=device, requires_grad=True)
    w1, w2 = factors(shape, dtype=torch.float32, device=device, requires_grad=True)
    w = torch.randn(2, 8, 8, device=device, requires_grad=True)

    def f(x, w1, w2, w):
        return monarch_matmul(x, w1, w2).sin().sum() + blockdiag_matmul(x, w).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out, want = compiled(x, w1, w2, w), f(x, w1, w2, w)
    assert max_err(out, want) < 1e-4
    got = torch.autograd.grad(out, (x, w1, w2, w))
    ref = torch.autograd.grad(want, (x, w1, w2, w))
    for g, r in zip(got, ref, strict=True):
        assert max_err(g, r) < 1e-4


def test_torch_compile_inductor_dynamic():
    shape = (2, 8, 8, 4, 16, 4)
    w1, w2 = factors(shape, dtype=torch.float32)
    compiled = torch.compile(lambda x: monarch_matmul(x, w1, w2) * 2, fullgraph=True, dynamic=True)
    for tokens in (3, 11):
        x = torch.randn(tokens, 16)
        assert max_err(compiled(x), 2 * monarch_matmul_ref(x, w1, w2)) < 1e-4


@pytest.mark.parametrize("device", DEVICES)
def test_autocast_casts_operands_like_matmul(device):
    """Under autocast, float32 weights meet bfloat16 activations (a model's Linear outputs): the op casts both to
    the autocast dtype as torch.matmul would, and the float32 weights get float32 gradients."""
    shape = (2, 8, 8, 4, 16, 4)
    w1, w2 = factors(shape, dtype=torch.float32, device=device, requires_grad=True)
    x = torch.randn(5, 16, device=device)
    with torch.autocast(device, dtype=torch.bfloat16):
        y = monarch_matmul(x.bfloat16(), w1, w2)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert w1.grad.dtype == torch.float32 and w2.grad.dtype == torch.float32
    ref = monarch_matmul_ref(x.double(), w1.double(), w2.double())
    assert max_err(y, ref) < 0.05 * ref.abs().max().item()


# ---- bad input ------------------------------------------------------------------------------------------------------


def test_errors_name_the_argument():
    x = torch.randn(3, 16)
    w1 = torch.randn(4, 8, 4)
    w2 = torch.randn(8, 2, 4)
    cases = [
        (lambda: monarch_matmul(torch.randn(3, 15), w1, w2), ValueError, "x.shape[-1] must be k * p"),
        (lambda: monarch_matmul(x, w1, torch.randn(8, 2, 3)), ValueError, "w2 (l, s, r) must have l * r == k * q"),
        (lambda: monarch_matmul(x, torch.randn(16, 4), w2), ValueError, "w1 must be 3-D"),
        (lambda: monarch_matmul(x, w1, torch.randn(8, 2)), ValueError, "w2 must be 3-D"),
        (lambda: monarch_matmul(x, w1.double(), w2), ValueError, "w1.dtype (torch.float64) must match x.dtype"),
        (lambda: monarch_matmul(x, w1, w2.half()), ValueError, "w2.dtype (torch.float16) must match x.dtype"),
        (lambda: monarch_matmul(x.long(), w1.long(), w2.long()), ValueError, "x must have a floating-point dtype"),
        (lambda: monarch_matmul(x, w1.to("meta"), w2), ValueError, "w1 is on meta but x is on cpu"),
        (lambda: monarch_matmul(torch.tensor(1.0), w1, w2), ValueError, "at least 1 dimension"),
        (lambda: monarch_matmul([1.0], w1, w2), TypeError, "x must be a torch.Tensor"),
        (lambda: blockdiag_matmul(torch.randn(3, 10), torch.randn(4, 3, 2)), ValueError, "nblocks * in_block = 4 * 2"),
        (lambda: blockdiag_matmul(x, torch.randn(4, 4)), ValueError, "w1 must be 3-D (nblocks, out_block, in_block)"),
        (lambda: blockdiag_matmul(x, w1.double()), ValueError, "w1.dtype (torch.float64) must match x.dtype"),
        (lambda: blockdiag_matmul(x, w1.to("meta")), ValueError, "w1 is on meta but x is on cpu"),
        (lambda: monarch_matmul(x, w1, w2.to("meta")), ValueError, "w2 is on meta but x is on cpu"),
        # zero-sized factors: l * r == k * q == 0 would pass the size checks, and the composites divide by l
        (lambda: monarch_matmul(x, torch.randn(4, 0, 4), torch.randn(0, 2, 4)), ValueError,
         "w1 (k, q, p) must have every dimension at least 1"),
        (lambda: monarch_matmul(x, w1, torch.randn(4, 2, 0)), ValueError,
         "w2 (l, s, r) must have every dimension at least 1"),
        (lambda: monarch_matmul(torch.randn(3, 0), torch.randn(0, 8, 4), w2), ValueError,
         "w1 (k, q, p) must have every dimension at least 1"),
        (lambda: blockdiag_matmul(x, torch.randn(4, 0, 4)), ValueError,
         "w1 (nblocks, out_block, in_block) must have every dimension at least 1"),
    ]
    for fn, exc, message in cases:
        with pytest.raises(exc) as info:
            fn()
        assert message in str(info.value), f"{message!r} not in {info.value!r}"


def test_direct_op_calls_are_checked():
    """torch.ops.subq.* called directly (bypassing the Python checks) raise RuntimeError, not crash."""
    x, w1, w2 = torch.randn(3, 16), torch.randn(4, 8, 4), torch.randn(8, 2, 4)
    with pytest.raises(RuntimeError, match="x.shape\\[1\\] must be 16"):
        torch.ops.subq.monarch_fwd(torch.randn(3, 12), w1, w2)
    with pytest.raises(RuntimeError, match="intermediate must be"):
        torch.ops.subq.monarch_bwd(torch.randn(3, 16), x, torch.randn(5, 5), w1, w2, [True, True, True])
    with pytest.raises(RuntimeError, match="dy.shape\\[1\\] must be"):
        torch.ops.subq.blockdiag_bwd(torch.randn(3, 5), x, torch.randn(4, 8, 4), [True, True])
    with pytest.raises(RuntimeError, match="x must be float16, bfloat16, float32 or float64"):
        torch.ops.subq.blockdiag_fwd(x.int(), torch.randn(4, 8, 4).int())
    with pytest.raises(RuntimeError, match="w2 \\(l, s, r\\) must have every dimension at least 1"):
        torch.ops.subq.monarch_fwd(x, w1, torch.randn(0, 2, 4))
    with pytest.raises(RuntimeError, match="w1 \\(k, q, p\\) must have every dimension at least 1"):
        torch.ops.subq.monarch_fwd(torch.randn(3, 0), torch.randn(0, 8, 4), w2)
    with pytest.raises(RuntimeError, match="w must have every dimension|w \\(nblocks"):
        torch.ops.subq.blockdiag_fwd(x, torch.randn(4, 0, 4))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("where", ["x", "w1", "w2"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_nan_and_inf_stay_in_their_blocks(device, where, value):
    """NaN and Inf propagate as in per-block matmuls: only the outputs the poisoned block feeds turn non-finite,
    with the same NaN / +-Inf pattern, and every other output is unchanged."""
    shape = (4, 2, 8, 2, 16, 4)  # q < l: a poisoned block of R feeds only some of L's blocks
    x = torch.randn(6, 32, device=device)
    w1, w2 = factors(shape, dtype=torch.float32, device=device)
    poisoned = {"x": x, "w1": w1, "w2": w2}[where]
    poisoned.view(-1)[poisoned.numel() // 3] = value
    y = monarch_matmul(x, w1, w2)
    # two bmm (m2's formulation) run one product per block: a NaN or Inf reaches exactly the outputs of the blocks
    # it feeds (the dense reference's block_diag would spread it through 0 * inf)
    want = two_bmm(x.double(), w1.double(), w2.double())
    assert not torch.isfinite(want).all() and torch.isfinite(want).any()
    assert torch.equal(torch.isnan(y), torch.isnan(want))
    assert torch.equal(torch.isinf(y), torch.isinf(want))
    assert torch.equal(y[y.isinf()].sign(), want[want.isinf()].sign().float())
    finite = torch.isfinite(want)
    assert max_err(y[finite], want[finite]) < 1e-4


# ---- CUDA specifics -----------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("tokens", [1, 100, 4099])
def test_cuda_kernels_write_every_element(dtype, tokens):
    shape = (4, 32, 16, 8, 24, 16)
    x, w1, w2 = _low_precision_case("cuda", dtype, shape, tokens)
    poison_cuda_allocator()
    y = monarch_matmul(x, w1, w2)
    assert torch.isfinite(y).all()
    dx, dw1, dw2 = torch.autograd.grad(y, (x, w1, w2), torch.randn_like(y))
    for g in (dx, dw1, dw2):
        assert torch.isfinite(g).all()


@pytest.mark.gpu
def test_cuda_aligned_shapes_take_the_cutlass_kernels():
    if not subq.cuda_built():
        pytest.skip("this build has no CUDA kernels (CPU-only extension)")
    x, w1, w2 = _low_precision_case("cuda", torch.bfloat16, (4, 16, 16, 4, 16, 16), 64)
    assert launched(run_profiled(lambda: monarch_matmul(x, w1, w2).sum().backward())[1], "cutlass")
    w = w1.detach().requires_grad_()
    assert launched(run_profiled(lambda: blockdiag_matmul(x, w).sum().backward())[1], "cutlass")


@pytest.mark.gpu
def test_cuda_tf32_switch():
    shape = (4, 64, 64, 4, 64, 64)
    x, w1, w2 = _low_precision_case("cuda", torch.float32, shape, 512)
    ref = monarch_matmul_ref(x.double(), w1.double(), w2.double())
    previous = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        exact = max_err(monarch_matmul(x, w1, w2), ref)
        torch.backends.cuda.matmul.allow_tf32 = True
        tf32 = max_err(monarch_matmul(x, w1, w2), ref)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    scale = ref.abs().max().item()
    assert exact < 1e-5 * scale, exact
    assert tf32 < 1e-2 * scale, tf32


@pytest.mark.gpu
def test_cuda_large_batch_and_blocks():
    """Many tokens (grid x beyond one wave) and many blocks (grid z)."""
    shape = (64, 8, 8, 64, 8, 8)
    x, w1, w2 = _low_precision_case("cuda", torch.bfloat16, shape, 70_001)
    y = monarch_matmul(x, w1, w2)
    plain = monarch_matmul_ref(x, w1, w2)
    ref = monarch_matmul_ref(x.double(), w1.double(), w2.double())
    assert_within_budget(y, ref, plain, "y")


# ---- the Hopper wgmma GEMMs (opt-in until verified on an H100) -------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape, tokens", [
    ((4, 64, 64, 4, 64, 64), 512),        # every GEMM aligned: all on the wgmma kernels
    ((4, 256, 128, 8, 64, 128), 1000),    # rectangular, tokens not a multiple of the 128-row tile
    ((4, 32, 16, 8, 24, 16), 100),        # tokens not a multiple of 8: token-contiguous GEMMs fall back
    ((16, 128, 128, 16, 128, 128), 4096), # a bench-like size
])
def test_hopper_gemm_path(monkeypatch, dtype, shape, tokens):
    if not subq.cuda_built() or "90a" not in subq.cuda_archs().split(";"):
        pytest.skip("this build has no sm_90a kernels")
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the wgmma kernels need a compute capability 9.0 GPU")
    opt_in(monkeypatch, "monarch_matmul")
    x, w1, w2 = _low_precision_case("cuda", dtype, shape, tokens)
    _check_monarch_within_budget(x, w1, w2)
    x64, w64 = x.detach().double(), w1.detach().double()
    w = w1.detach().requires_grad_()
    yb, plain_b = blockdiag_matmul(x, w), blockdiag_matmul_ref(x, w)
    assert_within_budget(yb, blockdiag_matmul_ref(x64, w64), plain_b, "blockdiag y")
    if tokens % 8 == 0:
        assert launched(run_profiled(lambda: monarch_matmul(x, w1, w2).sum().backward())[1], "sm90")
