"""The Monarch Mixer's long convolution, causal or bidirectional, with fused gates and skip:
``subq.ops.monarch_conv``, and ``subq.ops.monarch_conv_filter`` to precompute a filter's spectrum.

Backed by ``torch.ops.subq.monarch_conv_fwd/bwd`` and ``torch.ops.subq.monarch_conv_filter``
(csrc/torch/monarch_conv.cpp). Both devices run one ATen composite by default, its transforms by ATen's FFT on CPU
and by the FFT-free Monarch DFT (csrc/monarch_conv/monarch_dft.h) on CUDA. Fused Monarch-DFT CUDA kernels, forward and
backward (csrc/monarch_conv/monarch_conv_fused_{fwd,bwd}.cu, same FFT size rule, :func:`fft_size`), are opt-in with
``SUBQ_EXPERIMENTAL_CONV_KERNELS=1`` until they have been verified on a GPU.
The Monarch transforms alone are exposed for tests and benchmarks as :func:`_monarch_rfft` / :func:`_monarch_irfft`.
"""

from __future__ import annotations

import operator

import torch

from subq import _C
from subq._utils import check_device, check_dtype_in, check_int, check_like, check_ndim, check_tensor

ALGORITHMS = ("auto", "fft", "monarch")
MAX_SEQLEN: int = _C.monarch_conv_max_seqlen  # the kernels' limit, declared once in csrc/monarch_conv/monarch_conv.h


def fft_size(seqlen: int) -> int:
    """The FFT size M the op uses for sequence length L: the smallest even ``2^a 3^b 5^c 7^d >= 2L``.

    Even, so the Monarch DFT can take the real transform as a complex one of length M/2. One rule, in C++
    (csrc/monarch_conv/monarch_conv.h), shared with the fused CUDA forward.
    """
    # operator.index specializes a traced shape: the size rule is a C++ call.
    return _C.monarch_conv_fft_size(operator.index(check_int(seqlen, "seqlen", 1, MAX_SEQLEN)))


def monarch_conv(
    u: torch.Tensor,
    k: torch.Tensor | None = None,
    *,
    k_rev: torch.Tensor | None = None,
    pregate: torch.Tensor | None = None,
    postgate: torch.Tensor | None = None,
    D: torch.Tensor | None = None,
    filter_spectrum: torch.Tensor | None = None,
    algorithm: str = "auto",
) -> torch.Tensor:
    r"""Long convolution along the sequence, per channel, with optional gates and skip (Monarch Mixer / Hyena)::

        v = pregate * u
        y = postgate * (conv(v, k) + D[:, None] * v)

    where, for batch b, channel h and position t (0-based, L = u.shape[-1])::

        causal (k_rev None):   conv(v)[t] = sum_{s <= t} k[t-s] v[s]                           (M2-GPT)
        bidirectional:         conv(v)[t] = sum_{s <= t} k[t-s] v[s] + sum_{s > t} k_rev[s-t-1] v[s]   (M2-BERT)

    A linear (not circular) convolution: computed as a circular one of size M = :func:`fft_size` (L) >= 2L on the
    zero-padded input, keeping the first L outputs. The bidirectional form is one such convolution with a combined
    filter c of length M: ``c[j] = k[j]`` and ``c[M-1-j] = k_rev[j]`` (k_rev reversed, at the negative offsets
    -1, -2, ...); because M >= 2L the two halves never meet and nothing wraps around (length L never reaches
    ``k_rev[L-1]``, but a longer one with the same M does).

    Shapes: ``u (B, H, L)`` with any L >= 1 (not only powers of two); ``k``, ``k_rev (H, Lk)`` with ``1 <= Lk <= L``
    (shorter filters are zero-extended); ``pregate``, ``postgate`` like u; ``D (H,)``. Each of k_rev, pregate,
    postgate and D is optional.

    Dtypes: u and the gates in float16, bfloat16, float32 or float64; k, k_rev and D in u's dtype or float32.
    Transforms and accumulation in float32 (float64 for float64 u); y in u's dtype. Causality holds exactly in
    the math and up to FFT round-off in floating point (a change of u at t moves earlier outputs by about
    eps * |u|). NaN/Inf policy: a NaN or Inf in one (b, h) row of u or the gates, or in one channel's filter,
    makes every output of that row / channel NaN (the transform mixes all positions); other rows are untouched.

    ``filter_spectrum``: a precomputed ``monarch_conv_filter(k, L, k_rev)`` passed instead of k (and k_rev) for
    inference or frozen filters. It is valid for every L with the same :func:`fft_size`, longer or shorter than the
    L it was made for (it holds every tap of k and k_rev). No gradient reaches the filter through a spectrum;
    gradients of u, the gates and D still do.

    ``algorithm``: how the real transforms of length M (forward and backward) are computed. ``"fft"``: ATen's FFT
    (pocketfft on CPU, cuFFT on CUDA). ``"monarch"``: the Monarch DFT of the Monarch Mixer paper, no FFT library:
    M/2 complex values (the real input read as half-size complex) transformed by 2 to 4 stages of batched dense
    DFT matmuls of size <= 64 with twiddle diagonals between them (csrc/monarch_conv/monarch_dft.h). ``"auto"``
    (default): ``"fft"`` on CPU, ``"monarch"`` on CUDA. Both agree to float rounding and give the spectrum in the
    same bin order, so a ``filter_spectrum`` serves either.

    Differentiable in u, k, k_rev, pregate, postgate and D.
    """
    _check_args(u, k, k_rev, pregate, postgate, D, filter_spectrum)
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {', '.join(map(repr, ALGORITHMS))}, got {algorithm!r}")
    return torch.ops.subq.monarch_conv_fwd(u, k, k_rev, filter_spectrum, pregate, postgate, D, algorithm)


