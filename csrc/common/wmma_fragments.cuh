// The 16 x 16 x 16 WMMA fragment types the hand-written tensor-core kernels (SSD, FLASH) use, 16-bit operands with
// float32 accumulation, and zeroing a warp's grid of accumulators.
#pragma once

#include <mma.h>

namespace subq {

template <typename T>
using FragA = nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 16, T, nvcuda::wmma::row_major>;
template <typename T>
using FragAcol = nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 16, T, nvcuda::wmma::col_major>;
template <typename T>
using FragB = nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, 16, 16, 16, T, nvcuda::wmma::row_major>;
template <typename T>
using FragBcol = nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, 16, 16, 16, T, nvcuda::wmma::col_major>;
using FragAcc = nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float>;

template <int M, int N>
__device__ __forceinline__ void zero(FragAcc (&acc)[M][N]) {
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j) nvcuda::wmma::fill_fragment(acc[i][j], 0.f);
}

}  // namespace subq
