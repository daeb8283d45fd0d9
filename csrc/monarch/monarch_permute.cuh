// The output permutation P^T undone on a gradient: out[t, j, c] = in[t, c*l + j] for each token row.
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

namespace subq {

// Copies elements of `element_size` bytes (2 or 4). rows: tokens; blocks: l; block_size: s.
cudaError_t unpermute_blocks(const void* in, void* out, int64_t rows, int64_t blocks, int64_t block_size,
                             int element_size, cudaStream_t stream);

}  // namespace subq