def monarch_conv_filter(k: torch.Tensor, seqlen: int, k_rev: torch.Tensor | None = None) -> torch.Tensor:
    """The spectrum of a long-convolution filter, for ``monarch_conv(u, filter_spectrum=...)``.

    Returns ``torch.fft.rfft(c, M)`` of the combined filter c described in :func:`monarch_conv` (k at offsets
    0..Lk-1, k_rev reversed at the end when given), with ``M = fft_size(seqlen)``: shape ``(H, M // 2 + 1)``,
    complex64 (complex128 for a float64 k; pass it with float64 u). Usable for any sequence length with the same
    FFT size. Computed once, it saves one transform per call and can be shared by every call of a layer at that
    length. Inference only: the result carries no gradient to k or k_rev. Transformed as ``monarch_conv``'s
    ``algorithm="auto"`` does (ATen's FFT on CPU, the Monarch DFT on CUDA); the bins are the same either way.
    """
    check_tensor(k, "k")
    check_ndim(k, 2, "k", "(nheads, filter_len)")
    if k_rev is not None:
        check_tensor(k_rev, "k_rev")
        check_like(k_rev, k, "k_rev", "k")
        if k_rev.shape != k.shape:
            raise ValueError(f"k_rev must have k's shape {tuple(k.shape)}, got {tuple(k_rev.shape)}")
        k_rev = k_rev.detach()
    seqlen = check_int(seqlen, "seqlen")
    if not max(1, k.shape[1]) <= seqlen <= MAX_SEQLEN:
        raise ValueError(f"seqlen must be an int >= k's length ({k.shape[1]}) and 1, and <= {MAX_SEQLEN}, "
                         f"got {seqlen}")
    return torch.ops.subq.monarch_conv_filter(k.detach(), k_rev, seqlen)


def _monarch_rfft(x: torch.Tensor, n: int) -> torch.Tensor:
    """``torch.fft.rfft(x, n)`` along the last dim by the Monarch DFT (internal: what ``algorithm="monarch"`` runs).

    x float32 or float64, zero-padded or cut to n; n even with n/2 7-smooth (every :func:`fft_size` is). Returns
    ``(..., n // 2 + 1)`` complex64 or complex128. No autograd.
    """
    return torch.ops.subq.monarch_rfft(x, n)


def _monarch_irfft(X: torch.Tensor, n: int) -> torch.Tensor:
    """``torch.fft.irfft(X, n)`` along the last dim by the Monarch DFT (internal): X complex64 or complex128,
    zero-padded or cut to ``n // 2 + 1`` bins, the imaginary parts of bins 0 and n/2 ignored; n as for
    :func:`_monarch_rfft`. No autograd."""
    return torch.ops.subq.monarch_irfft(X, n)


