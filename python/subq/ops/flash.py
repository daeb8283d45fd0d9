"""FLASH attention (Hua et al. 2022): ``subq.ops.flash_chunk_attention``, ``gau_attention`` and ``flash_step``.

Backed by ``torch.ops.subq.flash_chunk_attention_fwd/bwd``, ``gau_attention_fwd/bwd`` and ``flash_step``
(csrc/torch/flash.cpp). Both devices run ATen composites by default. Fused CUDA kernels for
``flash_chunk_attention``, forward and backward, float16/bfloat16 (csrc/flash/flash_chunk_attention_{fwd,bwd}.cu),
are opt-in with ``SUBQ_EXPERIMENTAL_FLASH_KERNELS=1`` until they have been verified on a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from subq import _C  # noqa: F401  (registers the torch.ops.subq schemas and kernels)
from subq._utils import (
    FLOAT_DTYPES,
    autocast_inputs,
    check_bool,
    check_device,
    check_dtype_in,
    check_int,
    check_int_choice,
    check_like,
    check_ndim,
    check_real,
    check_shape,
    check_tensor,
)

CHUNK_SIZES = (64, 128, 256, 512)
MAX_POSITION = 2**63 - 2  # the op's int64, and one more step after it
MAX_QK_DIM = 256      # S: the query/key feature size (128 in the paper)
MAX_VALUE_DIM = 4096  # E: the value/gate size (2 x d_model in the paper)


def flash_chunk_attention(
    q_quad: torch.Tensor,
    k_quad: torch.Tensor,
    q_lin: torch.Tensor,
    k_lin: torch.Tensor,
    v: torch.Tensor,
    u: torch.Tensor | None = None,
    rel_bias: torch.Tensor | None = None,
    chunk_size: int = 256,
    causal: bool = False,
    quad_scale: float | None = None,
    lin_scale: float | None = None,
) -> torch.Tensor:
    r"""FLASH's mixed-chunk attention (single head): relu² attention inside chunks plus linear attention across them.

    The sequence is split into G = ceil(L / C) chunks of C = ``chunk_size`` positions (the last may be short). For
    chunk g with rows ``X_g``::

        quad_g = relu(quad_scale · Q_quad,g K_quad,gᵀ + B)² V_g        # lower-triangular within the chunk if causal
        lin_g  = lin_scale · Q_lin,g (Σ_h K_lin,hᵀ V_h)                 # bidirectional: every chunk h
        lin_g  = lin_scale · Q_lin,g (Σ_{h<g} K_lin,hᵀ V_h)             # causal: strictly earlier chunks
        out_g  = (quad_g + lin_g) ⊙ U_g                                 # ⊙ U_g only when the gate u is given

    Scaling (the paper's pseudo-code): ``quad_scale`` defaults to 1/C and multiplies the scores before the bias;
    ``lin_scale`` defaults to 1/L (so a causal output depends on L through it: pass an explicit ``lin_scale`` to
    match ``flash_step`` decoding). ``rel_bias (2C-1,)`` is a relative-position bias within a chunk: query i and
    key j of one chunk (0 ≤ i, j < C) get ``rel_bias[j - i + C - 1]``. Positions past L in the short last chunk
    are masked, so they add nothing (not even ``relu(bias)²``) and produce no output.

    Shapes: ``q_quad, k_quad, q_lin, k_lin (B, L, S)`` with S ≤ 256, ``v`` and ``u (B, L, E)`` with E ≤ 4096.
    ``chunk_size`` is 64, 128, 256 or 512. Dtypes: float16, bfloat16, float32 or float64, all alike; ``rel_bias``
    in that dtype or float32. Accumulation in float32 (float64 for float64); the output in v's dtype. Memory is
    linear in L. Differentiable in every tensor input.

    NaN/Inf policy: a NaN or Inf input at position t makes the outputs NaN from the start of t's chunk on when
    causal (a chunk's matmuls mix its positions; the linear state carries it to later chunks), and everywhere when
    bidirectional; earlier chunks of a causal call are untouched. Inside ``torch.autocast`` the tensors are cast to
    the autocast dtype first, as for ``torch.matmul`` (as in :func:`gau_attention` and :func:`flash_step`).
    """
    q_quad, k_quad, q_lin, k_lin, v, u = autocast_inputs(q_quad, k_quad, q_lin, k_lin, v, u)
    _check_features((q_quad, k_quad, q_lin, k_lin), ("q_quad", "k_quad", "q_lin", "k_lin"), v, u)
    chunk_size = check_int_choice(chunk_size, "chunk_size", CHUNK_SIZES)
    _check_rel_bias(rel_bias, 2 * chunk_size - 1, "2 * chunk_size - 1", v)
    causal = check_bool(causal, "causal")
    seqlen = v.shape[1]
    quad_scale = _scale(quad_scale, "quad_scale", 1.0 / chunk_size)
    lin_scale = _scale(lin_scale, "lin_scale", 1.0 / max(seqlen, 1))
    return torch.ops.subq.flash_chunk_attention_fwd(q_quad, k_quad, q_lin, k_lin, v, u, rel_bias, chunk_size,
                                                    causal, quad_scale, lin_scale)


def gau_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    u: torch.Tensor | None = None,
    rel_bias: torch.Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
) -> torch.Tensor:
    r"""FLASH-Quad / the gated attention unit's attention: relu² attention over the whole sequence.

    ::

        out = relu(scale · Q Kᵀ + B)² V  ⊙ U         # lower-triangular when causal; ⊙ U only when u is given

    ``scale`` defaults to 1/L (the paper's ``qk / seq_len``). ``rel_bias (2L-1,)``: query i and key j get
    ``rel_bias[j - i + L - 1]``. Computed in key tiles with running sums, never holding the L x L matrix; the
    backward recomputes each tile.

    Shapes: ``q, k (B, L, S)`` with S ≤ 256, ``v`` and ``u (B, L, E)`` with E ≤ 4096. Dtypes as
    :func:`flash_chunk_attention`. Differentiable in every tensor input.

    NaN/Inf policy: when causal, a NaN or Inf in q, k, v or u at position t reaches only the outputs at t and later:
    the masked products are never formed (a masked zero times a NaN is NaN). So a padded tail holding NaN in q, k or
    v leaves the outputs before it as they are without the tail, and for k and v their gradients too (a NaN in q
    or u makes its whole output row NaN, and the backward multiplies that row by its gradient, zero or not, as
    autograd does everywhere). Bidirectional: every output.
    """
    q, k, v, u = autocast_inputs(q, k, v, u)
    _check_features((q, k), ("q", "k"), v, u)
    seqlen = v.shape[1]
    _check_rel_bias(rel_bias, max(2 * seqlen - 1, 0), "2 * seqlen - 1", v)
    causal = check_bool(causal, "causal")
    scale = _scale(scale, "scale", 1.0 / max(seqlen, 1))
    return torch.ops.subq.gau_attention_fwd(q, k, v, u, rel_bias, causal, scale)


@dataclass
class FlashDecodeState:
    """The state of causal :func:`flash_chunk_attention` after ``position`` tokens, in the compute dtype (float32,
    float64 for float64): ``lin_state (B, S, E)`` = Σ K_linᵀV over the completed chunks, ``chunk_kv (B, S, E)`` =
    the same over the current chunk so far, ``k_quad_cache (B, C, S)`` and ``v_cache (B, C, E)`` = the current
    chunk's keys and values. Memory is constant in the sequence length."""

    lin_state: torch.Tensor
    chunk_kv: torch.Tensor
    k_quad_cache: torch.Tensor
    v_cache: torch.Tensor
    position: int = 0

    @classmethod
    def allocate(cls, batch: int, chunk_size: int, qk_dim: int, value_dim: int, device=None,
                 dtype: torch.dtype = torch.float32) -> FlashDecodeState:
        """An empty state for inputs of ``dtype`` (the state itself is float32, or float64 for float64)."""
        chunk_size = check_int_choice(chunk_size, "chunk_size", CHUNK_SIZES)
        batch = check_int(batch, "batch", minimum=0)
        qk_dim = check_int(qk_dim, "qk_dim", 1, MAX_QK_DIM)
        value_dim = check_int(value_dim, "value_dim", 1, MAX_VALUE_DIM)
        if not isinstance(dtype, torch.dtype) or dtype not in FLOAT_DTYPES:
            raise ValueError(f"dtype must be one of {FLOAT_DTYPES} (the inputs' dtype), got {dtype!r}")
        state_dtype = _state_dtype(dtype)
        kw = {"device": device, "dtype": state_dtype}
        return cls(torch.zeros(batch, qk_dim, value_dim, **kw), torch.zeros(batch, qk_dim, value_dim, **kw),
                   torch.zeros(batch, chunk_size, qk_dim, **kw), torch.zeros(batch, chunk_size, value_dim, **kw))

    @property
    def chunk_size(self) -> int:
        return self.k_quad_cache.shape[1]


def flash_step(
    state: FlashDecodeState,
    q_quad: torch.Tensor,
    k_quad: torch.Tensor,
    q_lin: torch.Tensor,
    k_lin: torch.Tensor,
    v: torch.Tensor,
    u: torch.Tensor | None = None,
    rel_bias: torch.Tensor | None = None,
    quad_scale: float | None = None,
    *,
    lin_scale: float,
) -> torch.Tensor:
    r"""One step of causal :func:`flash_chunk_attention` decoding: the output of the token at ``state.position``.

    Inputs are one token per batch row, ``(B, S)`` / ``(B, E)`` (or ``(B, 1, S)`` / ``(B, 1, E)``; the output has
    v's shape). The token's keys and values join ``state`` in place and ``state.position`` advances by one.
    Running this for positions 0..L-1 from :meth:`FlashDecodeState.allocate` equals
    ``flash_chunk_attention(..., causal=True, lin_scale=lin_scale)`` on the L tokens. ``lin_scale`` has no default
    here (the forward's 1/L needs the final length); ``quad_scale`` defaults to 1/C. Not differentiable.
    """
    if not isinstance(state, FlashDecodeState):
        raise TypeError(f"state must be a FlashDecodeState, got {type(state).__name__}")
    # chunk_size is read from the cache's shape[1], so its rank is checked before that read.
    check_ndim(check_tensor(state.k_quad_cache, "state.k_quad_cache"), 3, "state.k_quad_cache",
               "(batch, chunk_size, S)")
    position = check_int(state.position, "state.position", 0, MAX_POSITION)  # True would reach the op as 1
    q_quad, k_quad, q_lin, k_lin, v, u = autocast_inputs(q_quad, k_quad, q_lin, k_lin, v, u)
    squeeze = check_tensor(v, "v").dim() == 3
    tensors = [q_quad, k_quad, q_lin, k_lin, v, u]
    if squeeze:
        for i, (name, t) in enumerate(zip(("q_quad", "k_quad", "q_lin", "k_lin", "v", "u"), tensors, strict=True)):
            if t is not None and (t.dim() != 3 or t.shape[1] != 1):
                raise ValueError(f"{name} must be (batch, 1, features) for one token, got shape {tuple(t.shape)}")
            tensors[i] = t[:, 0] if t is not None else None
    q_quad, k_quad, q_lin, k_lin, v, u = tensors
    _check_features((q_quad, k_quad, q_lin, k_lin), ("q_quad", "k_quad", "q_lin", "k_lin"), v, u,
                    layout="(batch, features)")
    C = state.chunk_size
    _check_rel_bias(rel_bias, 2 * C - 1, "2 * chunk_size - 1", v)
    _check_state(state, q_quad, v)
    quad_scale = _scale(quad_scale, "quad_scale", 1.0 / C)
    lin_scale = check_real(lin_scale, "lin_scale", finite=True)
    out = torch.ops.subq.flash_step(q_quad, k_quad, q_lin, k_lin, v, u, rel_bias, state.lin_state, state.chunk_kv,
                                    state.k_quad_cache, state.v_cache, position, quad_scale, lin_scale)
    state.position = position + 1
    return out[:, None] if squeeze else out


def _state_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _scale(value: object, name: str, default: float) -> float:
    return default if value is None else check_real(value, name, finite=True)


def _check_state(state: FlashDecodeState, q_quad: torch.Tensor, v: torch.Tensor) -> None:
    """Every state tensor against the token: the op writes them in place, and one on another device (meta above
    all) would send the whole call to another device's kernel, which for meta writes nothing."""
    (batch, qk_dim), value_dim = q_quad.shape, v.shape[-1]
    C = check_int_choice(state.chunk_size, "state.k_quad_cache.shape[1] (the chunk size)", CHUNK_SIZES)
    shapes = {"lin_state": ((batch, qk_dim, value_dim), "(batch, S, E)"),
              "chunk_kv": ((batch, qk_dim, value_dim), "(batch, S, E)"),
              "k_quad_cache": ((batch, C, qk_dim), "(batch, chunk_size, S)"),
              "v_cache": ((batch, C, value_dim), "(batch, chunk_size, E)")}
    for field, (shape, layout) in shapes.items():
        name = f"state.{field}"
        t = check_tensor(getattr(state, field), name)
        check_shape(t, shape, name, f"{layout} from the inputs")
        if t.dtype != _state_dtype(v.dtype):
            raise ValueError(f"{name}.dtype must be {_state_dtype(v.dtype)} for inputs of dtype {v.dtype}, "
                             f"got {t.dtype}")
        check_device(t, v, name, "v")


def _check_features(features, names, v, u, layout="(batch, seqlen, features)") -> None:
    ndim = layout.count(",") + 1
    check_tensor(v, "v")
    check_ndim(v, ndim, "v", layout)
    ref, ref_name = features[0], names[0]
    check_tensor(ref, ref_name)
    check_ndim(ref, ndim, ref_name, layout)
    for name, t in zip(names, features, strict=True):
        check_tensor(t, name)
        if t.shape != ref.shape:
            raise ValueError(f"{name} must have {ref_name}'s shape {tuple(ref.shape)}, got {tuple(t.shape)}")
        check_like(t, v, name, "v")
    if ref.shape[:-1] != v.shape[:-1]:
        raise ValueError(f"v must have {ref_name}'s leading dims {tuple(ref.shape[:-1])}, got shape {tuple(v.shape)}")
    if not 1 <= ref.shape[-1] <= MAX_QK_DIM:
        raise ValueError(f"{ref_name}'s feature size S must be in 1..{MAX_QK_DIM}, got {ref.shape[-1]}")
    if not 1 <= v.shape[-1] <= MAX_VALUE_DIM:
        raise ValueError(f"v's feature size E must be in 1..{MAX_VALUE_DIM}, got {v.shape[-1]}")
    if u is not None:
        check_tensor(u, "u")
        if u.shape != v.shape:
            raise ValueError(f"u must have v's shape {tuple(v.shape)}, got {tuple(u.shape)}")
        check_like(u, v, "u", "v")


def _check_rel_bias(rel_bias, length: int, what: str, v: torch.Tensor) -> None:
    if rel_bias is None:
        return
    check_tensor(rel_bias, "rel_bias")
    if tuple(rel_bias.shape) != (length,):
        raise ValueError(f"rel_bias must have shape ({what},) = ({length},), got {tuple(rel_bias.shape)}")
    check_dtype_in(rel_bias, "rel_bias", tuple(dict.fromkeys((v.dtype, torch.float32))), "v's dtype or float32")
    check_device(rel_bias, v, "rel_bias", "v")


# ---- fake kernels (shapes only), for torch.compile and meta tensors ------------------------------------------------


@torch.library.register_fake("subq::flash_chunk_attention_fwd")
def _chunk_fwd_fake(q_quad, k_quad, q_lin, k_lin, v, u, rel_bias, chunk_size, causal, quad_scale, lin_scale):
    return torch.empty_like(v)


def _like_or_empty(inputs, ref):
    return [torch.empty_like(t) if t is not None else ref.new_empty((0,)) for t in inputs]


@torch.library.register_fake("subq::flash_chunk_attention_bwd")
def _chunk_bwd_fake(dout, q_quad, k_quad, q_lin, k_lin, v, u, rel_bias, chunk_size, causal, quad_scale, lin_scale):
    return _like_or_empty((q_quad, k_quad, q_lin, k_lin, v, u, rel_bias), v)


@torch.library.register_fake("subq::gau_attention_fwd")
def _gau_fwd_fake(q, k, v, u, rel_bias, causal, scale):
    return torch.empty_like(v)


@torch.library.register_fake("subq::gau_attention_bwd")
def _gau_bwd_fake(dout, q, k, v, u, rel_bias, causal, scale):
    return _like_or_empty((q, k, v, u, rel_bias), v)


@torch.library.register_fake("subq::flash_step")
def _step_fake(q_quad, k_quad, q_lin, k_lin, v, u, rel_bias, lin_state, chunk_kv, k_quad_cache, v_cache, position,
               quad_scale, lin_scale):
    return torch.empty_like(v)


# ---- autograd -------------------------------------------------------------------------------------------------------


def _chunk_setup_context(ctx, inputs, output):
    *tensors, chunk_size, causal, quad_scale, lin_scale = inputs
    ctx.save_for_backward(*tensors)
    ctx.options = (chunk_size, causal, quad_scale, lin_scale)


def _chunk_backward(ctx, dout):
    tensors = ctx.saved_tensors
    grads = torch.ops.subq.flash_chunk_attention_bwd(dout.contiguous(), *tensors, *ctx.options)
    grads = [g if t is not None else None for g, t in zip(grads, tensors, strict=True)]
    return (*grads, None, None, None, None)


def _gau_setup_context(ctx, inputs, output):
    *tensors, causal, scale = inputs
    ctx.save_for_backward(*tensors)
    ctx.options = (causal, scale)


def _gau_backward(ctx, dout):
    tensors = ctx.saved_tensors
    grads = torch.ops.subq.gau_attention_bwd(dout.contiguous(), *tensors, *ctx.options)
    grads = [g if t is not None else None for g, t in zip(grads, tensors, strict=True)]
    return (*grads, None, None)


torch.library.register_autograd("subq::flash_chunk_attention_fwd", _chunk_backward, setup_context=_chunk_setup_context)
torch.library.register_autograd("subq::gau_attention_fwd", _gau_backward, setup_context=_gau_setup_context)
