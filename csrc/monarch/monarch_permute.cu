#include "monarch/monarch_permute.cuh"

namespace subq {
namespace {

// One thread per output element, so the writes are coalesced; the reads gather at stride `blocks` within a row,
// which the neighbouring warps of the same block bring into L1 together.
template <typename Word>
__global__ void transpose_within_rows_kernel(const Word* __restrict__ in, Word* __restrict__ out, int64_t total,
                                             int64_t blocks, int64_t cols) {
  const int64_t row_len = blocks * cols;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < total; idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t row = idx / row_len, within = idx % row_len;
    const int64_t j = within / cols, c = within % cols;
    out[idx] = in[row * row_len + c * blocks + j];
  }
}

}  // namespace

cudaError_t transpose_within_rows(const void* in, void* out, int64_t rows, int64_t blocks, int64_t cols,
                                  int element_size, cudaStream_t stream) {
  const int64_t total = rows * blocks * cols;
  if (total == 0) return cudaSuccess;
  constexpr int kThreads = 256;
  const int64_t grid = (total + kThreads - 1) / kThreads;
  const unsigned grid_x = unsigned(grid < 65535 * 8 ? grid : 65535 * 8);
  if (element_size == 2) {
    transpose_within_rows_kernel<<<grid_x, kThreads, 0, stream>>>(static_cast<const uint16_t*>(in),
                                                                   static_cast<uint16_t*>(out), total, blocks, cols);
  } else {
    transpose_within_rows_kernel<<<grid_x, kThreads, 0, stream>>>(static_cast<const uint32_t*>(in),
                                                                   static_cast<uint32_t*>(out), total, blocks, cols);
  }
  return cudaGetLastError();
}

}  // namespace subq
