"""Monarch Mixer (M2) layers on subq.ops: the implicit long filter, the sequence mixer and the dimension mixer.

After Fu et al., "Monarch Mixer" (2023) and HazyResearch's M2 code; the long convolution is subq.ops.monarch_conv,
the MLP's matrices are subq.nn.BlockdiagLinear.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from subq.nn.monarch_linear import BlockdiagLinear
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

    def spectrum(self, seqlen: int) -> torch.Tensor:
        """The filters' spectrum at length ``seqlen`` for ``monarch_conv(..., filter_spectrum=...)`` (inference)."""
        with torch.no_grad():
            k = self(seqlen)
        k, k_rev = k if self.bidirectional else (k, None)
        return monarch_conv_filter(k, seqlen, k_rev=k_rev)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, max_seq_len={self.max_seq_len}, bidirectional={self.bidirectional}"


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
    """

    def __init__(self, d_model: int, max_seq_len: int, *, bidirectional: bool = True, residual_long_conv: bool = True,
                 short_conv_width: int = 3, filter_kwargs: dict | None = None, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.d_model, self.max_seq_len = d_model, max_seq_len
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
        k = filt(u.shape[-1])
        k, k_rev = k if self.bidirectional else (k, None)
        return monarch_conv(u, k.to(_param_dtype(u)), k_rev=None if k_rev is None else k_rev.to(_param_dtype(u)),
                            D=D.to(_param_dtype(u)), **gates)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"input must be (batch, seqlen, d_model={self.d_model}), got shape {tuple(x.shape)}")
        seqlen = x.shape[1]
        streams = self.in_proj(x).transpose(1, 2)                          # (B, 3d, L)
        # padding = width - 1 on both sides, keep the first L: output t sees inputs t-width+1..t only (causal).
        streams = self.short_conv(streams)[..., :seqlen]
        x1, x2, v = streams.split(self.d_model, dim=1)
        y = self._long_conv(self.filter, v, self.D, pregate=x1, postgate=x2)
        if self.residual_long_conv:
            y = y + self._long_conv(self.residual_filter, x.transpose(1, 2), self.residual_D)
        return self.out_proj(y.transpose(1, 2))

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, max_seq_len={self.max_seq_len}, bidirectional={self.bidirectional}, "
                f"residual_long_conv={self.residual_long_conv}")


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
        return self.out_proj(self.activation(gated) * linear)