def _check_args(u, k, k_rev, pregate, postgate, D, filter_spectrum):
    check_tensor(u, "u")
    check_ndim(u, 3, "u", "(batch, nheads, seqlen)")
    _, nheads, seqlen = u.shape
    if not 1 <= seqlen <= MAX_SEQLEN:
        raise ValueError(f"u's seqlen (u.shape[2]) must be in [1, {MAX_SEQLEN}], got shape {tuple(u.shape)}")
    params = tuple(dict.fromkeys((u.dtype, torch.float32)))
    if (k is None) == (filter_spectrum is None):
        raise ValueError("pass exactly one of k and filter_spectrum")
    if k is not None:
        check_tensor(k, "k")
        check_ndim(k, 2, "k", "(nheads, filter_len)")
        if k.shape[0] != nheads or not 1 <= k.shape[1] <= seqlen:
            raise ValueError(f"k must have shape (nheads, filter_len) with nheads = {nheads} and 1 <= filter_len "
                             f"<= seqlen = {seqlen}, got {tuple(k.shape)}")
        check_dtype_in(k, "k", params, "u's dtype or float32")
        check_device(k, u, "k", "u")
    if k_rev is not None:
        if k is None:
            raise ValueError("k_rev is part of a precomputed filter_spectrum (pass it to monarch_conv_filter)")
        check_tensor(k_rev, "k_rev")
        check_like(k_rev, k, "k_rev", "k")
        if k_rev.shape != k.shape:
            raise ValueError(f"k_rev must have k's shape {tuple(k.shape)}, got {tuple(k_rev.shape)}")
    if filter_spectrum is not None:
        _check_spectrum(filter_spectrum, u)
    for name, gate in (("pregate", pregate), ("postgate", postgate)):
        if gate is not None:
            check_tensor(gate, name)
            check_like(gate, u, name, "u")
            if gate.shape != u.shape:
                raise ValueError(f"{name} must have u's shape {tuple(u.shape)}, got {tuple(gate.shape)}")
    if D is not None:
        check_tensor(D, "D")
        if tuple(D.shape) != (nheads,):
            raise ValueError(f"D must have shape (nheads,) = ({nheads},), got {tuple(D.shape)}")
        check_dtype_in(D, "D", params, "u's dtype or float32")
        check_device(D, u, "D", "u")


def _check_spectrum(spectrum, u):
    if not isinstance(spectrum, torch.Tensor):
        raise TypeError(f"filter_spectrum must be a torch.Tensor, got {type(spectrum).__name__}")
    want = torch.complex128 if u.dtype == torch.float64 else torch.complex64
    if spectrum.dtype != want:
        raise ValueError(f"filter_spectrum.dtype must be {want} for u of dtype {u.dtype} (from monarch_conv_filter), "
                         f"got {spectrum.dtype}")
    check_device(spectrum, u, "filter_spectrum", "u")
    if spectrum.dim() != 2 or spectrum.shape[0] != u.shape[1]:
        raise ValueError(f"filter_spectrum must have shape (nheads, fft_size(seqlen) // 2 + 1) with nheads = "
                         f"{u.shape[1]}, got {tuple(spectrum.shape)}")
    if not torch.compiler.is_compiling():  # the size rule is a C++ call; under compile the op's own check runs
        bins = fft_size(u.shape[2]) // 2 + 1
        if spectrum.shape[1] != bins:
            raise ValueError(f"filter_spectrum was made for another FFT size: seqlen {u.shape[2]} needs "
                             f"{bins} bins (fft_size {fft_size(u.shape[2])}), got {spectrum.shape[1]}")


# ---- fake kernels (shapes only), for torch.compile and meta tensors ------------------------------------------------


@torch.library.register_fake("subq::monarch_conv_fwd")
def _fwd_fake(u, k, k_rev, filter_spectrum, pregate, postgate, D, algorithm="auto"):
    return torch.empty_like(u)


@torch.library.register_fake("subq::monarch_conv_bwd")
def _bwd_fake(dy, u, k, k_rev, filter_spectrum, pregate, postgate, D, algorithm="auto"):
    def like(t):
        return torch.empty_like(t) if t is not None else u.new_empty((0,))

    return [like(t) for t in (u, k, k_rev, pregate, postgate, D)]


@torch.library.register_fake("subq::monarch_conv_filter")
def _filter_fake(k, k_rev, seqlen):
    dtype = torch.complex128 if k.dtype == torch.float64 else torch.complex64
    return k.new_empty((k.shape[0], fft_size(seqlen) // 2 + 1), dtype=dtype)


@torch.library.register_fake("subq::monarch_rfft")
def _rfft_fake(x, n):
    dtype = torch.complex128 if x.dtype == torch.float64 else torch.complex64
    return x.new_empty((*x.shape[:-1], n // 2 + 1), dtype=dtype)


@torch.library.register_fake("subq::monarch_irfft")
def _irfft_fake(X, n):
    dtype = torch.float64 if X.dtype == torch.complex128 else torch.float32
    return X.new_empty((*X.shape[:-1], n), dtype=dtype)


# ---- autograd -------------------------------------------------------------------------------------------------------


def _setup_context(ctx, inputs, output):
    *tensors, ctx.algorithm = inputs
    ctx.save_for_backward(*tensors)


def _backward(ctx, dy):
    u, k, k_rev, filter_spectrum, pregate, postgate, D = ctx.saved_tensors
    du, dk, dk_rev, dpregate, dpostgate, dD = torch.ops.subq.monarch_conv_bwd(
        dy.contiguous(), u, k, k_rev, filter_spectrum, pregate, postgate, D, ctx.algorithm
    )

    def present(g, t):
        return g if t is not None else None

    return (du, present(dk, k), present(dk_rev, k_rev), None, present(dpregate, pregate),
            present(dpostgate, postgate), present(dD, D), None)


torch.library.register_autograd("subq::monarch_conv_fwd", _backward, setup_context=_setup_context)
