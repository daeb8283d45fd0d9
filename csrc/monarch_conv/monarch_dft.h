// The real DFT of even length M without an FFT library, in the Monarch form of issue 4: ATen ops only, so the same
// code runs on CPU and CUDA (where it keeps monarch_conv off cuFFT until the fused Monarch-DFT kernels land).
//
// Real input as half-size complex: z[n] = x[2n] + i x[2n+1] (a view of x) has a length-N = M/2 complex DFT Z, and
//   X[k] = (Z[k] + conj Z[N-k]) / 2  +  W_M^k (Z[k] - conj Z[N-k]) / 2i      k = 0..N, Z[N] = Z[0], W_M = e^{-2πi/M}
// (the DFTs of the even and the odd samples, joined by one radix-2 step); the inverse solves the same two equations
// for Z and reads x back out of z = IDFT_N(Z).
//
// The complex DFT in Monarch form: N = n1 n2 ... nr with every n_i <= 64. Viewing z as an (n1, n2 ... nr) array,
//   F_N = P S_r T_{r-1} S_{r-1} ... T_1 S_1,      S_i = I ⊗ F_{n_i} ⊗ I
// S_i the dense small DFT F_{n_i} along axis i (one batched matmul), T_i the twiddle diagonal
// T_i[k_i, r] = W_{N_i}^{k_i r} (N_i = n_i ... n_r, r the flat index of the later axes) that leaves a DFT of length
// N_i / n_i on those axes (Cooley-Tukey, decimation in frequency). The output comes out digit-reversed; P, reversing
// the axes, is one permute. Order r = 2 for N <= 1K, 3 up to 32K, 4 beyond (issue 4's tiers: what a fused kernel
// keeps in registers, in shared memory, and with one extra pass through HBM).
//
// Complex matmul rather than real arithmetic on [re|im] pairs: the data stays in torch's interleaved complex
// layout, so every stage is a view and nothing splits or rejoins planes, and BLAS (MKL, cuBLAS) does the four real
// products of each complex one itself. The fused tensor-core kernel will use the real 2x2-block form, which the
// MMA units need.
#pragma once

#include <cstdint>
#include <vector>

#include <ATen/ATen.h>

namespace subq::monarch_conv {

// The small DFT sizes n1 >= n2 >= ... >= nr of the length-N DFT, each <= 64: r by the order rule above (raised
// where N has no such split), as balanced as possible (the smallest largest factor); factors of 1 are dropped, so
// a prime N <= 7 is one stage and N = 1 none. N must be 7-smooth.
std::vector<int64_t> monarch_factors(int64_t N);

// torch.fft.rfft(x, n) along the last dim: x float32 or float64 (zero-padded or cut to n), n even with n/2
// 7-smooth (every fft_size is). Returns (..., n/2 + 1) complex64 or complex128.
at::Tensor monarch_rfft(const at::Tensor& x, int64_t n);

// torch.fft.irfft(X, n) along the last dim: X complex64 or complex128 (zero-padded or cut to n/2 + 1 bins; the
// imaginary parts of bins 0 and n/2 are ignored, as for any Hermitian spectrum), n as above. Returns (..., n) real.
at::Tensor monarch_irfft(const at::Tensor& X, int64_t n);

}  // namespace subq::monarch_conv
