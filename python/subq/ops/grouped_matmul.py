"""Grouped matmul: rows sorted by group, each group multiplied by its own weight, all groups in one launch.

The routed projections of Mixture-of-Modules run on it. Backed by ``torch.ops.subq.grouped_matmul_fwd/bwd``
(csrc/torch/grouped_matmul.cpp, CUTLASS kernels in csrc/grouped_matmul/). The CUDA kernels are opt-in with
``SUBQ_EXPERIMENTAL_GROUPED_GEMM=1`` until they have been verified on a GPU; by default CUDA takes the ATen
composite described in the function's docstring.
"""

from __future__ import annotations

import torch

from subq import _C  # noqa: F401  (registers the torch.ops.subq schemas and kernels)
from subq._utils import autocast_inputs, check_like, check_ndim, check_shape, check_tensor

INTEGER_DTYPES = (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)


def grouped_matmul(x: torch.Tensor, w: torch.Tensor, group_sizes: torch.Tensor,
                   bias: torch.Tensor | None = None) -> torch.Tensor:
    r"""``y[rows of group g] = x[rows of group g] @ w[g] (+ bias[g])`` for every group ``g`` at once.

    The rows of ``x`` are sorted by group: the first ``group_sizes[0]`` rows belong to group 0, the next
    ``group_sizes[1]`` to group 1, and so on. With :math:`s_g = \sum_{h<g} \mathrm{group\_sizes}[h]`,

    .. math:: y[s_g + i] = x[s_g + i]\, w_g + b_g, \qquad 0 \le i < \mathrm{group\_sizes}[g],

    and rows at or past :math:`\sum_g \mathrm{group\_sizes}[g]` belong to no group and come out as zeros (so a
    token buffer with a capacity larger than the routed tokens needs no trimming). Empty groups are allowed.

    Args:
        x: ``(T, K)`` rows sorted by group.
        w: ``(G, K, N)``, one weight per group, applied as ``x_g @ w[g]``.
        group_sizes: ``(G,)`` integer tensor (int32 or int64 typically) on x's device. On CUDA it is read only on
            the device, so the call never waits for the host; the sizes cannot be validated there and are clamped
            (a negative size counts as 0, groups end at row T). On CPU, negative sizes or a sum above T raise
            ``ValueError``.
        bias: ``(G, N)`` or None.

    Returns:
        ``(T, N)`` in x's dtype.

    Dtypes: float16, bfloat16, float32 (TF32 on CUDA when ``torch.backends.cuda.matmul.allow_tf32``) and float64;
    x, w and bias share one dtype and device. With ``SUBQ_EXPERIMENTAL_GROUPED_GEMM=1``, CUDA runs one persistent
    CUTLASS grouped GEMM (tensor cores for 16-bit and TF32, FFMA for exact float32; fp32 accumulation; the bias added
    in its epilogue); its tensor-core kernels load 16-byte vectors, so K and N that are not multiples of 8 elements
    (4 for TF32) are zero-padded first, at the cost of a copy. Otherwise, and for float64, CUDA takes an ATen
    composite that is also free of host synchronisation but does G times the work and memory. Differentiable in x,
    w and bias (with the kernels, the backward is two more grouped GEMMs and a segmented column sum); group_sizes is
    not differentiable. Inside ``torch.autocast`` x, w and bias are cast to the autocast dtype first, as for
    ``torch.matmul``.
    """
    x, w, bias = autocast_inputs(x, w, bias)
    check_tensor(x, "x")
    check_tensor(w, "w")
    check_ndim(x, 2, "x", "(tokens, in_features)")
    check_ndim(w, 3, "w", "(groups, in_features, out_features)")
    check_like(w, x, "w", "x")
    groups, in_features, out_features = w.shape
    if x.shape[1] != in_features:
        raise ValueError(
            f"x.shape[1] must be in_features = w.shape[1] = {in_features} for w of shape (groups, in_features, "
            f"out_features) = {tuple(w.shape)}, got x shape {tuple(x.shape)}"
        )
    if not isinstance(group_sizes, torch.Tensor):
        raise TypeError(f"group_sizes must be a torch.Tensor, got {type(group_sizes).__name__}")
    if group_sizes.dtype not in INTEGER_DTYPES:
        raise ValueError(f"group_sizes must be an integer tensor (int32 or int64), got {group_sizes.dtype}")
    check_shape(group_sizes, (groups,), "group_sizes", "(groups,)")
    if group_sizes.device != x.device:
        raise ValueError(
            f"group_sizes is on {group_sizes.device} but x is on {x.device}; keep it on x's device (on CUDA that "
            "avoids a host synchronisation)"
        )
    if bias is not None:
        check_tensor(bias, "bias")
        check_like(bias, x, "bias", "x")
        check_shape(bias, (groups, out_features), "bias", "(groups, out_features)")
    return torch.ops.subq.grouped_matmul_fwd(x, w, group_sizes, bias)


# ---- fake kernels (shapes only), for torch.compile and meta tensors ------------------------------------------------


@torch.library.register_fake("subq::grouped_matmul_fwd")
def _grouped_matmul_fwd_fake(x, w, group_sizes, bias):
    return x.new_empty(x.shape[0], w.shape[2])


@torch.library.register_fake("subq::grouped_matmul_bwd")
def _grouped_matmul_bwd_fake(dy, x, w, group_sizes, output_mask):
    dx = x.new_empty(x.shape) if output_mask[0] else x.new_empty(0)
    dw = x.new_empty(w.shape) if output_mask[1] else x.new_empty(0)
    dbias = x.new_empty(w.shape[0], w.shape[2]) if output_mask[2] else x.new_empty(0)
    return dx, dw, dbias


# ---- autograd ------------------------------------------------------------------------------------------------------


def _setup_context(ctx, inputs, output):
    x, w, group_sizes, bias = inputs
    ctx.save_for_backward(x, w, group_sizes)
    ctx.has_bias = bias is not None


def _backward(ctx, dy):
    x, w, group_sizes = ctx.saved_tensors
    want = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[3]]
    dx, dw, dbias = torch.ops.subq.grouped_matmul_bwd(dy, x, w, group_sizes, want)
    return (dx if want[0] else None, dw if want[1] else None, None, dbias if want[2] else None)


torch.library.register_autograd("subq::grouped_matmul_fwd", _backward, setup_context=_setup_context)
