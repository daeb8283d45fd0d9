// Gated RMSNorm (Mamba-2's RMSNormGated), plain C++ API (raw device pointers, sizes, element strides, a CUDA
// stream; no framework types).
//
// Per row r and group k of group_size features (dim = ngroups * group_size), with v the normalised input:
//   v    = x                 (no gate, or gate after the norm)      v = x * silu(z)   (norm_before_gate == false)
//   rstd = 1 / sqrt(mean(v[r, k-th group]^2) + eps)                 statistics in float32
//   y    = v * rstd * weight  (* silu(z) when z is given and norm_before_gate)
// Rows are dense along features (unit stride) and strided between rows. All functions return Status, never throw.
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

#include "common/dtype.h"
#include "common/status.h"

namespace subq {

struct RMSNormGatedParams {
  DType dtype = DType::kBFloat16;         // x, z, y and the gradients dy, dx, dz
  DType weight_dtype = DType::kFloat32;   // kFloat32 or dtype
  int64_t rows = 0, dim = 0, group_size = 0;  // dim % group_size == 0
  float eps = 1e-6f;
  bool norm_before_gate = true;
  const void* x = nullptr;                // (rows, dim), row stride x_row_stride
  int64_t x_row_stride = 0;
  const void* z = nullptr;                // (rows, dim), row stride z_row_stride; nullptr: no gate
  int64_t z_row_stride = 0;
  const void* weight = nullptr;           // (dim,)
  void* y = nullptr;                      // (rows, dim) dense; written by the forward
  float* rstd = nullptr;                  // (rows, dim / group_size) dense; written by the forward, read by the bwd
};

struct RMSNormGatedGrads {
  const void* dy = nullptr;               // (rows, dim), row stride dy_row_stride
  int64_t dy_row_stride = 0;
  void* dx = nullptr;                     // (rows, dim) dense; nullptr: not wanted
  void* dweight = nullptr;                // (dim,) in weight_dtype; nullptr: not wanted
  void* dz = nullptr;                     // (rows, dim) dense; nullptr: not wanted (must be nullptr without z)
  float* workspace = nullptr;             // rmsnorm_gated_bwd_workspace_elements(p) floats when dweight is wanted
};

// The weight gradient is reduced deterministically: each block sums dy * v * rstd over a chunk of rows into its
// own float32 row of the workspace (rmsnorm_gated_row_chunks(p) rows of dim), then one pass adds the chunks
// in a fixed order.
int64_t rmsnorm_gated_row_chunks(const RMSNormGatedParams& p);
int64_t rmsnorm_gated_bwd_workspace_elements(const RMSNormGatedParams& p);

Status run_rmsnorm_gated_fwd(const RMSNormGatedParams& p, cudaStream_t stream);
Status run_rmsnorm_gated_bwd(const RMSNormGatedParams& p, const RMSNormGatedGrads& g, cudaStream_t stream);

}  // namespace subq
