"""The FFT-free Monarch DFT (torch.ops.subq.monarch_rfft/irfft, what monarch_conv(algorithm="monarch") runs) against
torch.fft, which here is the reference: float64 torch.fft for the error budget of float32."""

from __future__ import annotations

import pytest
import torch

from conftest import DEVICES, assert_within_budget
from subq.ops.monarch_conv import _monarch_irfft, _monarch_rfft, fft_size

# Even M with M/2 7-smooth: powers of two, 3·2^k, 2·3·5·7 and multiples, powers of 3, 5 and 7 (unbalanced factors),
# and N = M/2 on both sides of the order tiers (1K: order 2 -> 3, 32K: 3 -> 4).
SIZES = [2, 4, 6, 8, 10, 14, 16, 64, 4096, 2**17, 96, 3 * 2**10, 3 * 2**14, 210, 420, 210 * 64, 2 * 3**5, 2 * 5**4,
         2 * 7**3, 2 * 7**4, 2 * 3**8, 2 * 1024, 2 * 1029, 2 * 32768, 2 * 32805]
FFT_SIZES = sorted({fft_size(seqlen) for seqlen in range(1, 130)})
DTYPES = [torch.float32, torch.float64]
REL_TOL = {torch.float32: 1e-5, torch.float64: 1e-12}
COMPLEX = {torch.float32: torch.complex64, torch.float64: torch.complex128}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Max error relative to the largest |ref|, complex values compared as such (conftest's max_err is for real)."""
    return (out.to(ref.dtype) - ref).abs().max().item() / ref.abs().max().item()


def real_view(t: torch.Tensor) -> torch.Tensor:
    return torch.view_as_real(t) if t.is_complex() else t


def check_rfft(x: torch.Tensor, n: int) -> None:
    """float64: to float64 rounding of torch.fft; float32: within the error budget of torch.fft in float32."""
    out = _monarch_rfft(x, n)
    ref = torch.fft.rfft(x.double(), n)
    assert out.shape == ref.shape and out.dtype == COMPLEX[x.dtype]
    assert rel_err(out, ref) < REL_TOL[x.dtype], n
    if x.dtype == torch.float32:
        assert_within_budget(real_view(out), real_view(ref), real_view(torch.fft.rfft(x, n)), f"rfft n={n}")


def check_irfft(X: torch.Tensor, n: int) -> None:
    out = _monarch_irfft(X, n)
    ref = torch.fft.irfft(X.to(torch.complex128), n)
    real = torch.float64 if X.dtype == torch.complex128 else torch.float32
    assert out.shape == ref.shape and out.dtype == real
    assert rel_err(out, ref) < REL_TOL[real], n
    if real == torch.float32:
        assert_within_budget(out, ref, torch.fft.irfft(X, n), f"irfft n={n}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", SIZES + FFT_SIZES)
def test_rfft_and_irfft_match_torch_fft(n, dtype):
    check_rfft(torch.randn(3, n, dtype=dtype), n)
    # a random spectrum, not Hermitian at bins 0 and n/2: their imaginary parts are ignored as torch's irfft does
    check_irfft(torch.randn(3, n // 2 + 1, dtype=COMPLEX[dtype]), n)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_million_length(dtype):
    n = 2**20
    check_rfft(torch.randn(n, dtype=dtype), n)
    check_irfft(torch.randn(n // 2 + 1, dtype=COMPLEX[dtype]), n)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(5,), (2, 3, 4)], ids=str)
def test_batch_dims(shape, dtype):
    """Any leading dims; the transform runs along the last."""
    n = 90
    check_rfft(torch.randn(*shape, 70, dtype=dtype), n)
    check_irfft(torch.randn(*shape, n // 2 + 1, dtype=COMPLEX[dtype]), n)


@pytest.mark.parametrize("shape", [(0, 3), (1, 0, 2)], ids=str)
def test_empty_batch(shape):
    """Shapes only: torch.fft itself fails on an empty batch with MKL."""
    assert _monarch_rfft(torch.randn(*shape, 70), 90).shape == (*shape, 46)
    assert _monarch_irfft(torch.randn(*shape, 46, dtype=torch.complex128), 90).shape == (*shape, 90)


@pytest.mark.parametrize("length", [1, 37, 210, 300], ids=lambda n: f"L{n}")
def test_zero_padding_and_cutting(length):
    """torch.fft's n: the input is zero-padded or cut to n samples (rfft) or n/2 + 1 bins (irfft)."""
    n = 210
    check_rfft(torch.randn(2, length, dtype=torch.float64), n)
    check_irfft(torch.randn(2, length, dtype=torch.complex128), n)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [2, 420, 2 * 3**7, 2**16])
def test_round_trip(n, dtype):
    x = torch.randn(4, n, dtype=dtype)
    assert rel_err(_monarch_irfft(_monarch_rfft(x, n), n), x) < 10 * REL_TOL[dtype]


def test_strided_inputs():
    """Non-contiguous inputs and an odd storage offset (which the half-complex view cannot read in place)."""
    base = torch.randn(3, 129, dtype=torch.float64)
    check_rfft(base[:, 1:], 128)
    check_rfft(base.t()[:64].t(), 64)
    odd_offset = base.view(-1)[1:129]
    assert odd_offset.is_contiguous() and odd_offset.storage_offset() == 1
    check_rfft(odd_offset, 128)
    spectrum = torch.randn(65, 3, dtype=torch.complex128)
    check_irfft(spectrum.t(), 128)


def test_inference_mode():
    """A size first seen under inference_mode (its cached plan made there) still works outside it."""
    x = torch.randn(2, 2 * 2401, dtype=torch.float64)
    with torch.inference_mode():
        check_rfft(x, x.shape[-1])
    check_rfft(x, x.shape[-1])


def test_opcheck():
    x = torch.randn(2, 3, 50, dtype=torch.float64)
    torch.library.opcheck(torch.ops.subq.monarch_rfft.default, (x, 60))
    torch.library.opcheck(torch.ops.subq.monarch_irfft.default, (torch.fft.rfft(x, 60), 60))


@pytest.mark.parametrize("device", DEVICES)
def test_device(device):
    """On CUDA the same composite runs on cuBLAS (the path monarch_conv takes there by default)."""
    for dtype in DTYPES:
        check_rfft(torch.randn(4, 1000, dtype=dtype, device=device), fft_size(1000))
        check_irfft(torch.randn(4, 1000, dtype=COMPLEX[dtype], device=device), fft_size(1000))


BAD = [
    ("odd n", lambda: _monarch_rfft(torch.randn(4, 10), 21), "n must be even with n / 2 a product of 2, 3, 5 and 7"),
    ("n/2 not 7-smooth", lambda: _monarch_rfft(torch.randn(4, 10), 22), "got 22"),
    ("n zero", lambda: _monarch_irfft(torch.randn(4, 10, dtype=torch.complex64), 0), "n must be even"),
    ("integer x", lambda: _monarch_rfft(torch.arange(10), 10), "x.dtype must be float32 or float64"),
    ("half x", lambda: _monarch_rfft(torch.randn(10).half(), 10), "x.dtype must be float32 or float64"),
    ("complex x", lambda: _monarch_rfft(torch.randn(10, dtype=torch.complex64), 10), "x.dtype must be"),
    ("real X", lambda: _monarch_irfft(torch.randn(6), 10), "X.dtype must be complex64 or complex128"),
    ("0-d x", lambda: _monarch_rfft(torch.tensor(1.0), 10), "x must have at least one dimension"),
]


@pytest.mark.parametrize("name,call,match", BAD, ids=[b[0] for b in BAD])
def test_bad_inputs(name, call, match):
    with pytest.raises(RuntimeError, match=match):
        call()
