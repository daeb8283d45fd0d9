"""Monarch Mixer (M2) layers on subq.ops: the implicit long filter, the sequence mixer and the dimension mixer.

After Fu et al., "Monarch Mixer" (2023) and HazyResearch's M2 code; the long convolution is subq.ops.monarch_conv,
the MLP's matrices are subq.nn.BlockdiagLinear.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from subq._utils import check_bool, check_tensor
from subq.nn.monarch_linear import BlockdiagLinear
from subq.ops.causal_conv1d import causal_conv1d_update
from subq.ops.monarch_conv import monarch_conv, monarch_conv_filter


class Sin(nn.Module):
    """sin(freq * x) with a learned frequency per feature: the implicit filter's activation (Hyena)."""

    def __init__(self, features: int, freq: float = 10.0, device=None, dtype=None):
        super().__init__()
        self.freq = nn.Parameter(torch.full((features,), float(freq), device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sin(self.freq * x)


class _ImplicitFilter(nn.Module):
    """One filter bank: positional features -> MLP with sine activations -> exponential decay, (channels, L)."""

    def __init__(self, channels, emb_dim, order, num_inner_mlps, sine_freq, decay_range, shift, device, dtype):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        layers: list[nn.Module] = [nn.Linear(emb_dim, order, **factory), Sin(order, sine_freq, **factory)]
        for _ in range(num_inner_mlps):
            layers += [nn.Linear(order, order, **factory), Sin(order, sine_freq, **factory)]
        layers.append(nn.Linear(order, channels, bias=False, **factory))
        self.mlp = nn.Sequential(*layers)
        # exp(-|rate| * tau) falls to `target` at tau = slow_decay_pct (first channel) .. fast_decay_pct (last).
        slow, fast = decay_range
        self.register_buffer("decay_rates", torch.linspace(slow, fast, channels, **factory), persistent=False)
        self.shift = shift

    def forward(self, features: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        # float32 (float64) whatever the parameters' dtype and autocast: a bfloat16 sine MLP with frequencies ~10
        # loses ~0.1 rad of phase, which makes the filter (and the layer) ~20% off.
        ct = features.dtype
        h = features
        with torch.autocast(features.device.type, enabled=False):
            for layer in self.mlp:
                if isinstance(layer, Sin):
                    h = torch.sin(layer.freq.to(ct) * h)
                else:
                    h = F.linear(h, layer.weight.to(ct), None if layer.bias is None else layer.bias.to(ct))
            decay = torch.exp(-t[:, None] * self.decay_rates.to(ct).abs())
        return (h * (decay + self.shift)).t()                               # (channels, L)


class HyenaFilter(nn.Module):
    """Implicit long convolution filters, one per channel, for any length up to ``max_seq_len`` (Hyena / M2).

    For positions t = 0..L-1, with normalized time tau = t / (max_seq_len - 1) and w = 2*pi*t / max_seq_len::

        features(t) = [tau, cos(f_1 w), ..., cos(f_n w), -sin(f_1 w), ..., -sin(f_n w)]   (emb_dim = 2n + 1)
        k[c, t]     = MLP(features(t))[c] * (exp(-tau * |rate_c|) + shift)

    with the MLP ``emb_dim -> order -> (order ->)*num_inner_mlps -> channels``, sine activations of learned frequency
    (initially ``sine_freq``), and decay rates spread linearly over channels so that the window falls to ``target``
    at tau = ``fast_decay_pct`` for the fastest channel and at ``slow_decay_pct`` for the slowest. The features are
    fixed by max_seq_len, so the filter at length L is the first L taps of the filter at max_seq_len.

    ``forward(L)`` returns ``k (channels, L)``, or ``(k, k_rev)`` with ``bidirectional=True``: a second filter bank
    of its own for the anti-causal half (M2-BERT). Filters are computed and returned in float32 (float64 for float64
    parameters) whatever the parameters' dtype or autocast. ``spectrum(L)`` is the precomputed
    :func:`subq.ops.monarch_conv_filter` of those filters, for inference.
    """

    def __init__(self, channels: int, max_seq_len: int, *, bidirectional: bool = False, emb_dim: int = 3,
                 order: int = 16, num_inner_mlps: int = 2, sine_freq: float = 10.0, fast_decay_pct: float = 0.3,
                 slow_decay_pct: float = 1.5, target: float = 1e-2, shift: float = 0.0, device=None, dtype=None):
        super().__init__()
        bidirectional = check_bool(bidirectional, "bidirectional")
        if emb_dim < 3 or emb_dim % 2 == 0:
            raise ValueError(f"emb_dim must be odd and >= 3 (time plus cos/sin pairs), got {emb_dim}")
        if max_seq_len < 1 or channels < 1:
            raise ValueError(f"channels and max_seq_len must be positive, got {channels} and {max_seq_len}")
        self.channels, self.max_seq_len, self.bidirectional = channels, max_seq_len, bidirectional
        self.emb_dim = emb_dim
        decay_range = (math.log(target) / slow_decay_pct, math.log(target) / fast_decay_pct)
        args = (channels, emb_dim, order, num_inner_mlps, sine_freq, decay_range, shift, device, dtype)
        self.fwd = _ImplicitFilter(*args)
        self.rev = _ImplicitFilter(*args) if bidirectional else None

    def positional_features(self, seqlen: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(features (L, emb_dim), tau (L,)): float32 (float64 for float64 parameters), on the parameters' device."""
        ref = self.fwd.decay_rates
        dtype = torch.float64 if ref.dtype == torch.float64 else torch.float32
        t = torch.arange(seqlen, device=ref.device, dtype=torch.float64)
        tau = t / max(1, self.max_seq_len - 1)
        bands = (self.emb_dim - 1) // 2
        freqs = torch.linspace(1e-4, bands - 1, bands, device=ref.device, dtype=torch.float64)
        angle = freqs[None, :] * (2 * math.pi * t / self.max_seq_len)[:, None]
        features = torch.cat([tau[:, None], torch.cos(angle), -torch.sin(angle)], dim=1)
        return features.to(dtype), tau.to(dtype)

    def forward(self, seqlen: int) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if not 1 <= seqlen <= self.max_seq_len:
            raise ValueError(f"seqlen must be in 1..max_seq_len={self.max_seq_len}, got {seqlen}")
        features, tau = self.positional_features(seqlen)
        k = self.fwd(features, tau)
        return (k, self.rev(features, tau)) if self.rev is not None else k

    def spectrum(self, seqlen: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The filters' spectrum at length ``seqlen`` for ``monarch_conv(..., filter_spectrum=...)`` (inference),
        from the filters cast to ``dtype`` when given."""
        with torch.no_grad():
            k = self(seqlen)
        k, k_rev = k if self.bidirectional else (k, None)
        if dtype is not None:
            k, k_rev = k.to(dtype), None if k_rev is None else k_rev.to(dtype)
        return monarch_conv_filter(k, seqlen, k_rev=k_rev)

    def cached_spectrum(self, seqlen: int, dtype: torch.dtype) -> torch.Tensor:
        """:meth:`spectrum`, kept until the length, the dtype or the parameters change (storage or in-place
        version), so inference computes the implicit filter and its transform once, not on every call."""
        key = (seqlen, dtype, tuple((p.data_ptr(), p._version) for p in self.parameters()))
        if getattr(self, "_spectrum_key", None) != key:
            self._spectrum, self._spectrum_key = self.spectrum(seqlen, dtype), key
        return self._spectrum

    def extra_repr(self) -> str:
        return f"channels={self.channels}, max_seq_len={self.max_seq_len}, bidirectional={self.bidirectional}"


@dataclass
class M2InferenceCache:
    """Decoding state of one causal M2 sequence mixer: what the next token's output depends on.

    A long convolution has no finite recurrent state, so the cache keeps its whole input history; each new output
    is the causal sum of that history against the filter taps (O(t) per token, exact). The taps are computed once
    at allocation: a HyenaFilter tap depends on its position only, not on the length asked for.
    """

    short_conv_state: torch.Tensor          # (batch, 3 * d_model, width - 1): the latest in_proj outputs
    conv_inputs: torch.Tensor               # (batch, d_model, max_seqlen): x1 * v, the gated long conv's input
    taps: torch.Tensor                      # (d_model, max_seqlen)
    residual_inputs: torch.Tensor | None    # (batch, d_model, max_seqlen): x, the residual long conv's input
    residual_taps: torch.Tensor | None      # (d_model, max_seqlen)
    length: int = 0                         # positions filled


class M2SequenceMixer(nn.Module):
    """The Monarch Mixer sequence mixer: gated long convolution with an implicit filter, (B, L, d) -> (B, L, d).

    ::

        x1, x2, v = shortconv(in_proj(x))            # d -> 3d, depthwise width-`short_conv_width` conv per stream
        y = x2 * (longconv(x1 * v, k) + D * (x1 * v))  # one fused subq.ops.monarch_conv
        y = y + longconv(x, k_res) + D_res * x       # residual_long_conv: a long conv of the raw input
        out = out_proj(y)                            # d -> d

    ``bidirectional=True`` (M2-BERT) gives each long convolution an anti-causal half too; ``bidirectional=False``
    (M2-GPT) is causal end to end: the long convolutions and the short convolution (left-padded, as in HazyResearch's
    M2, which keeps the short conv causal in both modes) only look back. Filters are computed in the parameters'
    dtype (float32) and passed with activations of any supported dtype.

    Causal decoding (M2-GPT): ``forward(x, cache=...)`` with a cache from :meth:`allocate_inference_cache`
    continues from the cached positions (a prefill, in one or more chunks) and :meth:`step` adds one token; both
    give the outputs the full forward gives those positions.
    """

    def __init__(self, d_model: int, max_seq_len: int, *, bidirectional: bool = True, residual_long_conv: bool = True,
                 short_conv_width: int = 3, filter_kwargs: dict | None = None, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.d_model, self.max_seq_len = d_model, max_seq_len
        bidirectional = check_bool(bidirectional, "bidirectional")
        residual_long_conv = check_bool(residual_long_conv, "residual_long_conv")
        self.bidirectional, self.residual_long_conv = bidirectional, residual_long_conv
        self.in_proj = nn.Linear(d_model, 3 * d_model, **factory)
        self.short_conv = nn.Conv1d(3 * d_model, 3 * d_model, short_conv_width, groups=3 * d_model,
                                    padding=short_conv_width - 1, **factory)
        filter_kwargs = dict(filter_kwargs or {}, bidirectional=bidirectional, **factory)
        self.filter = HyenaFilter(d_model, max_seq_len, **filter_kwargs)
        self.D = nn.Parameter(torch.randn(d_model, **factory))
        if residual_long_conv:
            self.residual_filter = HyenaFilter(d_model, max_seq_len, **filter_kwargs)
            self.residual_D = nn.Parameter(torch.randn(d_model, **factory))
        self.out_proj = nn.Linear(d_model, d_model, **factory)

    def _long_conv(self, filt: HyenaFilter, u: torch.Tensor, D: torch.Tensor, **gates) -> torch.Tensor:
        if not torch.is_grad_enabled() and not torch.compiler.is_compiling():  # inference: the filter is constant
            spectrum = filt.cached_spectrum(u.shape[-1], _param_dtype(u))
            return monarch_conv(u, filter_spectrum=spectrum, D=D.to(_param_dtype(u)), **gates)
        k = filt(u.shape[-1])
        k, k_rev = k if self.bidirectional else (k, None)
        return monarch_conv(u, k.to(_param_dtype(u)), k_rev=None if k_rev is None else k_rev.to(_param_dtype(u)),
                            D=D.to(_param_dtype(u)), **gates)

    def forward(self, x: torch.Tensor, cache: M2InferenceCache | None = None) -> torch.Tensor:
        if check_tensor(x, "input").dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"input must be (batch, seqlen, d_model={self.d_model}), got shape {tuple(x.shape)}")
        seqlen = x.shape[1]
        # The filters' own check, made before an empty sequence reaches the short conv and fails inside conv1d.
        if not 1 <= seqlen <= self.max_seq_len:
            raise ValueError(f"seqlen must be in 1..max_seq_len={self.max_seq_len}, got {seqlen}")
        if cache is not None:
            return self._forward_cached(x, cache)
        streams = _linear_to_channels(self.in_proj, x)                      # (B, 3d, L)
        # padding = width - 1 on both sides, keep the first L: output t sees inputs t-width+1..t only (causal).
        streams = self.short_conv(streams)[..., :seqlen]
        x1, x2, v = streams.split(self.d_model, dim=1)
        y = self._long_conv(self.filter, v, self.D, pregate=x1, postgate=x2)
        if self.residual_long_conv:
            y = y + self._long_conv(self.residual_filter, x.transpose(1, 2), self.residual_D)
        return _linear_from_channels(self.out_proj, y)

    # ---- causal decoding ----------------------------------------------------------------------------------------

    def allocate_inference_cache(self, batch_size: int, max_seqlen: int,
                                 dtype: torch.dtype | None = None) -> M2InferenceCache:
        """An empty cache for ``batch_size`` sequences of up to ``max_seqlen`` positions (causal mixers only).

        The short conv state is in ``dtype`` (default: the parameters'); histories and taps in float32 (float64
        for float64 parameters), the long convolution's accumulation dtype.
        """
        if self.bidirectional:
            raise ValueError("decoding needs a causal M2SequenceMixer (bidirectional=False): a bidirectional "
                             "output depends on later tokens")
        if not 1 <= max_seqlen <= self.max_seq_len:
            raise ValueError(f"max_seqlen must be in 1..max_seq_len={self.max_seq_len}, got {max_seqlen}")
        width = self.short_conv.kernel_size[0]
        if not 2 <= width <= 4:  # the widths subq.ops.causal_conv1d_update steps
            raise ValueError(f"decoding needs short_conv_width in 2..4, this mixer has {width}")
        weight = self.in_proj.weight
        dtype = dtype or weight.dtype
        state_dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
        history = (batch_size, self.d_model, max_seqlen)
        with torch.no_grad():
            taps = self.filter(max_seqlen).to(state_dtype)
            residual_taps = self.residual_filter(max_seqlen).to(state_dtype) if self.residual_long_conv else None
        return M2InferenceCache(
            short_conv_state=torch.zeros(batch_size, 3 * self.d_model, width - 1, device=weight.device, dtype=dtype),
            conv_inputs=torch.zeros(history, device=weight.device, dtype=state_dtype),
            taps=taps,
            residual_inputs=(torch.zeros(history, device=weight.device, dtype=state_dtype)
                             if self.residual_long_conv else None),
            residual_taps=residual_taps,
        )

    def step(self, x: torch.Tensor, cache: M2InferenceCache) -> torch.Tensor:
        """The output for one token, ``x (batch, d_model)`` or ``(batch, 1, d_model)``; advances ``cache``."""
        if x.dim() == 2:
            return self(x[:, None], cache=cache)[:, 0]
        if x.dim() != 3 or x.shape[1] != 1:
            raise ValueError(f"step takes one token, x of shape (batch, d_model) or (batch, 1, d_model), got "
                             f"{tuple(x.shape)}")
        return self(x, cache=cache)

    def _forward_cached(self, x: torch.Tensor, cache: M2InferenceCache) -> torch.Tensor:
        if not isinstance(cache, M2InferenceCache):
            raise TypeError(f"cache must come from allocate_inference_cache, got {type(cache).__name__}")
        batch, capacity = cache.conv_inputs.shape[0], cache.conv_inputs.shape[2]
        if x.shape[0] != batch:
            raise ValueError(f"the cache holds {batch} sequences, x has {x.shape[0]}")
        start, end = cache.length, cache.length + x.shape[1]
        if end > capacity:
            raise ValueError(f"the cache holds {capacity} positions; {end} needed")
        state = cache.short_conv_state
        streams = causal_conv1d_update(self.in_proj(x).transpose(1, 2).to(state.dtype), state,
                                       self.short_conv.weight.squeeze(1), self.short_conv.bias)
        x1, x2, v = streams.split(self.d_model, dim=1)
        y = x2 * _history_conv(cache.conv_inputs, cache.taps, x1 * v, self.D, start)
        if self.residual_long_conv:
            y = y + _history_conv(cache.residual_inputs, cache.residual_taps, x.transpose(1, 2), self.residual_D,
                                  start)
        cache.length = end
        return self.out_proj(y.transpose(1, 2).to(x.dtype))

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, max_seq_len={self.max_seq_len}, bidirectional={self.bidirectional}, "
                f"residual_long_conv={self.residual_long_conv}")


def _history_conv(history: torch.Tensor, taps: torch.Tensor, u: torch.Tensor, D: torch.Tensor,
                  start: int) -> torch.Tensor:
    """Record ``u (B, d, T)`` at positions start..start+T-1 of ``history`` and return the causal long convolution
    plus skip there: ``sum_{s <= t} taps[t - s] history[s] + D * u[t]``."""
    end = start + u.shape[-1]
    history[..., start:end] = u
    if u.shape[-1] == 1:  # one token: a dot product with the reversed taps, cheaper than transforming the history
        conv = (history[..., :end] * taps[:, :end].flip(-1)).sum(-1, keepdim=True)
    else:
        conv = monarch_conv(history[..., :end], taps[:, :end])[..., start:]
    return conv + D[:, None].to(conv.dtype) * history[..., start:end]


def _linear_to_channels(linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``linear(x).transpose(1, 2)`` for ``x (B, L, d_in)``, contiguous ``(B, d_out, L)``: computed as ``W x^T``, so
    the depthwise conv that reads it (and needs it contiguous) gets it without a transposing copy."""
    weight = linear.weight.expand(x.shape[0], *linear.weight.shape)
    if linear.bias is None:
        return torch.bmm(weight, x.transpose(1, 2))
    return torch.baddbmm(linear.bias[:, None], weight, x.transpose(1, 2))


def _linear_from_channels(linear: nn.Linear, y: torch.Tensor) -> torch.Tensor:
    """``linear(y.transpose(1, 2))`` for channel-major ``y (B, d_in, L)``: one batched GEMM reading y's blocks as
    column-major matrices, where ``nn.Linear`` would first copy a transposed batch into token-major rows."""
    weight_t = linear.weight.t().expand(y.shape[0], *linear.weight.t().shape)
    if linear.bias is None:
        return torch.bmm(y.transpose(1, 2), weight_t)
    return torch.baddbmm(linear.bias, y.transpose(1, 2), weight_t)


def _param_dtype(u: torch.Tensor) -> torch.dtype:
    """monarch_conv takes filters and D in float32 or u's dtype; float64 activations get float64 filters."""
    return u.dtype if u.dtype in (torch.float32, torch.float64) else torch.float32


class M2DimensionMixer(nn.Module):
    """The M2-BERT dimension mixer: a gated (GLU) MLP whose two matrices are block-diagonal, (..., d) -> (..., d).

    ::

        gated, linear = W_in x          # BlockdiagLinear(d, 2 * expansion * d, nblocks), no bias
        out = W_out (act(gated) * linear)   # BlockdiagLinear(expansion * d, d, nblocks)

    ``act`` is GELU (exact) by default. Residual connections and normalization belong to the enclosing block.
    """

    def __init__(self, d_model: int, expansion: int = 4, nblocks: int = 4, activation=F.gelu, device=None,
                 dtype=None):
        super().__init__()
        hidden = expansion * d_model
        self.d_model, self.hidden = d_model, hidden
        self.in_proj = BlockdiagLinear(d_model, 2 * hidden, nblocks=nblocks, bias=False, device=device, dtype=dtype)
        self.out_proj = BlockdiagLinear(hidden, d_model, nblocks=nblocks, device=device, dtype=dtype)
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gated, linear = self.in_proj(x).split(self.hidden, dim=-1)
        hidden = self.activation(gated)
        # Inference multiplies in place: one (tokens, hidden) temporary less, the GLU's largest after in_proj's.
        hidden = hidden * linear if torch.is_grad_enabled() else hidden.mul_(linear)
        return self.out_proj(hidden)
