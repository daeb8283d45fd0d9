"""The gated attention unit (GAU) and the FLASH layer of Hua et al. 2022, "Transformer Quality in Linear Time".

One layer, for x of shape (B, L, d) and e = expansion * d::

    h       = norm(x)                                   # LayerNorm or ScaleNorm (pre-norm)
    U, V, Z = split(silu(h W_in + b_in), [e, e, s])     # one projection to [U | V | Z]
    q, k    = Z ⊙ γ_q + β_q,  Z ⊙ γ_k + β_k             # cheap per-dim scale and offset heads (FLASH: four)
    q, k    = RoPE(q), RoPE(k)
    out     = x + (U ⊙ attention(q, k, V)) W_out + b_out

GAU's attention is relu² over the whole sequence (:func:`subq.ops.gau_attention`); FLASH's is mixed-chunk
attention (:func:`subq.ops.flash_chunk_attention`), which is linear in L. Causal layers of both decode token by
token: GAU from a cache of every past key and value, FLASH from a state of constant size. ``forward(x, cache)`` on
an empty cache is the prefill: one batched pass over the prompt that leaves the cache as ``step`` would.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from subq import distributed
from subq._utils import check_bool, check_int_choice, check_positive_ints, check_real
from subq.distributed._comm import check_group, gather_shard_layout
from subq.nn.attention import KVCache
from subq.nn.rope import rotary_embedding
from subq.ops.flash import CHUNK_SIZES, FlashDecodeState, flash_chunk_attention, flash_step, gau_attention

NORMS = ("layernorm", "scalenorm")


class ScaleNorm(nn.Module):
    """``g · x / max(‖x‖₂, eps)`` over the last dim, with one learned scalar g (initialised to sqrt(dim))
    (Nguyen & Salazar 2019)."""

    def __init__(self, dim: int, eps: float = 1e-5, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.full((), dim**0.5, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x / x.norm(dim=-1, keepdim=True).clamp(min=self.eps) * self.scale


class ScaleOffset(nn.Module):
    """``heads`` cheap transforms of one shared Z: ``Z ⊙ γ_h + β_h`` (γ ~ N(0, 0.02²), β = 0, as the paper)."""

    def __init__(self, dim: int, heads: int, device=None, dtype=None):
        super().__init__()
        self.gamma = nn.Parameter(torch.empty(heads, dim, device=device, dtype=dtype))
        self.beta = nn.Parameter(torch.zeros(heads, dim, device=device, dtype=dtype))
        nn.init.normal_(self.gamma, std=0.02)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(z * g + b for g, b in zip(self.gamma, self.beta, strict=True))


class _GatedUnit(nn.Module):
    """The shared body of GAU and FLASH: norm, the [U | V | Z] projection, the scale/offset heads, the output."""

    def __init__(self, d_model: int, expansion: int, s: int, heads: int, norm: str, rope: bool, device, dtype):
        super().__init__()
        check_positive_ints(d_model=d_model, expansion=expansion, s=s)
        rope = check_bool(rope, "rope")
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        factory = {"device": device, "dtype": dtype}
        self.d_model, self.e, self.s, self.rope = d_model, expansion * d_model, s, rope
        self.norm = nn.LayerNorm(d_model, **factory) if norm == "layernorm" else ScaleNorm(d_model, **factory)
        self.proj_in = nn.Linear(d_model, 2 * self.e + s, **factory)
        self.heads = ScaleOffset(s, heads, **factory)
        self.proj_out = nn.Linear(self.e, d_model, **factory)

    def _check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != self.d_model:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must be (batch, seqlen, d_model={self.d_model}), got {shape}")

    def _check_cache(self, cache, cache_cls: type, x: torch.Tensor, step: bool) -> None:
        """``cache`` fits ``x``: the right kind and batch; one token for ``step``, an empty cache for a prefill."""
        if not isinstance(cache, cache_cls):
            raise TypeError(f"cache must come from allocate_inference_cache, got {type(cache).__name__}")
        if x.shape[0] != cache.batch_size:
            raise ValueError(f"x has batch size {x.shape[0]}, but the cache was allocated for {cache.batch_size}")
        if step and x.shape[1] != 1:
            raise ValueError(f"step takes one token, x of shape (batch, 1, d_model), got {tuple(x.shape)}")
        if not step and cache.position != 0:
            # The ops attend within one sequence from position 0; a cache that already holds tokens continues by step.
            raise ValueError(f"a prefill (forward with a cache) needs an empty cache, but it holds {cache.position} "
                             "tokens")

    def _features(self, x: torch.Tensor, positions: torch.Tensor):
        """(U, V, heads...) of the normalised input; RoPE on every head."""
        u, v, z = F.silu(self.proj_in(self.norm(x))).split([self.e, self.e, self.s], dim=-1)
        heads = self.heads(z)
        if self.rope:
            heads = tuple(rotary_embedding(h, positions) for h in heads)
        return u, v, heads


@dataclass(kw_only=True)
class GAUInferenceCache(KVCache):
    """Decoding state of one causal GAU layer: the keys (after RoPE) and values of the first ``position`` tokens,
    ``keys (B, max_seqlen, S)`` and ``values (B, max_seqlen, E)`` in the compute dtype (float32, float64 for
    float64), and the attention scale they are decoded with."""

    scale: float

    @property
    def position(self) -> int:  # the name FLASH's cache and FlashDecodeState use
        return self.length

    @property
    def batch_size(self) -> int:
        return self.keys.shape[0]


class GAU(_GatedUnit):
    """The gated attention unit with FLASH-Quad attention: ``x + (U ⊙ relu(scale·qkᵀ + B)² V) W_out``.

    ``scale`` defaults to 1/L (the paper's). ``max_len`` adds a learned relative-position bias over offsets
    -(max_len-1)..max_len-1 (zero-initialised; sequences may then be at most max_len long). Quadratic in L in
    time, linear in memory (:func:`subq.ops.gau_attention`).
    """

    def __init__(self, d_model: int, expansion: int = 2, s: int = 128, causal: bool = False,
                 norm: str = "layernorm", rope: bool = True, max_len: int | None = None,
                 scale: float | None = None, device=None, dtype=None):
        if max_len is not None:
            check_positive_ints(max_len=max_len)
        super().__init__(d_model, expansion, s, 2, norm, rope, device, dtype)
        causal = check_bool(causal, "causal")
        scale = None if scale is None else check_real(scale, "scale", finite=True)
        self.causal, self.scale, self.max_len = causal, scale, max_len
        self.rel_bias = None
        if max_len is not None:
            self.rel_bias = nn.Parameter(torch.zeros(2 * max_len - 1, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor, cache: GAUInferenceCache | None = None) -> torch.Tensor:
        """``x (B, L, d)``. With an empty ``cache`` (a prefill) the attention uses ``cache.scale`` and the L keys
        and values stay in the cache for :meth:`step`."""
        self._check_input(x)
        seqlen = x.shape[1]
        scale = self.scale
        if cache is not None:
            self._check_cache(cache, GAUInferenceCache, x, step=False)
            if seqlen > cache.keys.shape[1]:
                raise ValueError(f"the cache holds {cache.keys.shape[1]} positions, x has {seqlen}")
            scale = cache.scale
        bias = None
        if self.rel_bias is not None:
            if seqlen > self.max_len:
                raise ValueError(f"seqlen ({seqlen}) exceeds max_len ({self.max_len}) of the relative bias")
            bias = self.rel_bias[self.max_len - seqlen: self.max_len + seqlen - 1]  # offsets -(L-1)..L-1
        u, v, (q, k) = self._features(x, torch.arange(seqlen, device=x.device))
        out = gau_attention(q, k, v, u=u, rel_bias=bias, causal=self.causal, scale=scale)
        if cache is not None:
            cache.append(k.detach(), v.detach())
        return x + self.proj_out(out)

    def allocate_inference_cache(self, batch_size: int, max_seqlen: int, dtype: torch.dtype | None = None
                                 ) -> GAUInferenceCache:
        """Room for ``max_seqlen`` keys and values. Decoding uses ``scale`` or, when that is None, 1/max_seqlen, so
        :meth:`step` equals the forward on max_seqlen tokens (and, being causal, on every prefix of them)."""
        if not self.causal:
            raise ValueError("decoding needs a causal GAU (causal=True)")
        if max_seqlen < 1:
            raise ValueError(f"max_seqlen must be positive, got {max_seqlen}")
        if self.max_len is not None and max_seqlen > self.max_len:
            raise ValueError(f"max_seqlen ({max_seqlen}) exceeds max_len ({self.max_len}) of the relative bias")
        # Keys and values in the ops' accumulation dtype, as FlashDecodeState keeps its state.
        compute_dtype = torch.float64 if (dtype or self.proj_in.weight.dtype) == torch.float64 else torch.float32
        kw = {"device": self.proj_in.weight.device, "dtype": compute_dtype}
        return GAUInferenceCache(torch.zeros(batch_size, max_seqlen, self.s, **kw),
                                 torch.zeros(batch_size, max_seqlen, self.e, **kw),
                                 scale=self.scale if self.scale is not None else 1.0 / max_seqlen)

    def step(self, x: torch.Tensor, cache: GAUInferenceCache) -> torch.Tensor:
        """The output for one token ``x (B, 1, d)`` at position ``t = cache.position``: its query against the t + 1
        cached keys, ``relu(scale · q kⱼ + bias[j - t])²`` weighting the values, as the causal forward's row t;
        advances the cache. O(t) time: FLASH-Quad keeps no summary of the past."""
        self._check_input(x)
        self._check_cache(cache, GAUInferenceCache, x, step=True)
        t, capacity = cache.position, cache.keys.shape[1]
        if t >= capacity:
            raise ValueError(f"the cache is full: it holds {capacity} positions")
        u, v, (q, k) = self._features(x, torch.tensor([t], device=x.device))
        _, keys, values, _ = cache.append(k.detach(), v.detach())
        ct = keys.dtype
        scores = torch.einsum("bjs,bs->bj", keys, q[:, 0].to(ct)) * cache.scale
        if self.rel_bias is not None:
            scores = scores + self.rel_bias[self.max_len - 1 - t: self.max_len].to(ct)  # offsets -t..0
        out = torch.einsum("bj,bje->be", F.relu(scores).square(), values) * u[:, 0].to(ct)
        return x + self.proj_out(out.to(v.dtype)[:, None])

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, e={self.e}, s={self.s}, causal={self.causal}, max_len={self.max_len}"


@dataclass
class FlashInferenceCache:
    """Decoding state of one causal FLASH layer: the attention state and the linear scale it was built for."""

    state: FlashDecodeState
    lin_scale: float

    @property
    def batch_size(self) -> int:
        return self.state.lin_state.shape[0]

    @property
    def position(self) -> int:
        return self.state.position


class FLASH(_GatedUnit):
    """The FLASH layer: the gated unit with four scale/offset heads (quad and lin, queries and keys) and mixed-chunk
    attention (:func:`subq.ops.flash_chunk_attention`), linear in L.

    ``rel_pos_bias`` adds a learned bias over the offsets within a chunk, ``(2C-1,)``, zero-initialised.
    ``lin_scale`` defaults to 1/L of the forward's input; decoding (causal only) uses ``lin_scale`` or, when that
    is None, 1/max_seqlen of :meth:`allocate_inference_cache`, so token-by-token :meth:`step` equals the forward
    on max_seqlen tokens (and, being causal, on every prefix of them).

    ``cp_group``: context parallelism: x is this rank's contiguous shard of the sequence, cut at a chunk boundary
    (:func:`subq.distributed.flash_chunk_attention`); RoPE uses the global positions, ``lin_scale`` defaults to 1/L
    of the whole sequence, parameter gradients are this shard's part (sum them over the group). No decoding.
    """

    def __init__(self, d_model: int, chunk_size: int = 256, expansion: int = 2, s: int = 128, causal: bool = False,
                 norm: str = "layernorm", rope: bool = True, rel_pos_bias: bool = True,
                 lin_scale: float | None = None, cp_group=None, device=None, dtype=None):
        chunk_size = check_int_choice(chunk_size, "chunk_size", CHUNK_SIZES)
        super().__init__(d_model, expansion, s, 4, norm, rope, device, dtype)
        causal, rel_pos_bias = check_bool(causal, "causal"), check_bool(rel_pos_bias, "rel_pos_bias")
        lin_scale = None if lin_scale is None else check_real(lin_scale, "lin_scale", finite=True)
        self.chunk_size, self.causal, self.lin_scale = chunk_size, causal, lin_scale
        self.cp_group = check_group(cp_group, "cp_group")
        self.rel_bias = None
        if rel_pos_bias:
            self.rel_bias = nn.Parameter(torch.zeros(2 * chunk_size - 1, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor, cache: FlashInferenceCache | None = None) -> torch.Tensor:
        """``x (B, L, d)``. With an empty ``cache`` (a prefill) the attention uses ``cache.lin_scale`` and the cache
        is left holding the L tokens' state for :meth:`step`."""
        self._check_input(x)
        lin_scale = self.lin_scale
        if cache is not None:
            self._check_no_cp("an inference cache")
            self._check_cache(cache, FlashInferenceCache, x, step=False)
            lin_scale = cache.lin_scale
        if self.cp_group is None:
            positions, attention = torch.arange(x.shape[1], device=x.device), flash_chunk_attention
        else:
            positions = shard_positions(x.shape[1], self.cp_group, x.device)
            attention = partial(distributed.flash_chunk_attention, group=self.cp_group)
        u, v, (q_quad, k_quad, q_lin, k_lin) = self._features(x, positions)
        out = attention(q_quad, k_quad, q_lin, k_lin, v, u=u, rel_bias=self.rel_bias, chunk_size=self.chunk_size,
                        causal=self.causal, lin_scale=lin_scale)
        if cache is not None:
            _prefill_decode_state(cache.state, k_quad.detach(), k_lin.detach(), v.detach())
        return x + self.proj_out(out)

    def _check_no_cp(self, what: str) -> None:
        if self.cp_group is not None:
            raise ValueError(f"{what} is not supported on a context-parallel FLASH layer (cp_group): decode with a "
                             "layer built without cp_group from the same weights")

    def allocate_inference_cache(self, batch_size: int, max_seqlen: int, dtype: torch.dtype | None = None
                                 ) -> FlashInferenceCache:
        self._check_no_cp("an inference cache")
        if not self.causal:
            raise ValueError("decoding needs a causal FLASH layer (causal=True)")
        if max_seqlen < 1:
            raise ValueError(f"max_seqlen must be positive, got {max_seqlen}")
        dtype = dtype or self.proj_in.weight.dtype
        state = FlashDecodeState.allocate(batch_size, self.chunk_size, self.s, self.e,
                                          device=self.proj_in.weight.device, dtype=dtype)
        return FlashInferenceCache(state, self.lin_scale if self.lin_scale is not None else 1.0 / max_seqlen)

    def step(self, x: torch.Tensor, cache: FlashInferenceCache) -> torch.Tensor:
        """The output for one token ``x (B, 1, d)`` at position ``cache.state.position``; advances the cache."""
        self._check_input(x)
        self._check_no_cp("step")
        self._check_cache(cache, FlashInferenceCache, x, step=True)
        position = torch.tensor([cache.state.position], device=x.device)
        u, v, (q_quad, k_quad, q_lin, k_lin) = self._features(x, position)
        out = flash_step(cache.state, q_quad, k_quad, q_lin, k_lin, v, u=u, rel_bias=self.rel_bias,
                         lin_scale=cache.lin_scale)
        return x + self.proj_out(out)

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, e={self.e}, s={self.s}, chunk_size={self.chunk_size}, "
                f"causal={self.causal}")


