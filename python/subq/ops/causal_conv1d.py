"""Short depthwise causal convolution (Mamba / Mamba-2's conv1d): training forward and backward, and decoding.

Backed by ``torch.ops.subq.causal_conv1d_fwd/bwd/update`` (csrc/torch/causal_conv1d.cpp).
"""

from __future__ import annotations

import torch

from subq import _C  # noqa: F401  (registers the torch.ops.subq schemas and kernels)
from subq._utils import check_bool, check_ndim, check_tensor
from subq.ops._autograd import grad_of_grad
from subq.reference.causal_conv1d import causal_conv1d_ref

ACTIVATIONS = (None, "silu", "swish")


def _silu(activation: str | None) -> bool:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be None, 'silu' or 'swish', got {activation!r}")
    return activation is not None


def _check_param(t: object, x: torch.Tensor, name: str) -> torch.Tensor:
    """weight and bias: x's dtype or float32, x's device."""
    check_tensor(t, name)
    if t.dtype not in (x.dtype, torch.float32):
        raise ValueError(f"{name}.dtype ({t.dtype}) must be x.dtype ({x.dtype}) or torch.float32")
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device} but x is on {x.device}; move them to one device")
    return t


def _check_weight_bias(x: torch.Tensor, weight: object, bias: object, x_layout: str) -> None:
    check_tensor(x, "x")
    if x.dim() != 3:
        raise ValueError(f"x must be 3-D {x_layout}, got shape {tuple(x.shape)}")
    _check_param(weight, x, "weight")
    check_ndim(weight, 2, "weight", "(dim, width)")
    if weight.shape[0] != x.shape[1]:
        raise ValueError(
            f"weight.shape[0] must be the channels of x, {x.shape[1]}, got weight shape {tuple(weight.shape)}"
        )
    if not 2 <= weight.shape[1] <= 4:
        raise ValueError(f"weight.shape[1] (the width) must be 2, 3 or 4, got weight shape {tuple(weight.shape)}")
    if bias is not None:
        _check_param(bias, x, "bias")
        if bias.shape != (x.shape[1],):
            raise ValueError(f"bias must have shape (dim,) = ({x.shape[1]},), got {tuple(bias.shape)}")


