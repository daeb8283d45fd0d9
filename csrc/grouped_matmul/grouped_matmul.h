// Grouped GEMM over rows sorted by group, plain C++ API (raw device pointers, sizes, strides, a CUDA stream; no
// framework types). The routed projections of Mixture-of-Modules run on it: tokens sorted by module, one weight per
// module, all modules in one launch.
//
// Rows [start_g, start_g + size_g) of x belong to group g, start_g = size_0 + ... + size_{g-1}; rows past the total
// belong to no group. The products, with x_g, dy_g the group's rows:
//   kForward     y[rows of g]  = x_g · w[g] (+ bias[g])       rows past the total are written as zeros
//   kInputGrad   dx[rows of g] = dy_g · w[g]^T                rows past the total are written as zeros
//   kWeightGrad  dw[g] = x_g^T · dy_g                         an empty group gives zeros
//   kBiasGrad    dbias[g] = sum of the rows of dy_g           an empty group gives zeros
//
// The group sizes stay on the device: a setup kernel turns them into per-group problem sizes, pointers and leading
// dimensions, and one persistent CUTLASS grouped-GEMM launch runs every group, so nothing waits for the host.
// Because of that the sizes cannot be validated: the kernels clamp them (a negative size counts as 0, and the groups
// end at row `tokens`) so that memory is never touched out of bounds; the caller checks them where it can.
// All functions return Status and never throw.
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

#include "common/dtype.h"
#include "common/status.h"

namespace subq {

enum class GroupedProduct { kForward, kInputGrad, kWeightGrad, kBiasGrad };

struct GroupedMatmulParams {
  GroupedProduct product = GroupedProduct::kForward;
  DType dtype = DType::kBFloat16;
  MathMode math = MathMode::kExact;   // float32 only
  int64_t tokens = 0, groups = 0;     // T rows of x; G groups
  int64_t k = 0, n = 0;               // w: (G, k, n), dense
  const int64_t* group_sizes = nullptr;  // (G,), device memory
  const void* x = nullptr;            // (T, k), row stride x_row_stride; kForward, kWeightGrad
  int64_t x_row_stride = 0;
  const void* w = nullptr;            // (G, k, n); kForward, kInputGrad
  const void* bias = nullptr;         // (G, n), dense; kForward only, nullptr: no bias
  const void* dy = nullptr;           // (T, n), row stride dy_row_stride; the gradient products
  int64_t dy_row_stride = 0;
  void* out = nullptr;                // dense: y (T, n) | dx (T, k) | dw (G, k, n) | dbias (G, n)
  void* workspace = nullptr;          // grouped_matmul_workspace_bytes(params) bytes, 256-byte aligned
};

// Bytes of device scratch for the per-group problem descriptors (and, with a bias, one zero row).
int64_t grouped_matmul_workspace_bytes(const GroupedMatmulParams& params);

// Vector width, in elements, that the GEMM products need: k, n and the row strides multiples of it, and x, w, dy,
// bias and out aligned to it (16 bytes for the tensor-core kernels). Otherwise run_grouped_matmul returns kMisaligned
// without launching anything, and the caller pads k and n up to a multiple (zero padding leaves the products
// unchanged). 1 means any; the bias gradient takes any.
int grouped_matmul_alignment(DType dtype, MathMode math);

// float16 and bfloat16 run on tensor cores, float32 on tensor cores in TF32 (math kTF32) or as exact FFMA; all
// accumulate in float32. Launches on `stream`.
Status run_grouped_matmul(const GroupedMatmulParams& params, cudaStream_t stream);

}  // namespace subq
