// The Mamba-2 decoding step. A block holds one (batch, head) and a tile of head channels p; each state row
// (b, h, p, :) belongs to a team of kLanes threads that stream it once in 16-byte vectors (read, update, write)
// while accumulating its dot product with C, which a shuffle over the team then reduces. Consecutive lanes
// touch consecutive state elements, so a warp's accesses are coalesced whatever N is.
#include "ssd/ssd_step.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "common/convert.cuh"
#include "common/cuda_status.h"
#include "common/dispatch.h"

#include <type_traits>

namespace subq {
namespace {

constexpr int kThreads = 128;

// dt' = clamp(softplus?(dt + dt_bias)). The clamp is written with comparisons so that a NaN dt stays NaN, as in
// torch.clamp; softplus switches to the identity above 20 like torch.nn.functional.softplus.
__device__ __forceinline__ float step_size(const SsdStepParams& p, float dt, int64_t h) {
  if (p.dt_bias) dt += p.dt_bias[h];
  if (p.dt_softplus) dt = dt <= 20.f ? log1pf(expf(dt)) : dt;
  return dt < p.dt_lo ? p.dt_lo : dt > p.dt_hi ? p.dt_hi : dt;
}

template <typename T, typename S, int VEC, int kLanes>
__global__ void __launch_bounds__(kThreads) ssd_step_kernel(SsdStepParams p) {
  constexpr int kRowsPerBlock = kThreads / kLanes;
  const int64_t b = blockIdx.x / p.heads, h = blockIdx.x % p.heads, g = h / (p.heads / p.groups);
  const int lane = threadIdx.x % kLanes;
  const int64_t row = int64_t(blockIdx.y) * kRowsPerBlock + threadIdx.x / kLanes;
  // Teams past the last channel stay to the end: the shuffles below need every lane of the warp.
  const bool active = row < p.head_dim;

  const float dt = step_size(p, to_float(static_cast<const T*>(p.dt)[b * p.dt_batch_stride + h * p.dt_head_stride]), h);
  const float dA = expf(dt * p.A[h]);
  const float x = active ? to_float(static_cast<const T*>(p.x)[b * p.x_batch_stride + h * p.x_head_stride +
                                                                row * p.x_p_stride])
                         : 0.f;
  const float dt_x = dt * x;
  const T* B = static_cast<const T*>(p.B) + b * p.B_batch_stride + g * p.B_group_stride;
  const T* C = static_cast<const T*>(p.C) + b * p.C_batch_stride + g * p.C_group_stride;
  S* state = static_cast<S*>(p.state) + b * p.state_batch_stride + h * p.state_head_stride + row * p.state_p_stride;

  float y = 0.f;
  if (active) {
    for (int64_t n = int64_t(lane) * VEC; n < p.state_dim; n += int64_t(kLanes) * VEC) {
      float s[VEC];
      if constexpr (VEC > 1) {
        const Pack<S, VEC> in = *reinterpret_cast<const Pack<S, VEC>*>(state + n);
#pragma unroll
        for (int k = 0; k < VEC; ++k) s[k] = to_float(in.v[k]);
      } else {
        s[0] = to_float(state[n * p.state_n_stride]);
      }
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        s[k] = dA * s[k] + dt_x * to_float(B[(n + k) * p.B_n_stride]);
        y += s[k] * to_float(C[(n + k) * p.C_n_stride]);
      }
      if constexpr (VEC > 1) {
        Pack<S, VEC> out;
#pragma unroll
        for (int k = 0; k < VEC; ++k) out.v[k] = from_float<S>(s[k]);
        *reinterpret_cast<Pack<S, VEC>*>(state + n) = out;
      } else {
        state[n * p.state_n_stride] = from_float<S>(s[0]);
      }
    }
  }
  // Teams are kLanes consecutive, kLanes-aligned lanes, so xor offsets below kLanes stay inside the team.
#pragma unroll
  for (int offset = kLanes / 2; offset > 0; offset >>= 1) y += __shfl_xor_sync(0xffffffffu, y, offset);
  if (!active || lane != 0) return;
  if (p.D) y += p.D[p.D_per_channel ? h * p.head_dim + row : h] * x;
  if (p.z) {
    const float z = to_float(static_cast<const T*>(p.z)[b * p.z_batch_stride + h * p.z_head_stride + row * p.z_p_stride]);
    y *= z / (1.f + expf(-z));
  }
  static_cast<T*>(p.y)[(b * p.heads + h) * p.head_dim + row] = from_float<T>(y);
}

bool aligned(const void* ptr, int64_t bytes) { return reinterpret_cast<uintptr_t>(ptr) % bytes == 0; }

template <int kLanes, typename T, typename S, int VEC>
Status launch_with_lanes(const SsdStepParams& p, cudaStream_t stream) {
  constexpr int kRowsPerBlock = kThreads / kLanes;
  const int64_t tiles = (p.head_dim + kRowsPerBlock - 1) / kRowsPerBlock;
  if (tiles > 65535) return Status::kInvalidArgument;
  ssd_step_kernel<T, S, VEC, kLanes><<<dim3(unsigned(p.batch * p.heads), unsigned(tiles)), kThreads, 0, stream>>>(p);
  return launch_status();
}

// The smallest team whose vectors cover a state row in one sweep, so short rows (small N) do not idle lanes.
template <typename T, typename S, int VEC>
Status launch(const SsdStepParams& p, cudaStream_t stream) {
  if (p.state_dim <= 4 * VEC) return launch_with_lanes<4, T, S, VEC>(p, stream);
  if (p.state_dim <= 8 * VEC) return launch_with_lanes<8, T, S, VEC>(p, stream);
  if (p.state_dim <= 16 * VEC) return launch_with_lanes<16, T, S, VEC>(p, stream);
  return launch_with_lanes<32, T, S, VEC>(p, stream);
}

template <typename T, typename S>
Status launch_for_layout(const SsdStepParams& p, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(S);
  const bool vec = p.state_n_stride == 1 && p.state_dim % kVec == 0 && aligned(p.state, 16) &&
                   p.state_batch_stride % kVec == 0 && p.state_head_stride % kVec == 0 &&
                   p.state_p_stride % kVec == 0;
  return SUBQ_BOOL_SWITCH(vec, kVectorized, [&] { return launch<T, S, kVectorized ? kVec : 1>(p, stream); });
}

}  // namespace

Status run_ssd_step(const SsdStepParams& p, cudaStream_t stream) {
  if (p.batch < 0 || p.heads < 0 || p.head_dim < 0 || p.state_dim < 0 || p.groups < 1 ||
      (p.heads > 0 && p.heads % p.groups != 0)) {
    return Status::kInvalidArgument;
  }
  if (p.batch * p.heads == 0 || p.head_dim == 0) return Status::kSuccess;
  // N = 0 leaves state, B and C empty (null data pointers): y is then D x (gated), which the kernel computes.
  const bool has_state = p.state_dim == 0 || (p.state && p.B && p.C);
  if (p.batch * p.heads > 0x7fffffff || !has_state || !p.x || !p.dt || !p.A || !p.y) {
    return Status::kInvalidArgument;
  }
  return SUBQ_DTYPE_SWITCH(p.dtype, T, [&] {
    return SUBQ_FLOAT32_OR_SAME_SWITCH(p.state_dtype, p.dtype, T, S,
                                       [&] { return launch_for_layout<T, S>(p, stream); });
  });
}

}  // namespace subq