def _check_states(t: object, x: torch.Tensor, name: str, length_name: str, length: int | None) -> None:
    check_tensor(t, name)
    if t.dtype != x.dtype:
        raise ValueError(f"{name}.dtype ({t.dtype}) must match x.dtype ({x.dtype})")
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device} but x is on {x.device}; move them to one device")
    batch, dim = x.shape[0], x.shape[1]
    if t.dim() != 3 or t.shape[0] != batch or t.shape[1] != dim or (length is not None and t.shape[2] != length):
        expected = f"({batch}, {dim}, {length if length is not None else length_name})"
        raise ValueError(f"{name} must have shape (batch, dim, {length_name}) = {expected}, got {tuple(t.shape)}")


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
    initial_states: torch.Tensor | None = None,
    return_final_states: bool = False,
    activation: str | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    r"""Depthwise causal convolution of width W in 2..4 along the last axis, as in Mamba-2.

    .. math:: y[b, d, t] = \mathrm{act}\Big(\mathrm{bias}[d] + \sum_{k=0}^{W-1} \mathrm{weight}[d, k]\,
              x[b, d, t - (W-1) + k]\Big)

    with x at negative times taken from ``initial_states`` when given, else zero, and act the identity or SiLU.

    Args:
        x: ``(batch, dim, seqlen)``, any strides (a channels-last ``(batch, seqlen, dim)`` tensor's
            ``.transpose(1, 2)`` is read in place, and y then has the same layout).
        weight: ``(dim, W)``. bias: ``(dim,)`` or None. Both x's dtype or float32.
        seq_idx: ``(batch, seqlen)`` int32 or None: packed sequences; a tap reading time s counts only when
            ``seq_idx[b, s] == seq_idx[b, t]``. Cannot be combined with ``initial_states``.
        initial_states: ``(batch, dim, W-1)`` in x's dtype, the inputs just before time 0, or None (zeros).
        return_final_states: also return ``final_states (batch, dim, W-1)``, the last W-1 inputs (taken from
            initial_states / zeros when seqlen < W-1), to continue with :func:`causal_conv1d_update` or a later
            call's ``initial_states``. They do not depend on seq_idx.
        activation: None, ``"silu"`` or ``"swish"`` (the same).

    Returns:
        y ``(batch, dim, seqlen)`` in x's dtype, or ``(y, final_states)``.

    Dtypes: x float32, float16, bfloat16 or float64; accumulation in float32 (float64 for float64). On CUDA the
    tiled kernels for the first three are opt-in with ``SUBQ_EXPERIMENTAL_MAMBA2_KERNELS=1`` until they have been
    verified on a GPU; otherwise, and for float64, CUDA runs an ATen composite. Differentiable in x, weight, bias and
    initial_states, including through final_states; gradients are deterministic.
    """
    silu = _silu(activation)
    return_final_states = check_bool(return_final_states, "return_final_states")
    _check_weight_bias(x, weight, bias, "(batch, dim, seqlen)")
    if seq_idx is not None:
        if not isinstance(seq_idx, torch.Tensor):
            raise TypeError(f"seq_idx must be a torch.Tensor or None, got {type(seq_idx).__name__}")
        if seq_idx.dtype != torch.int32:
            raise ValueError(f"seq_idx must have dtype torch.int32, got {seq_idx.dtype}")
        if seq_idx.shape != (x.shape[0], x.shape[2]):
            raise ValueError(
                f"seq_idx must have shape (batch, seqlen) = ({x.shape[0]}, {x.shape[2]}), got {tuple(seq_idx.shape)}"
            )
        if seq_idx.device != x.device:
            raise ValueError(f"seq_idx is on {seq_idx.device} but x is on {x.device}; move them to one device")
        if initial_states is not None:
            raise ValueError("initial_states cannot be combined with seq_idx (packed sequences start from zeros)")
    if initial_states is not None:
        _check_states(initial_states, x, "initial_states", "width - 1", weight.shape[1] - 1)
    y, final_states = torch.ops.subq.causal_conv1d_fwd(
        x, weight, bias, seq_idx, initial_states, return_final_states, silu
    )
    return (y, final_states) if return_final_states else y


def causal_conv1d_update(
    x: torch.Tensor,
    conv_state: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
) -> torch.Tensor:
    """Decoding step of :func:`causal_conv1d`: new tokens against a rolling state, updated in place.

    Args:
        x: ``(batch, dim)`` one token, or ``(batch, dim, T)`` T tokens in order.
        conv_state: ``(batch, dim, state_len)`` with ``state_len >= W-1``, x's dtype: the latest inputs, oldest
            first (e.g. the ``final_states`` of :func:`causal_conv1d`). Shifted left by T and ending with x on
            return.
        weight, bias, activation: as in :func:`causal_conv1d`.

    Returns:
        y with x's shape and dtype: exactly the outputs :func:`causal_conv1d` gives those tokens when run over
        the whole sequence. Not differentiable (inference only).
    """
    silu = _silu(activation)
    check_tensor(x, "x")
    if x.dim() not in (2, 3):
        raise ValueError(f"x must be 2-D (batch, dim) or 3-D (batch, dim, tokens), got shape {tuple(x.shape)}")
    tokens = x.unsqueeze(-1) if x.dim() == 2 else x
    _check_weight_bias(tokens, weight, bias, "(batch, dim, tokens)")
    _check_states(conv_state, tokens, "conv_state", "state_len", None)
    if conv_state.shape[2] < weight.shape[1] - 1:
        raise ValueError(
            f"conv_state.shape[2] (state_len) must be at least width - 1 = {weight.shape[1] - 1}, "
            f"got conv_state shape {tuple(conv_state.shape)}"
        )
    y = torch.ops.subq.causal_conv1d_update(tokens, conv_state, weight, bias, silu)
    return y.squeeze(-1) if x.dim() == 2 else y


