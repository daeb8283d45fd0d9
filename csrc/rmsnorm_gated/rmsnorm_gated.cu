// Gated RMSNorm kernels. One "unit" of work is one (row, group) in the forward and one (row chunk, group) in the
// backward; a unit is handled by one warp when the group is small and by a whole block otherwise, so the group's
// statistic is a warp shuffle or a warp shuffle plus one shared-memory step. Each thread walks the group in
// vectors of 16 bytes when pointers and strides allow, and every statistic is accumulated in float32.
#include "rmsnorm_gated/rmsnorm_gated.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "common/convert.cuh"
#include "common/cuda_status.h"
#include "common/dispatch.h"

#include <type_traits>

namespace subq {
namespace {

constexpr int kBlockThreads = 256;
// Groups up to this many features take one warp (8 units per block): at most 32 / VEC vectors per thread and
// pass. Larger groups take the whole block, so long rows still spread over 256 threads.
constexpr int64_t kWarpGroupMax = 1024;
// The backward aims for about this many units, so that a row chunk is long enough to amortise its workspace row
// and there are still enough warps (or blocks) to fill the GPU.
constexpr int64_t kWarpUnitsTarget = 2048;
constexpr int64_t kBlockUnitsTarget = 512;

template <typename T, int VEC>
__device__ __forceinline__ void load(const T* ptr, float (&out)[VEC]) {
  const Pack<T, VEC> pack = *reinterpret_cast<const Pack<T, VEC>*>(ptr);
#pragma unroll
  for (int k = 0; k < VEC; ++k) out[k] = to_float(pack.v[k]);
}

template <typename T, int VEC>
__device__ __forceinline__ void store(T* ptr, const float (&in)[VEC]) {
  Pack<T, VEC> pack;
#pragma unroll
  for (int k = 0; k < VEC; ++k) pack.v[k] = from_float<T>(in[k]);
  *reinterpret_cast<Pack<T, VEC>*>(ptr) = pack;
}

__device__ __forceinline__ float sigmoid(float z) { return 1.f / (1.f + expf(-z)); }

// Sum over the kGroupThreads threads of one unit, the same fixed order on every call (deterministic results).
// Block-wide units (kGroupThreads == kBlockThreads) go through `partials` and must be reached by every thread.
template <int kGroupThreads>
__device__ __forceinline__ float group_sum(float v, float* partials) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  if constexpr (kGroupThreads > 32) {
    static_assert(kGroupThreads == kBlockThreads, "a unit is one warp or the whole block");
    const int warp = threadIdx.x / 32;
    if (threadIdx.x % 32 == 0) partials[warp] = v;
    __syncthreads();
    float total = 0.f;
#pragma unroll
    for (int w = 0; w < kGroupThreads / 32; ++w) total += partials[w];
    __syncthreads();  // the next call overwrites partials
    return total;
  } else {
    return v;
  }
}

// The elements of one (row, group): pointers at the group's first feature.
template <typename T, typename W>
struct GroupView {
  const T* x;
  const T* z;       // nullptr: no gate
  const W* weight;
};

// v, the input of the norm, and silu(z) / silu'(z) where there is a gate.
template <typename T, typename W, int VEC>
struct Loaded {
  float x[VEC], v[VEC], w[VEC], gate[VEC], dgate[VEC];

  __device__ __forceinline__ Loaded(const GroupView<T, W>& g, int64_t i, bool gate_in, bool need_dgate) {
    load<T, VEC>(g.x + i, x);
    load<W, VEC>(g.weight + i, w);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      gate[k] = 1.f;
      dgate[k] = 0.f;
    }
    if (g.z) {
      float z[VEC];
      load<T, VEC>(g.z + i, z);
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const float s = sigmoid(z[k]);
        gate[k] = z[k] * s;
        if (need_dgate) dgate[k] = s * (1.f + z[k] * (1.f - s));  // d silu / dz
      }
    }
#pragma unroll
    for (int k = 0; k < VEC; ++k) v[k] = gate_in ? x[k] * gate[k] : x[k];
  }
};