def shard_lengths(seqlen: int, group, device: torch.device) -> list[int]:
    """Every rank's shard length under context parallelism: one all-gather of an int64 (and a host sync)."""
    return gather_shard_layout(seqlen, {}, device, group)


def shard_positions(seqlen: int, group, device: torch.device) -> torch.Tensor:
    """The global positions of this rank's contiguous shard: the earlier ranks' lengths + the local index."""
    offset = sum(shard_lengths(seqlen, group, device)[:torch.distributed.get_rank(group)])
    return torch.arange(offset, offset + seqlen, device=device)


def _prefill_decode_state(state: FlashDecodeState, k_quad: torch.Tensor, k_lin: torch.Tensor,
                          v: torch.Tensor) -> None:
    """Leave an empty ``state`` as :func:`subq.ops.flash_step` would after the L tokens of ``(B, L, ·)`` keys and
    values: the chunk holding the last token stays open (flash_step folds a chunk into ``lin_state`` only when the
    next one starts), so ``lin_state`` sums the chunks before it and ``chunk_kv`` and the caches hold it."""
    seqlen, ct = v.shape[1], state.lin_state.dtype
    open_start = max(seqlen - 1, 0) // state.chunk_size * state.chunk_size
    k_quad, k_lin, v = k_quad.to(ct), k_lin.to(ct), v.to(ct)
    state.lin_state.copy_(k_lin[:, :open_start].transpose(1, 2) @ v[:, :open_start])
    state.chunk_kv.copy_(k_lin[:, open_start:].transpose(1, 2) @ v[:, open_start:])
    state.k_quad_cache[:, :seqlen - open_start] = k_quad[:, open_start:]
    state.v_cache[:, :seqlen - open_start] = v[:, open_start:]
    state.position = seqlen
