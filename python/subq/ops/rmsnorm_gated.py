"""Gated RMSNorm, the normalisation in front of Mamba-2's output projection (``RMSNormGated``).

Backed by ``torch.ops.subq.rmsnorm_gated_fwd/bwd`` (csrc/torch/rmsnorm_gated.cpp). Its CUDA kernels are opt-in
with ``SUBQ_EXPERIMENTAL_MAMBA2_KERNELS=1`` until they have been verified on a GPU; by default CUDA runs the ATen
composite.
"""

from __future__ import annotations

import math

import torch

from subq import _C  # noqa: F401  (registers the torch.ops.subq schemas and kernels)
from subq._utils import check_bool, check_device, check_int, check_like, check_real, check_shape, check_tensor


def rmsnorm_gated(
    x: torch.Tensor,
    weight: torch.Tensor,
    z: torch.Tensor | None = None,
    eps: float = 1e-6,
    group_size: int | None = None,
    norm_before_gate: bool = True,
) -> torch.Tensor:
    r"""RMSNorm over groups of features, optionally gated by ``silu(z)`` (Mamba-2's ``RMSNormGated``).

    ``x (..., D)``, ``weight (D,)``, ``z`` of x's shape or None. The features split into ``D / group_size`` groups
    (``group_size`` defaults to ``D`` and must divide it); per group
    :math:`\mathrm{norm}(v) = v / \sqrt{\mathrm{mean}(v^2) + \epsilon} \cdot w`. With ``z``:
    ``norm(x) * silu(z)`` when ``norm_before_gate`` else ``norm(x * silu(z))``.

    Dtypes: ``x`` and ``z`` float16, bfloat16, float32 or float64 (one dtype); ``weight`` x's dtype or float32.
    The statistic is computed in float32 (float64 for float64 inputs); the output has x's dtype and shape. Any
    batch shape, including empty, and any strides. Differentiable in ``x``, ``weight`` and ``z`` (first order).
    NaN or Inf in a group of ``x`` (or of ``x * silu(z)`` when gating first) makes that group's output NaN through
    its statistic; other groups and rows are unaffected. A NaN in ``z`` with the gate after the norm reaches only
    its own element.
    """
    check_tensor(x, "x")
    check_tensor(weight, "weight")
    if x.dim() < 1:
        raise ValueError("x must have at least 1 dimension (..., features), got a 0-D tensor")
    dim = x.shape[-1]
    if dim == 0:
        raise ValueError(f"x must have at least one feature (x.shape[-1] > 0), got shape {tuple(x.shape)}")
    if weight.dtype not in (x.dtype, torch.float32):
        raise ValueError(f"weight.dtype must be x.dtype ({x.dtype}) or torch.float32, got {weight.dtype}")
    check_device(weight, x, "weight", "x")
    check_shape(weight, (dim,), "weight", "(features of x,)")
    if z is not None:
        check_tensor(z, "z")
        check_like(z, x, "z", "x")
        check_shape(z, tuple(x.shape), "z", "x.shape")
    eps = check_real(eps, "eps")
    if not 0 <= eps < math.inf:  # false for NaN too; comparisons (not math.isfinite) trace under dynamic shapes
        raise ValueError(f"eps must be finite and >= 0, got {eps}")
    group_size = dim if group_size is None else check_int(group_size, "group_size")
    if group_size <= 0 or dim % group_size != 0:
        raise ValueError(f"group_size must be a positive divisor of x.shape[-1] = {dim}, got {group_size}")
    norm_before_gate = check_bool(norm_before_gate, "norm_before_gate")
    x2d = x.reshape(-1, dim)
    z2d = None if z is None else z.reshape(-1, dim)
    y, _ = torch.ops.subq.rmsnorm_gated_fwd(x2d, weight, z2d, eps, group_size, norm_before_gate)
    return y.reshape(x.shape)


# ---- fake kernels (shapes only), for torch.compile and meta tensors ------------------------------------------------


def _stat_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


@torch.library.register_fake("subq::rmsnorm_gated_fwd")
def _rmsnorm_gated_fwd_fake(x, weight, z, eps, group_size, norm_before_gate):
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    rstd = x.new_empty(x.shape[0], x.shape[1] // group_size, dtype=_stat_dtype(x))
    return y, rstd


@torch.library.register_fake("subq::rmsnorm_gated_bwd")
def _rmsnorm_gated_bwd_fake(dy, x, weight, z, rstd, group_size, norm_before_gate, output_mask):
    dx = torch.empty_like(x, memory_format=torch.contiguous_format) if output_mask[0] else x.new_empty(0)
    dweight = torch.empty_like(weight, memory_format=torch.contiguous_format) if output_mask[1] else x.new_empty(0)
    want_dz = output_mask[2] and z is not None
    dz = torch.empty_like(z, memory_format=torch.contiguous_format) if want_dz else x.new_empty(0)
    return dx, dweight, dz


# ---- autograd ------------------------------------------------------------------------------------------------------


def _setup(ctx, inputs, output):
    x, weight, z, _eps, group_size, norm_before_gate = inputs
    ctx.save_for_backward(x, weight, z, output[1])
    ctx.mark_non_differentiable(output[1])
    ctx.group_size = group_size
    ctx.norm_before_gate = norm_before_gate


def _backward(ctx, dy, _d_rstd):
    x, weight, z, rstd = ctx.saved_tensors
    want = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], z is not None and ctx.needs_input_grad[2]]
    dx, dweight, dz = torch.ops.subq.rmsnorm_gated_bwd(dy, x, weight, z, rstd, ctx.group_size, ctx.norm_before_gate,
                                                       want)
    grads = tuple(g if wanted else None for g, wanted in zip((dx, dweight, dz), want, strict=True))
    return (*grads, None, None, None)


torch.library.register_autograd("subq::rmsnorm_gated_fwd", _backward, setup_context=_setup)