template <typename T, typename W, int VEC, int kGroupThreads>
__global__ void __launch_bounds__(kBlockThreads) rmsnorm_gated_fwd_kernel(RMSNormGatedParams p) {
  constexpr int kUnitsPerBlock = kBlockThreads / kGroupThreads;
  __shared__ float partials[kGroupThreads / 32];
  const int tid = threadIdx.x % kGroupThreads;
  const int64_t ngroups = p.dim / p.group_size, units = p.rows * ngroups;
  const bool gate_in = p.z && !p.norm_before_gate, gate_out = p.z && p.norm_before_gate;
  // The loop bound is uniform over a unit's threads, as group_sum needs.
  for (int64_t unit = int64_t(blockIdx.x) * kUnitsPerBlock + threadIdx.x / kGroupThreads; unit < units;
       unit += int64_t(gridDim.x) * kUnitsPerBlock) {
    const int64_t row = unit / ngroups, col0 = unit % ngroups * p.group_size;
    const GroupView<T, W> g{static_cast<const T*>(p.x) + row * p.x_row_stride + col0,
                            p.z ? static_cast<const T*>(p.z) + row * p.z_row_stride + col0 : nullptr,
                            static_cast<const W*>(p.weight) + col0};
    float sum_sq = 0.f;
    for (int64_t i = int64_t(tid) * VEC; i < p.group_size; i += int64_t(kGroupThreads) * VEC) {
      const Loaded<T, W, VEC> in(g, i, gate_in, false);
#pragma unroll
      for (int k = 0; k < VEC; ++k) sum_sq += in.v[k] * in.v[k];
    }
    const float rstd = rsqrtf(group_sum<kGroupThreads>(sum_sq, partials) / float(p.group_size) + p.eps);
    if (tid == 0) p.rstd[unit] = rstd;
    // Second pass over the same elements: the group was just read, so these loads hit L1 / L2.
    T* y = static_cast<T*>(p.y) + row * p.dim + col0;
    for (int64_t i = int64_t(tid) * VEC; i < p.group_size; i += int64_t(kGroupThreads) * VEC) {
      const Loaded<T, W, VEC> in(g, i, gate_in, false);
      float out[VEC];
#pragma unroll
      for (int k = 0; k < VEC; ++k) out[k] = in.v[k] * rstd * in.w[k] * (gate_out ? in.gate[k] : 1.f);
      store<T, VEC>(y + i, out);
    }
  }
}

// With vhat = v * rstd, n = vhat * weight and dn the gradient reaching n (dy, times silu(z) for a gate after the
// norm):  dv = rstd * (dn*w - vhat * mean(dn*w * vhat)),  dweight = sum over rows of dn * vhat.
template <typename T, typename W, int VEC, int kGroupThreads>
__global__ void __launch_bounds__(kBlockThreads)
    rmsnorm_gated_bwd_kernel(RMSNormGatedParams p, RMSNormGatedGrads g, int64_t rows_per_chunk) {
  constexpr int kUnitsPerBlock = kBlockThreads / kGroupThreads;
  __shared__ float partials[kGroupThreads / 32];
  const int tid = threadIdx.x % kGroupThreads;
  const int64_t ngroups = p.dim / p.group_size;
  const int64_t chunks = (p.rows + rows_per_chunk - 1) / rows_per_chunk, units = chunks * ngroups;
  const bool gate_in = p.z && !p.norm_before_gate, gate_out = p.z && p.norm_before_gate;
  const bool need_dgate = g.dz != nullptr;
  for (int64_t unit = int64_t(blockIdx.x) * kUnitsPerBlock + threadIdx.x / kGroupThreads; unit < units;
       unit += int64_t(gridDim.x) * kUnitsPerBlock) {
    const int64_t chunk = unit / ngroups, group = unit % ngroups, col0 = group * p.group_size;
    const int64_t row_end = min(p.rows, (chunk + 1) * rows_per_chunk);
    // This unit's workspace row: each thread reads and writes only the features it owns, so no races and no
    // atomics; the chunks are added up in a fixed order afterwards.
    float* dweight_partial = g.dweight ? g.workspace + chunk * p.dim + col0 : nullptr;
    if (dweight_partial) {
      for (int64_t i = int64_t(tid) * VEC; i < p.group_size; i += int64_t(kGroupThreads) * VEC) {
#pragma unroll
        for (int k = 0; k < VEC; ++k) dweight_partial[i + k] = 0.f;
      }
    }
    for (int64_t row = chunk * rows_per_chunk; row < row_end; ++row) {
      const GroupView<T, W> gv{static_cast<const T*>(p.x) + row * p.x_row_stride + col0,
                               p.z ? static_cast<const T*>(p.z) + row * p.z_row_stride + col0 : nullptr,
                               static_cast<const W*>(p.weight) + col0};
      const T* dy = static_cast<const T*>(g.dy) + row * g.dy_row_stride + col0;
      const float rstd = p.rstd[row * ngroups + group];
      float dot = 0.f;
      for (int64_t i = int64_t(tid) * VEC; i < p.group_size; i += int64_t(kGroupThreads) * VEC) {
        const Loaded<T, W, VEC> in(gv, i, gate_in, false);
        float d[VEC];
        load<T, VEC>(dy + i, d);
#pragma unroll
        for (int k = 0; k < VEC; ++k) dot += d[k] * (gate_out ? in.gate[k] : 1.f) * in.w[k] * in.v[k] * rstd;
      }
      const float mean_dot = group_sum<kGroupThreads>(dot, partials) / float(p.group_size);
      for (int64_t i = int64_t(tid) * VEC; i < p.group_size; i += int64_t(kGroupThreads) * VEC) {
        const Loaded<T, W, VEC> in(gv, i, gate_in, need_dgate);
        float d[VEC], dx[VEC], dz[VEC];
        load<T, VEC>(dy + i, d);
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          const float vhat = in.v[k] * rstd;
          const float dn = d[k] * (gate_out ? in.gate[k] : 1.f);
          const float dv = rstd * (dn * in.w[k] - vhat * mean_dot);
          if (gate_out) {
            dx[k] = dv;
            dz[k] = d[k] * vhat * in.w[k] * in.dgate[k];
          } else {
            dx[k] = gate_in ? dv * in.gate[k] : dv;
            dz[k] = dv * in.x[k] * in.dgate[k];
          }
          if (dweight_partial) dweight_partial[i + k] += dn * vhat;
        }
        if (g.dx) store<T, VEC>(static_cast<T*>(g.dx) + row * p.dim + col0 + i, dx);
        if (g.dz) store<T, VEC>(static_cast<T*>(g.dz) + row * p.dim + col0 + i, dz);
      }
    }
  }
}

