// The Monarch permutation as a copy: each row (token) of `in`, viewed as a (cols, blocks) matrix, is written
// transposed, out[t, j*cols + c] = in[t, c*blocks + j]. With (blocks, cols) = (l, s) it undoes the output
// permutation P^T on a gradient; with (s, l) it applies P^T to a block-major forward output.
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

namespace subq {

// Copies elements of `element_size` bytes (2 or 4).
cudaError_t transpose_within_rows(const void* in, void* out, int64_t rows, int64_t blocks, int64_t cols,
                                  int element_size, cudaStream_t stream);

}  // namespace subq
