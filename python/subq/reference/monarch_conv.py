"""The Monarch Mixer long convolution, written out: a direct O(L²) Toeplitz product and the torch.fft form.

For batch b, channel h and position t, with v = pregate * u::

    y[t] = postgate[t] * (sum_{s<=t} k[t-s] v[s]  +  sum_{s>t} k_rev[s-t-1] v[s]  +  D * v[t])

The k_rev sum is present only for the bidirectional (M2-BERT) form; filters shorter than L are zero-extended.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _gate(u, pregate):
    return u if pregate is None else u * pregate


def _finish(y, v, postgate, D):
    if D is not None:
        y = y + v * D[:, None]
    return y if postgate is None else y * postgate


def toeplitz(k, seqlen, k_rev=None):
    """The (H, L, L) matrix T with y = T v: T[h, t, s] = k[h, t-s] for s <= t, k_rev[h, s-t-1] for s > t."""
    k = F.pad(k, (0, seqlen - k.shape[1]))
    k_rev = torch.zeros_like(k) if k_rev is None else F.pad(k_rev, (0, seqlen - k_rev.shape[1]))
    pos = torch.arange(seqlen, device=k.device)
    lag = pos[:, None] - pos[None, :]                                   # t - s
    return torch.where(lag >= 0, k[:, lag.clamp(min=0)], k_rev[:, (-lag - 1).clamp(min=0)])


def monarch_conv_ref(u, k, k_rev=None, pregate=None, postgate=None, D=None):
    """Direct O(L²) convolution by the Toeplitz matrix, in the inputs' dtype: pass float64, small L."""
    v = _gate(u, pregate)
    y = torch.einsum("hts,bhs->bht", toeplitz(k.to(v.dtype), u.shape[-1], k_rev), v)
    return _finish(y, v, postgate, D)


def monarch_conv_fft_ref(u, k, k_rev=None, pregate=None, postgate=None, D=None):
    """The usual PyTorch form (HazyResearch's fftconv_ref): rfft/irfft at n = 2L, the bidirectional filter as one
    length-2L filter with k_rev reversed in its upper half. Gates and skip in the inputs' dtype; the transforms in
    float32 (float64 for float64 u), since torch.fft has no bfloat16 and only power-of-two float16."""
    seqlen = u.shape[-1]
    n = 2 * seqlen
    fdtype = torch.float64 if u.dtype == torch.float64 else torch.float32
    v = _gate(u, pregate)
    filt = F.pad(k.to(fdtype), (0, n - k.shape[1]))
    if k_rev is not None:
        filt = filt + F.pad(k_rev.to(fdtype).flip(-1), (n - k_rev.shape[1], 0))
    spectrum = torch.fft.rfft(filt, n=n)
    y = torch.fft.irfft(torch.fft.rfft(v.to(fdtype), n=n) * spectrum, n=n)[..., :seqlen].to(u.dtype)
    return _finish(y, v, postgate, D.to(u.dtype) if D is not None else None)
