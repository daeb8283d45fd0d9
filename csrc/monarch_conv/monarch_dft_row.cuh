// What every piece of the fused Monarch-DFT convolution kernels stands on (monarch_dft_smem.cuh,
// monarch_dft_tensor_core.cuh): the plan of the stages, the layout of one row in shared memory, complex arithmetic
// and the roots of unity. monarch_conv_fused.h states the scheme.
//
// The row is kept as two planes, the real parts then the imaginary parts of its M/2 complex values: the tensor-core
// stages load their operand tiles with WMMA, which reads a matrix of unit column stride, so the real and the
// imaginary parts of a tile must each be one such matrix (interleaved float2 pairs would give stride 2).
//
// Accuracy of the constants: the small DFT matrices (n <= 64 roots per stage, reused N times) are computed once per
// CTA in float64 by sincospi and rounded once, so they are exact to float32 rounding as monarch_dft.cpp's are. The
// twiddles and the split's W_M^k (2 N (r - 1) + N/2 per row, one per element between stages: too many for float64
// on sm_89's 1/64-rate FP64 units, and a table of N roots would double the shared memory) are computed on the fly by
// float32 sincospif, with the exponent reduced mod n in integers first and centred on 0: the argument 2e/n is one
// correctly rounded division of exact integers, so the angle is off by at most pi 2^-24 (a few float32 ulp of the
// root), the same order as the rounding of the float32 products they multiply.
#pragma once

#include <algorithm>
#include <climits>
#include <cstdint>

#include "monarch_conv/monarch_conv_fused.h"