// dweight[f] = sum over chunks of workspace[chunk, f]. A block covers 32 features; its 8 warps-rows split the
// chunks round-robin and the 8 partial sums are added in warp order: the same order on every run.
constexpr int kReduceFeatures = 32, kReduceSlices = 8;

template <typename W>
__global__ void __launch_bounds__(kReduceFeatures* kReduceSlices)
    reduce_row_chunks_kernel(const float* __restrict__ workspace, W* __restrict__ dweight, int64_t chunks,
                             int64_t dim) {
  __shared__ float slice_sums[kReduceSlices][kReduceFeatures];
  const int64_t f = int64_t(blockIdx.x) * kReduceFeatures + threadIdx.x;
  float sum = 0.f;
  if (f < dim) {
    for (int64_t c = threadIdx.y; c < chunks; c += kReduceSlices) sum += workspace[c * dim + f];
  }
  slice_sums[threadIdx.y][threadIdx.x] = sum;
  __syncthreads();
  if (threadIdx.y == 0 && f < dim) {
    float total = 0.f;
#pragma unroll
    for (int s = 0; s < kReduceSlices; ++s) total += slice_sums[s][threadIdx.x];
    dweight[f] = from_float<W>(total);
  }
}

bool aligned(const void* ptr, int64_t bytes) { return reinterpret_cast<uintptr_t>(ptr) % bytes == 0; }


unsigned grid_for(int64_t units, int units_per_block) {
  const int64_t blocks = (units + units_per_block - 1) / units_per_block;
  return unsigned(blocks < (int64_t(1) << 20) ? blocks : (int64_t(1) << 20));  // the kernels loop over the rest
}

// Calls fn(integral_constant VEC, integral_constant kGroupThreads) for this problem's vector width and unit size.
template <typename T, typename W, typename Fn>
Status dispatch_shape(const RMSNormGatedParams& p, const RMSNormGatedGrads* g, Fn&& fn) {
  constexpr int kVec = 16 / sizeof(T);
  bool vec = p.group_size % kVec == 0 && aligned(p.x, 16) && p.x_row_stride % kVec == 0 &&
             aligned(p.weight, sizeof(W) * kVec) && (!p.z || (aligned(p.z, 16) && p.z_row_stride % kVec == 0));
  if (g) {
    vec = vec && aligned(g->dy, 16) && g->dy_row_stride % kVec == 0 && aligned(g->dx, 16) && aligned(g->dz, 16);
  } else {
    vec = vec && aligned(p.y, 16);
  }
  return SUBQ_BOOL_SWITCH(vec, kVectorized, [&] {
    return SUBQ_BOOL_SWITCH(p.group_size <= kWarpGroupMax, kWarpPerGroup, [&] {
      return fn(std::integral_constant<int, kVectorized ? kVec : 1>{},
                std::integral_constant<int, kWarpPerGroup ? 32 : kBlockThreads>{});
    });
  });
}

