// Monarch long convolution as ATen composites: the CPU implementation, and the CUDA path until the fused
// Monarch-DFT kernels land. For u (B, H, L), a per-channel filter and the optional gates and skip:
//
//   v = pregate * u;   y = postgate * (conv(v) + D * v)
//
// conv is one length-M circular convolution (M = fft_size(L) >= 2L, monarch_conv.h) of v zero-padded to M with a
// length-M filter c, by rfft / irfft; the first L outputs are kept. Because M >= 2L no output wraps around, so:
//   causal:        c[j] = k[j] for j < Lk, else 0                 y[t] = sum_{s<=t} k[t-s] v[s]
//   bidirectional: also c[M-1-j] = k_rev[j] for j < Lk             y[t] += sum_{s>t} k_rev[s-t-1] v[s]
// (offset t-s = -d lands at index M-d; length L never reaches k_rev[L-1], but another length with the same M may, so
// it is placed too). The filter's spectrum rfft(c, M), (H, M/2+1)
// complex, is all the convolution needs: monarch_conv_filter computes it once for reuse.
//
// The backward is the same transforms: a circular convolution's adjoint is the correlation with the same filter,
// i.e. the product with conj(spectrum); the filter gradient is the correlation of dy with v, summed over the
// batch in the frequency domain (one inverse transform per channel).
//
// Every transform is a real one of length M, by ATen's FFT or by the Monarch DFT (monarch_dft.h); both give the
// bins in natural order, so a filter spectrum from either serves both.
#pragma once

#include <optional>
#include <vector>

#include <ATen/ATen.h>

namespace subq::composite {

// How the real transforms are computed: ATen's FFT (pocketfft on CPU, cuFFT on CUDA), or the Monarch DFT's batched
// small dense DFT matmuls (no FFT library), which issue 4 asks for on the GPU.
enum class DftAlgorithm { kFft, kMonarch };

struct MonarchConvInputs {
  at::Tensor u;                                      // (B, H, L)
  std::optional<at::Tensor> k, k_rev;                // (H, Lk), Lk <= L; or instead:
  std::optional<at::Tensor> filter_spectrum;         // (H, fft_size(L)/2 + 1) complex, from monarch_conv_filter
  std::optional<at::Tensor> pregate, postgate, D;    // (B, H, L), (B, H, L), (H,)
  DftAlgorithm algorithm = DftAlgorithm::kFft;
};

// rfft(c, M) of the combined filter c above, for sequences of length seqlen: complex64 (complex128 for float64 k).
at::Tensor monarch_conv_filter(const at::Tensor& k, const std::optional<at::Tensor>& k_rev, int64_t seqlen,
                               DftAlgorithm algorithm);

// y (B, H, L) in u's dtype; computed in float32 (float64 for float64 u).
at::Tensor monarch_conv_fwd(const MonarchConvInputs& in);

// (du, dk, dk_rev, dpregate, dpostgate, dD), each in its input's dtype; the gradient of an absent input is an
// empty tensor, and with filter_spectrum in place of k there is no filter gradient (dk, dk_rev empty).
std::vector<at::Tensor> monarch_conv_bwd(const at::Tensor& dy, const MonarchConvInputs& in);

}  // namespace subq::composite
