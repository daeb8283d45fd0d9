"""Monarch products: block-diagonal (order 1) and Monarch (order 2) matrix multiplication.

Backed by ``torch.ops.subq.blockdiag_fwd/bwd`` and ``torch.ops.subq.monarch_fwd/bwd`` (csrc/torch/monarch.cpp).
"""

from __future__ import annotations

import torch

from subq import _C  # noqa: F401  (registers the torch.ops.subq schemas and kernels)
from subq._utils import autocast_inputs, check_like, check_ndim, check_nonempty_dims, check_tensor
from subq.ops._autograd import grad_of_grad
from subq.reference.monarch import blockdiag_matmul_ref, monarch_matmul_ref


def monarch_matmul(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor | None = None) -> torch.Tensor:
    r"""Multiply by a block-diagonal (``w2=None``) or Monarch matrix along the last dimension of ``x``.

    Order 1, ``x (..., nb*bi)``, ``w1 (nb, bo, bi)`` → ``(..., nb*bo)``:
    ``y[..., j*bo:(j+1)*bo] = w1[j] @ x[..., j*bi:(j+1)*bi]``.

    Order 2, :math:`y = P^T L P R x` (Dao et al., *Monarch*, 2022), ``x (..., k*p)``, ``w1 (k, q, p)``,
    ``w2 (l, s, r)`` with ``l*r == k*q`` → ``(..., l*s)``:

    1. ``t[..., i, :] = w1[i] @ x[..., i*p:(i+1)*p]``, shape ``(..., k, q)``;
    2. flatten to ``k*q``, view as ``(r, l)``, transpose to ``(l, r)``;
    3. ``o[..., j, :] = w2[j] @ t'[..., j, :]``, shape ``(..., l, s)``;
    4. transpose to ``(s, l)`` and flatten.

    Dtypes: float16, bfloat16, float32 (TF32 on CUDA when ``torch.backends.cuda.matmul.allow_tf32``) and float64;
    all arguments share one dtype and device. CUDA runs CUTLASS tensor-core kernels with fp32 accumulation when
    block sizes are multiples of 8 (4 for TF32); other shapes and float64 take an ATen composite path. On an H100
    with a build for sm_90a, ``SUBQ_EXPERIMENTAL_SM90_GEMM=1`` runs the 16-bit products on Hopper ``wgmma`` kernels
    (opt-in until they have been verified on a GPU). Any batch shape (including empty) and any strides are
    accepted; every factor dimension must be at least 1. NaN and Inf propagate as in one ``torch.matmul`` per
    block: a non-finite value reaches only the outputs of the blocks it feeds.
    Differentiable in ``x``, ``w1`` and ``w2``. Inside ``torch.autocast`` the operands are cast to the autocast dtype
    first, as for ``torch.matmul``.
    """
    x, w1, w2 = autocast_inputs(x, w1, w2)
    check_tensor(x, "x")
    check_tensor(w1, "w1")
    if x.dim() < 1:
        raise ValueError("x must have at least 1 dimension (..., features), got a 0-D tensor")
    check_like(w1, x, "w1", "x")
    if w2 is None:
        check_ndim(w1, 3, "w1", "(nblocks, out_block, in_block)")
        check_nonempty_dims(w1, "w1", "(nblocks, out_block, in_block)")
        if x.shape[-1] != w1.shape[0] * w1.shape[2]:
            raise ValueError(
                f"x.shape[-1] must be nblocks * in_block = {w1.shape[0]} * {w1.shape[2]} = "
                f"{w1.shape[0] * w1.shape[2]} for w1 of shape {tuple(w1.shape)}, got x shape {tuple(x.shape)}"
            )
    else:
        check_tensor(w2, "w2")
        check_like(w2, x, "w2", "x")
        check_ndim(w1, 3, "w1", "(k, q, p)")
        check_ndim(w2, 3, "w2", "(l, s, r)")
        check_nonempty_dims(w1, "w1", "(k, q, p)")
        check_nonempty_dims(w2, "w2", "(l, s, r)")
        k, q, p = w1.shape
        if x.shape[-1] != k * p:
            raise ValueError(
                f"x.shape[-1] must be k * p = {k} * {p} = {k * p} for w1 of shape (k, q, p) = {tuple(w1.shape)}, "
                f"got x shape {tuple(x.shape)}"
            )
        if w2.shape[0] * w2.shape[2] != k * q:
            raise ValueError(
                f"w2 (l, s, r) must have l * r == k * q = {k * q} to factor the intermediate of w1 {tuple(w1.shape)}, "
                f"got w2 shape {tuple(w2.shape)}"
            )
    lead = x.shape[:-1]
    x2d = x.reshape(-1, x.shape[-1])
    if w2 is None:
        y = torch.ops.subq.blockdiag_fwd(x2d, w1)
    else:
        y = torch.ops.subq.monarch_fwd(x2d, w1, w2)[0]
    return y.reshape(*lead, y.shape[-1])


