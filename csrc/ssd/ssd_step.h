// One decoding step of the Mamba-2 SSM (selective state update, A = a_h * I per head), plain C++ API (raw device
// pointers, sizes, element strides, a CUDA stream; no framework types).
//
// For batch b, head h (group g = h / (heads / groups)), head channel p and state index n:
//   dt'  = clamp(softplus?(dt[b, h] + dt_bias[h]), dt_lo, dt_hi)
//   state[b, h, p, n] = exp(dt' * A[h]) * state[b, h, p, n] + dt' * x[b, h, p] * B[b, g, n]     (in place)
//   y[b, h, p] = (sum_n state[b, h, p, n] * C[b, g, n] + D[h, p] * x[b, h, p]) * silu(z[b, h, p])
// All arithmetic in float32; y is computed from the float32 new state before it is rounded to the state dtype.
// All functions return Status and never throw.
#pragma once

#include <cmath>
#include <cstdint>
#include <cuda_runtime.h>

#include "common/dtype.h"
#include "common/status.h"

namespace subq {

struct SsdStepParams {
  DType dtype = DType::kBFloat16;        // x, dt, B, C, z, y
  DType state_dtype = DType::kFloat32;   // kFloat32 or dtype
  int64_t batch = 0, heads = 0, head_dim = 0, state_dim = 0, groups = 0;  // Bt, H, P, N, G; heads % groups == 0
  bool dt_softplus = false;
  float dt_lo = -INFINITY, dt_hi = INFINITY;

  void* state = nullptr;                 // (Bt, H, P, N), updated in place
  int64_t state_batch_stride = 0, state_head_stride = 0, state_p_stride = 0, state_n_stride = 1;
  const void* x = nullptr;               // (Bt, H, P)
  int64_t x_batch_stride = 0, x_head_stride = 0, x_p_stride = 1;
  const void* dt = nullptr;              // (Bt, H)
  int64_t dt_batch_stride = 0, dt_head_stride = 1;
  const float* A = nullptr;              // (H,) dense
  const void* B = nullptr;               // (Bt, G, N)
  int64_t B_batch_stride = 0, B_group_stride = 0, B_n_stride = 1;
  const void* C = nullptr;               // (Bt, G, N)
  int64_t C_batch_stride = 0, C_group_stride = 0, C_n_stride = 1;
  const float* D = nullptr;              // (H,) or (H, P) dense; nullptr: no skip connection
  bool D_per_channel = false;            // true: D is (H, P)
  const void* z = nullptr;               // (Bt, H, P); nullptr: no gate
  int64_t z_batch_stride = 0, z_head_stride = 0, z_p_stride = 1;
  const float* dt_bias = nullptr;        // (H,) dense; nullptr: none
  void* y = nullptr;                     // (Bt, H, P) dense
};

Status run_ssd_step(const SsdStepParams& p, cudaStream_t stream);

}  // namespace subq
