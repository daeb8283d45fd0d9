// Monarch long convolution: what the CPU composite and the (future) fused Monarch-DFT CUDA kernels share.
// Framework-free, like the other csrc/<op>/<op>.h headers.
#pragma once

#include <cstdint>

namespace subq::monarch_conv {

// n = 2^a * 3^b * 5^c * 7^d: the sizes pocketfft and cuFFT have butterflies for, and the ones a Monarch
// factorisation of the DFT splits into small dense blocks (each at most 64, monarch_dft.h).
inline bool is_7_smooth(int64_t n) {
  if (n < 1) return false;
  for (int64_t radix : {2, 3, 5, 7}) {
    while (n % radix == 0) n /= radix;
  }
  return n == 1;
}

// The FFT size M for sequence length L: the smallest even 7-smooth M >= 2L, i.e. twice the smallest 7-smooth
// number >= L. M >= 2L makes the length-M circular convolution of the zero-padded input equal the linear one on the
// first L outputs, and leaves room for the bidirectional filter's reverse half at negative offsets (see
// monarch_conv_cpu.h). M even lets the Monarch DFT take the real transform as a complex one of length M/2
// (monarch_dft.h). M stays within 2L * (1 + 10%) for L >= 64.
//
// Defined for 1 <= L <= kMaxSeqlen (callers check): 7-smooth numbers thin out, and beyond that the search below
// would take ever longer (about 4 million steps at most below 2^30) before 2 * half overflows.
constexpr int64_t kMaxSeqlen = int64_t{1} << 30;

inline int64_t fft_size(int64_t seqlen) {
  int64_t half = seqlen < 1 ? 1 : seqlen > kMaxSeqlen ? kMaxSeqlen : seqlen;
  while (!is_7_smooth(half)) ++half;
  return 2 * half;
}

}  // namespace subq::monarch_conv