template <typename T, typename W>
Status fwd(const RMSNormGatedParams& p, cudaStream_t stream) {
  return dispatch_shape<T, W>(p, nullptr, [&](auto vec, auto group_threads) {
    constexpr int kVec = decltype(vec)::value, kGroupThreads = decltype(group_threads)::value;
    const unsigned grid = grid_for(p.rows * (p.dim / p.group_size), kBlockThreads / kGroupThreads);
    rmsnorm_gated_fwd_kernel<T, W, kVec, kGroupThreads><<<grid, kBlockThreads, 0, stream>>>(p);
    return launch_status();
  });
}

int64_t rows_per_chunk(const RMSNormGatedParams& p) {
  if (p.rows == 0) return 1;
  const int64_t ngroups = p.dim / p.group_size;
  const int64_t target = p.group_size <= kWarpGroupMax ? kWarpUnitsTarget : kBlockUnitsTarget;
  int64_t chunks = target / ngroups;
  chunks = chunks < 1 ? 1 : chunks > p.rows ? p.rows : chunks;
  return (p.rows + chunks - 1) / chunks;
}

template <typename T, typename W>
Status bwd(const RMSNormGatedParams& p, const RMSNormGatedGrads& g, cudaStream_t stream) {
  const int64_t rpc = rows_per_chunk(p), chunks = rmsnorm_gated_row_chunks(p);
  if (chunks > 0 && (g.dx || g.dz || g.dweight)) {
    SUBQ_RETURN_IF_ERROR(dispatch_shape<T, W>(p, &g, [&](auto vec, auto group_threads) {
      constexpr int kVec = decltype(vec)::value, kGroupThreads = decltype(group_threads)::value;
      const unsigned grid = grid_for(chunks * (p.dim / p.group_size), kBlockThreads / kGroupThreads);
      rmsnorm_gated_bwd_kernel<T, W, kVec, kGroupThreads><<<grid, kBlockThreads, 0, stream>>>(p, g, rpc);
      return launch_status();
    }));
  }
  if (!g.dweight) return Status::kSuccess;
  const unsigned grid = unsigned((p.dim + kReduceFeatures - 1) / kReduceFeatures);
  reduce_row_chunks_kernel<W><<<grid, dim3(kReduceFeatures, kReduceSlices), 0, stream>>>(
      g.workspace, static_cast<W*>(g.dweight), chunks, p.dim);
  return launch_status();
}

bool valid(const RMSNormGatedParams& p) {
  // No rows: x (and z) may be the null pointer of an empty tensor.
  return p.rows >= 0 && p.dim > 0 && p.group_size > 0 && p.dim % p.group_size == 0 && (p.rows == 0 || p.x) &&
         p.weight && p.x_row_stride >= 0 && (!p.z || p.z_row_stride >= 0);
}

}  // namespace

int64_t rmsnorm_gated_row_chunks(const RMSNormGatedParams& p) {
  if (p.rows == 0) return 0;
  const int64_t rpc = rows_per_chunk(p);
  return (p.rows + rpc - 1) / rpc;
}

int64_t rmsnorm_gated_bwd_workspace_elements(const RMSNormGatedParams& p) {
  return valid(p) ? rmsnorm_gated_row_chunks(p) * p.dim : 0;
}

Status run_rmsnorm_gated_fwd(const RMSNormGatedParams& p, cudaStream_t stream) {
  if (!valid(p) || (p.rows > 0 && (!p.y || !p.rstd))) return Status::kInvalidArgument;
  if (p.rows == 0) return Status::kSuccess;
  return SUBQ_DTYPE_SWITCH(p.dtype, T, [&] {
    return SUBQ_FLOAT32_OR_SAME_SWITCH(p.weight_dtype, p.dtype, T, W, [&] { return fwd<T, W>(p, stream); });
  });
}

Status run_rmsnorm_gated_bwd(const RMSNormGatedParams& p, const RMSNormGatedGrads& g, cudaStream_t stream) {
  if (!valid(p) || (g.dz && !p.z && p.rows > 0) || (g.dweight && !g.workspace && p.rows > 0) ||
      (p.rows > 0 && (!g.dy || !p.rstd || g.dy_row_stride < 0))) {
    return Status::kInvalidArgument;
  }
  return SUBQ_DTYPE_SWITCH(p.dtype, T, [&] {
    return SUBQ_FLOAT32_OR_SAME_SWITCH(p.weight_dtype, p.dtype, T, W, [&] { return bwd<T, W>(p, g, stream); });
  });
}

}  // namespace subq
