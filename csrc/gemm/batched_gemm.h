// Strided batched GEMM, the primitive every Monarch product is built from:
//   D[g] = A[g] · B[g]   for g in [0, batch),   A: (M, K), B: (K, N), D: (M, N).
// Each operand is described by a row stride, a column stride and a batch stride, in elements. A and B must have a
// unit stride in one of their two dimensions (row- or column-major); D may be row-major, column-major or fully
// strided ("affine": any two strides), which is how permutations are fused into the store.
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

#include "common/dtype.h"
#include "common/status.h"

namespace subq {

struct StridedMatrix {
  void* ptr = nullptr;
  int64_t row_stride = 0;
  int64_t col_stride = 0;
  int64_t batch_stride = 0;
};

// Which kernels run a 16-bit GEMM. kPortable: CUTLASS 2 mma.sync kernels, the same on sm_80, sm_89 and sm_90a.
// kHopperWhenAvailable: CUTLASS 3 TMA + wgmma kernels on a compute capability 9.0 device in a build that includes
// sm_90a, for operands the TMA can address (16-byte aligned, row-major D); kPortable otherwise.
enum class GemmPath { kPortable, kHopperWhenAvailable };

struct BatchedGemmParams {
  DType dtype = DType::kBFloat16;
  MathMode math = MathMode::kExact;  // float32 only
  GemmPath path = GemmPath::kPortable;
  int64_t m = 0, n = 0, k = 0, batch = 0;
  StridedMatrix a, b, d;
};

// Launches on `stream`. Returns kMisaligned when a vectorized access would be misaligned: 16-bit types need
// pointers, leading dimensions and batch strides that are multiples of 8 elements (TF32: 4), and K a multiple of
// that when an operand is contiguous along K; the caller then takes its generic path. Along a unit-stride M or N,
// loads may run past the extent to the next multiple of the vector width: those elements must be allocated.
Status run_batched_gemm(const BatchedGemmParams& params, cudaStream_t stream);

}  // namespace subq
