#include "monarch/monarch_permute.cuh"

#include <algorithm>
#include <climits>

#include <cutlass/fast_math.h>

namespace subq {
namespace {

constexpr int kThreads = 256;

// A row of threads per token row (several rows per CTA when rows are short). Writes are coalesced; reads gather at
// stride `blocks` within the row, which the same CTA reads in full, so they are served from L1 after the first
// touch. Index math is 32-bit with a multiply-shift division: the 64-bit divisions of a flat index would cost more
// instructions per element than the copy moves bytes.
template <typename Word>
__global__ void transpose_within_rows_kernel(const Word* __restrict__ in, Word* __restrict__ out, int64_t rows,
                                             int blocks, cutlass::FastDivmod by_cols, int row_len) {
  for (int64_t row = int64_t{blockIdx.x} * blockDim.y + threadIdx.y; row < rows;
       row += int64_t{gridDim.x} * blockDim.y) {
    const Word* src = in + row * row_len;
    Word* dst = out + row * row_len;
    for (int w = threadIdx.x; w < row_len; w += blockDim.x) {
      int j, c;
      by_cols(j, c, w);  // w = j * cols + c
      dst[w] = src[c * blocks + j];
    }
  }
}

}  // namespace

cudaError_t transpose_within_rows(const void* in, void* out, int64_t rows, int64_t blocks, int64_t cols,
                                  int element_size, cudaStream_t stream) {
  if (rows == 0 || blocks == 0 || cols == 0) return cudaSuccess;
  if (blocks * cols > INT_MAX) return cudaErrorInvalidValue;
  const int row_len = static_cast<int>(blocks * cols);
  const int threads_x = std::min(kThreads, (row_len + 31) / 32 * 32);
  const dim3 block(threads_x, kThreads / threads_x);
  const int64_t ctas = (rows + block.y - 1) / block.y;
  const unsigned grid = static_cast<unsigned>(std::min<int64_t>(ctas, int64_t{1} << 20));
  const cutlass::FastDivmod by_cols(static_cast<int>(cols));
  if (element_size == 2) {
    transpose_within_rows_kernel<<<grid, block, 0, stream>>>(static_cast<const uint16_t*>(in),
                                                             static_cast<uint16_t*>(out), rows, int(blocks), by_cols,
                                                             row_len);
  } else {
    transpose_within_rows_kernel<<<grid, block, 0, stream>>>(static_cast<const uint32_t*>(in),
                                                             static_cast<uint32_t*>(out), rows, int(blocks), by_cols,
                                                             row_len);
  }
  return cudaGetLastError();
}

}  // namespace subq
