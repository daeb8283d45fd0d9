// Monarch long convolution: what the CPU composite and the (future) fused Monarch-DFT CUDA kernels share.
// Framework-free, like the other csrc/<op>/<op>.h headers.
#pragma once

#include <cstdint>

namespace subq::monarch_conv {

// The FFT size M for sequence length L: the smallest M >= 2L of the form 2^a * 3^b * 5^c * 7^d.
// M >= 2L makes the length-M circular convolution of the zero-padded input equal the linear one on the first L
// outputs, and leaves room for the bidirectional filter's reverse half at negative offsets (see
// monarch_conv_cpu.h). Radices 2, 3, 5 and 7 are the ones pocketfft and cuFFT have butterflies for, and the ones a
// Monarch factorisation of the DFT splits into small dense blocks; M stays within 2L * (1 + 15%) for L >= 64.
inline int64_t fft_size(int64_t seqlen) {
  for (int64_t n = 2 * (seqlen < 1 ? 1 : seqlen);; ++n) {
    int64_t rest = n;
    for (int64_t radix : {2, 3, 5, 7}) {
      while (rest % radix == 0) rest /= radix;
    }
    if (rest == 1) return n;
  }
}

}  // namespace subq::monarch_conv