namespace subq::monarch_dft_smem {

// One CTA per row, the row in shared memory: M <= 32K (N = M/2 <= 16384, 128 KB for the row) is issue 4's "one
// kernel for M <= 32K" and near the largest that any device's shared memory holds (M = 64K would need 256 KB).
// Threads per CTA scale with N (kItemsTarget values each, at most kMaxThreads), so short rows leave room for more
// CTAs per SM.
constexpr int kMaxThreads = 512;
constexpr int kItemsTarget = 8;
constexpr int64_t kMaxHalf = 16384;
constexpr int kRootSlots = kMonarchConvMaxStages * kMonarchConvMaxFactor;  // W_n^m for every stage, m < n

// The tensor-core stages (monarch_dft_tensor_core.cuh) take an axis whose small DFT is a whole number of 16 x 16
// tiles, up to kMaxTensorCoreFactor: their accumulators for one tile column are held in registers (2 tiles of
// 16 x 16 complex: 32 registers), and the small DFT's matrix sits in shared memory (2 n^2 floats, 8 KB at n = 32).
// Powers of two from M = 512 to 32K factor into 16s and 32s (monarch_dft.h's balanced split) except M = 4096
// (8 16 16), so all their stages, or two of three, take them; M < 512 has a factor below 16 and takes none.
constexpr int kTile = 16;
constexpr int kMaxTensorCoreFactor = 32;
constexpr int kNoTable = -1;

struct Plan {
  int N;                                  // M / 2
  int r;                                  // number of stages
  int n[kMonarchConvMaxStages];           // n_a
  int stride[kMonarchConvMaxStages];      // n_{a+1} ... n_r: axis a's step in the row-major (n1, ..., nr) view
  // Axis a's small DFT matrix for the tensor-core stage: real parts at tables + table[a], imaginary parts n_a^2
  // floats after, row-major (F[k][j] = W_n^{kj}); kNoTable: the axis takes the CUDA-core stage.
  int table[kMonarchConvMaxStages];
  int table_floats;                       // the tables' total
};

// One row of N complex values as two planes in shared memory.
struct Row {
  float* re;
  float* im;
};

// The dynamic shared memory of one CTA, in floats: the row's two planes (N each), the roots of the CUDA-core
// stages (kRootSlots complex), then the tensor-core stages' tables. With tables, N is a multiple of 256 (an axis
// takes them only when both its tile dimensions are whole tiles), so every table and plane starts 32-byte aligned,
// as WMMA loads need (the base too: declared so, and checked, kernel_plan). Every piece finds it through this one
// symbol rather than through pointer parameters, which kept the stages that are calls free of spills (-Xptxas -v).
// The kernels' static shared memory (the plan, warp sums: at most 128 B) comes out of the same opt-in budget as the
// dynamic part, hence kStaticSmemReserve.
constexpr int kSmemAlign = 32;
constexpr size_t kStaticSmemReserve = 256;
extern __shared__ __align__(kSmemAlign) float dynamic_smem[];

struct SmemLayout {
  Row z;
  float2* roots;
  float* tables;
};

__host__ __device__ inline int64_t smem_floats(int N, int table_floats) {
  return 2 * int64_t{N} + 2 * kRootSlots + table_floats;
}
inline size_t smem_bytes(const Plan& plan) {
  return static_cast<size_t>(smem_floats(plan.N, plan.table_floats)) * sizeof(float);
}

__device__ __forceinline__ SmemLayout smem_layout(int N) {
  return {{dynamic_smem, dynamic_smem + N}, reinterpret_cast<float2*>(dynamic_smem + 2 * N),
          dynamic_smem + 2 * N + 2 * kRootSlots};
}

// The dynamic shared memory a kernel may ask for on the current device: its opt-in shared memory per block
// (cudaDevAttrMaxSharedMemoryPerBlockOptin) less kStaticSmemReserve; 0 where it cannot be read (the error is
// cleared: not sticky, and no error is left behind for the caller's next check).
inline size_t dynamic_smem_limit() {
  int device = 0, optin = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return optin > static_cast<int>(kStaticSmemReserve) ? static_cast<size_t>(optin) - kStaticSmemReserve : 0;
}

inline int threads_for(int half) {
  const int wanted = (half + kItemsTarget - 1) / kItemsTarget;
  return std::min(kMaxThreads, std::max(32, (wanted + 31) / 32 * 32));
}

// Sizes, factors and the pointers every kernel reads (u, the spectrum) consistent; see MonarchConvParams.
inline bool valid_sizes(const MonarchConvParams& p) {
  if (p.batch < 0 || p.heads < 1 || p.seqlen < 1 || p.fft_size < 2 * p.seqlen || p.fft_size % 2 != 0) return false;
  if (p.batch * p.heads > INT_MAX || p.num_factors < 0 || p.num_factors > kMonarchConvMaxStages) return false;
  if (!p.u || !p.filter_spectrum) return false;
  int64_t product = 1;
  for (int a = 0; a < p.num_factors; ++a) {
    if (p.factors[a] < 2 || p.factors[a] > kMonarchConvMaxFactor) return false;
    product *= p.factors[a];
  }
  return product == p.fft_size / 2;
}

// Whether axis a suits the tensor-core stage: its small DFT a whole number of tiles, and the data it multiplies
// too. With later axes (stride > 1) a tile's columns are 16 of the stride's positions; on the last axis (stride 1)
// its rows are 16 of the N / n fibres.
inline bool tensor_core_axis(const Plan& plan, int a) {
  const int n = plan.n[a], stride = plan.stride[a];
  if (n % kTile != 0 || n > kMaxTensorCoreFactor) return false;
  return stride > 1 ? stride % kTile == 0 : (plan.N / n) % kTile == 0;
}

// The plan of valid_sizes(p) params, with tensor-core tables for the axes that suit them while the CTA's shared
// memory stays within smem_limit bytes (axes sharing a size share a table). The factors go in ascending order:
// any order is a factorisation of the same DFT (the forward and the inverse stages share the plan, and the bins'
// digit reversal follows it), and this one puts a factor that is no whole number of tiles (8 in 2048 = 16 16 8)
// on the outer axes, where it leaves the later axes' strides multiples of 16.
inline Plan make_plan(const MonarchConvParams& p, size_t smem_limit) {
  Plan plan{};
  plan.N = static_cast<int>(p.fft_size / 2);
  plan.r = p.num_factors;
  for (int a = 0; a < plan.r; ++a) {  // insertion sort: at most kMonarchConvMaxStages factors
    int b = a;
    for (; b > 0 && plan.n[b - 1] > p.factors[a]; --b) plan.n[b] = plan.n[b - 1];
    plan.n[b] = p.factors[a];
  }
  int stride = 1;
  for (int a = plan.r - 1; a >= 0; --a) {
    plan.stride[a] = stride;
    stride *= plan.n[a];
  }
  for (int a = 0; a < kMonarchConvMaxStages; ++a) plan.table[a] = kNoTable;
  for (int a = 0; a < plan.r; ++a) {
    if (!tensor_core_axis(plan, a)) continue;
    for (int b = 0; b < a && plan.table[a] == kNoTable; ++b) {
      if (plan.n[b] == plan.n[a]) plan.table[a] = plan.table[b];
    }
    if (plan.table[a] != kNoTable) continue;
    const int floats = 2 * plan.n[a] * plan.n[a];
    if (static_cast<size_t>(smem_floats(plan.N, plan.table_floats + floats)) * sizeof(float) > smem_limit) continue;
    plan.table[a] = plan.table_floats;
    plan.table_floats += floats;
  }
  return plan;
}

__device__ __forceinline__ float2 cmul(float2 a, float2 b) {
  return make_float2(a.x * b.x - a.y * b.y, a.x * b.y + a.y * b.x);
}
__device__ __forceinline__ float2 cfma(float2 a, float2 b, float2 acc) {
  acc.x = fmaf(a.x, b.x, fmaf(-a.y, b.y, acc.x));
  acc.y = fmaf(a.x, b.y, fmaf(a.y, b.x, acc.y));
  return acc;
}
__device__ __forceinline__ float2 cconj(float2 a) { return make_float2(a.x, -a.y); }
__device__ __forceinline__ float2 add(float2 a, float2 b) { return make_float2(a.x + b.x, a.y + b.y); }
__device__ __forceinline__ float2 sub(float2 a, float2 b) { return make_float2(a.x - b.x, a.y - b.y); }
__device__ __forceinline__ float2 scale(float2 a, float s) { return make_float2(a.x * s, a.y * s); }
__device__ __forceinline__ float2 times_i(float2 a) { return make_float2(-a.y, a.x); }

__device__ __forceinline__ float2 load(const Row& z, int j) { return make_float2(z.re[j], z.im[j]); }
__device__ __forceinline__ void store(const Row& z, int j, float2 v) {
  z.re[j] = v.x;
  z.im[j] = v.y;
}

// W_n^e = exp(-2 pi i e / n), conjugated for the inverse; 0 <= e < n. See the accuracy note at the top.
__device__ __forceinline__ float2 root_of_unity(int e, int n, bool inverse) {
  const int centred = 2 * e > n ? e - n : e;
  float s, c;
  sincospif(static_cast<float>(2 * centred) / static_cast<float>(n), &s, &c);
  return make_float2(c, inverse ? s : -s);
}

// W_n^e in float64, rounded once (the small DFT matrices: the note at the top).
__device__ __forceinline__ float2 exact_root_of_unity(int e, int n) {
  double s, c;
  sincospi(2.0 * e / n, &s, &c);
  return make_float2(static_cast<float>(c), static_cast<float>(-s));
}

// Every stage's roots, W_{n_a}^m at roots[a * kMonarchConvMaxFactor + m] (n float64 sincospi per stage), then the
// tensor-core stages' tables from them (their axes' n_a x n_a matrices, each written once; a copy, not n^2 more
// float64 sincospi, which sm_89 runs at 1/64 rate). Every thread of the CTA must call it (a barrier between).
// Unrolled over the largest plan, so that the plan may be the kernel's parameter (a runtime index would copy it to
// local memory).
__device__ __forceinline__ void load_dft_constants(const SmemLayout& smem, const Plan& plan) {
#pragma unroll
  for (int a = 0; a < kMonarchConvMaxStages; ++a) {
    const int n = a < plan.r ? plan.n[a] : 0;
    for (int m = threadIdx.x; m < n; m += blockDim.x) {
      smem.roots[a * kMonarchConvMaxFactor + m] = exact_root_of_unity(m, n);
    }
  }
  __syncthreads();
#pragma unroll
  for (int a = 0; a < kMonarchConvMaxStages; ++a) {
    bool first_use = a < plan.r && plan.table[a] != kNoTable;
    for (int b = 0; b < a; ++b) first_use = first_use && plan.table[b] != plan.table[a];
    if (!first_use) continue;
    const int n = plan.n[a];
    const float2* w = smem.roots + a * kMonarchConvMaxFactor;
    float* re = smem.tables + plan.table[a];
    float* im = re + n * n;
    for (int idx = threadIdx.x; idx < n * n; idx += blockDim.x) {
      const float2 root = w[(idx / n) * (idx % n) % n];
      re[idx] = root.x;
      im[idx] = root.y;
    }
  }
}

// The plan a CTA runs, copied by thread 0 into shared memory (the stages index it by a runtime axis: from shared
// memory, not a local-memory copy of the parameter). Should the dynamic shared memory not start kSmemAlign-aligned,
// which the declaration asks for, every axis takes the CUDA-core stage rather than a misaligned WMMA load.
__device__ __forceinline__ void kernel_plan(Plan& plan, const Plan& plan_param) {
  if (threadIdx.x != 0) return;
  plan = plan_param;
  if (reinterpret_cast<uintptr_t>(dynamic_smem) % kSmemAlign != 0) {
    for (int a = 0; a < kMonarchConvMaxStages; ++a) plan.table[a] = kNoTable;
  }
}

// The twiddle diagonal the factorisation puts after the stage along `axis`: T_axis after a forward stage (none
// after the last), conj(T_{axis-1}) after an inverse one (none after the first axis, which the inverse does last).
// T_a[k, r] = W_{N_a}^{k r}, k the axis-a index and r the flat index of the later axes, N_a = n_a * stride_a.
__device__ __forceinline__ int twiddle_axis(const Plan& plan, int axis, bool inverse) {
  return inverse ? axis - 1 : (axis + 1 < plan.r ? axis : -1);
}
__device__ __forceinline__ float2 twiddled(float2 v, const Plan& plan, int pos, int t_axis, bool inverse) {
  if (t_axis < 0) return v;
  const int tn = plan.n[t_axis], ts = plan.stride[t_axis];
  return cmul(v, root_of_unity(((pos / ts) % tn) * (pos % ts), tn * ts, inverse));  // k r < N_a: no reduction
}

}  // namespace subq::monarch_dft_smem