def blockdiag_matmul(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``monarch_matmul(x, w)``: the order-1 (block-diagonal) product, ``w (nblocks, out_block, in_block)``."""
    return monarch_matmul(x, w)


# ---- fake kernels (shapes only), for torch.compile and meta tensors ------------------------------------------------


def _padded_tokens(tokens):
    return (tokens + 7) // 8 * 8


@torch.library.register_fake("subq::blockdiag_fwd")
def _blockdiag_fwd_fake(x, w):
    return x.new_empty(x.shape[0], w.shape[0] * w.shape[1])


@torch.library.register_fake("subq::blockdiag_bwd")
def _blockdiag_bwd_fake(dy, x, w, output_mask):
    dx = torch.empty_like(x, memory_format=torch.contiguous_format) if output_mask[0] else x.new_empty(0)
    dw = torch.empty_like(w, memory_format=torch.contiguous_format) if output_mask[1] else x.new_empty(0)
    return dx, dw


@torch.library.register_fake("subq::monarch_fwd")
def _monarch_fwd_fake(x, w1, w2):
    y = x.new_empty(x.shape[0], w2.shape[0] * w2.shape[1])
    intermediate = x.new_empty(w1.shape[0] * w1.shape[1], _padded_tokens(x.shape[0]))
    return y, intermediate


@torch.library.register_fake("subq::monarch_bwd")
def _monarch_bwd_fake(dy, x, intermediate, w1, w2, output_mask):
    def grad(t, wanted):
        return torch.empty_like(t, memory_format=torch.contiguous_format) if wanted else x.new_empty(0)

    return grad(x, output_mask[0]), grad(w1, output_mask[1]), grad(w2, output_mask[2])


# ---- autograd ------------------------------------------------------------------------------------------------------


def _blockdiag_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _blockdiag_backward(ctx, dy):
    x, w = ctx.saved_tensors
    want = [ctx.needs_input_grad[0], ctx.needs_input_grad[1]]
    dx, dw = torch.ops.subq.blockdiag_bwd(dy, x, w, want)
    return (dx if want[0] else None, dw if want[1] else None)


def _monarch_setup(ctx, inputs, output):
    x, w1, w2 = inputs
    ctx.save_for_backward(x, w1, w2, output[1])
    ctx.mark_non_differentiable(output[1])


def _monarch_backward(ctx, dy, _d_intermediate):
    x, w1, w2, intermediate = ctx.saved_tensors
    want = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]]
    dx, dw1, dw2 = torch.ops.subq.monarch_bwd(dy, x, intermediate, w1, w2, want)
    return tuple(g if wanted else None for g, wanted in zip((dx, dw1, dw2), want, strict=True))


torch.library.register_autograd("subq::blockdiag_fwd", _blockdiag_backward, setup_context=_blockdiag_setup)
torch.library.register_autograd("subq::monarch_fwd", _monarch_backward, setup_context=_monarch_setup)


# ---- double backward: differentiate the dense reference twice (subq.ops._autograd) ---------------------------------


def _save_bwd_inputs(ctx, inputs, output):
    *tensors, mask = inputs
    ctx.save_for_backward(*tensors)
    ctx.mask = list(mask)


def _blockdiag_bwd_backward(ctx, g_dx, g_dw):
    dy, x, w = ctx.saved_tensors
    d_dy, d_x, d_w = grad_of_grad(blockdiag_matmul_ref, (x, w), (dy,), ctx.mask, (g_dx, g_dw))
    return d_dy, d_x, d_w, None


def _monarch_bwd_backward(ctx, g_dx, g_dw1, g_dw2):
    # The reference recomputes the intermediate from x and w1, so second derivatives flow through them.
    dy, x, _intermediate, w1, w2 = ctx.saved_tensors
    d_dy, d_x, d_w1, d_w2 = grad_of_grad(monarch_matmul_ref, (x, w1, w2), (dy,), ctx.mask, (g_dx, g_dw1, g_dw2))
    return d_dy, d_x, None, d_w1, d_w2, None


torch.library.register_autograd("subq::blockdiag_bwd", _blockdiag_bwd_backward, setup_context=_save_bwd_inputs)
torch.library.register_autograd("subq::monarch_bwd", _monarch_bwd_backward, setup_context=_save_bwd_inputs)