# ---- fake kernels (shapes only), for torch.compile and meta tensors ------------------------------------------------


@torch.library.register_fake("subq::causal_conv1d_fwd")
def _fwd_fake(x, weight, bias, seq_idx, initial_states, return_final_states, silu):
    final_states = x.new_empty(x.shape[0], x.shape[1], weight.shape[1] - 1) if return_final_states else x.new_empty(0)
    return torch.empty_like(x), final_states


@torch.library.register_fake("subq::causal_conv1d_bwd")
def _bwd_fake(x, weight, bias, seq_idx, initial_states, dy, dfinal_states, silu, output_mask):
    dx = torch.empty_like(x) if output_mask[0] else x.new_empty(0)
    dweight = weight.new_empty(weight.shape) if output_mask[1] else x.new_empty(0)
    dbias = bias.new_empty(bias.shape) if output_mask[2] and bias is not None else x.new_empty(0)
    dinit = x.new_empty(initial_states.shape) if output_mask[3] and initial_states is not None else x.new_empty(0)
    return dx, dweight, dbias, dinit


@torch.library.register_fake("subq::causal_conv1d_update")
def _update_fake(x, conv_state, weight, bias, silu):
    return torch.empty_like(x)


# ---- autograd ------------------------------------------------------------------------------------------------------


def _setup(ctx, inputs, output):
    x, weight, bias, seq_idx, initial_states, _return_final_states, silu = inputs
    ctx.save_for_backward(x, weight, bias, seq_idx, initial_states)
    ctx.silu = silu


def _backward(ctx, dy, dfinal_states):
    x, weight, bias, seq_idx, initial_states = ctx.saved_tensors
    need = ctx.needs_input_grad
    want = [need[0], need[1], need[2] and bias is not None, need[4] and initial_states is not None]
    dx, dweight, dbias, dinit = torch.ops.subq.causal_conv1d_bwd(
        x, weight, bias, seq_idx, initial_states, dy, dfinal_states, ctx.silu, want
    )
    dx, dweight, dbias, dinit = (g if w else None for g, w in zip((dx, dweight, dbias, dinit), want, strict=True))
    return dx, dweight, dbias, None, dinit, None, None


torch.library.register_autograd("subq::causal_conv1d_fwd", _backward, setup_context=_setup)


# ---- double backward: differentiate the reference twice (subq.ops._autograd) ---------------------------------------


def _bwd_setup(ctx, inputs, output):
    x, weight, bias, seq_idx, initial_states, dy, dfinal_states, silu, output_mask = inputs
    ctx.save_for_backward(x, weight, bias, seq_idx, initial_states, dy, dfinal_states)
    ctx.silu, ctx.mask = silu, list(output_mask)


def _bwd_backward(ctx, g_dx, g_dweight, g_dbias, g_dinit):
    x, weight, bias, seq_idx, initial_states, dy, dfinal_states = ctx.saved_tensors
    activation = "silu" if ctx.silu else None

    def reference(x, weight, bias, initial_states):
        return causal_conv1d_ref(x, weight, bias, seq_idx, initial_states, True, activation)

    if dfinal_states is not None and dfinal_states.numel() == 0:  # the op's "no final-state gradient"
        dfinal_states = None
    d_dy, d_dfinal, d_x, d_weight, d_bias, d_init = grad_of_grad(reference, (x, weight, bias, initial_states),
                                                                 (dy, dfinal_states), ctx.mask,
                                                                 (g_dx, g_dweight, g_dbias, g_dinit))
    return d_x, d_weight, d_bias, None, d_init, d_dy, d_dfinal, None, None


torch.library.register_autograd("subq::causal_conv1d_bwd", _bwd_backward, setup_context=_bwd_setup)
