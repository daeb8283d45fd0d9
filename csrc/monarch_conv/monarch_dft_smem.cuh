// The device pieces the fused Monarch-DFT convolution kernels share (monarch_conv_fused_fwd.cu, _bwd.cu): a row of
// M/2 complex values in shared memory, the Monarch stages that transform it in place, the twiddles and small DFT
// matrices, the loads with padding to M, and the step between the half-size complex spectrum and the real
// transform's bins. monarch_conv_fused.h states the scheme; the notes here say how each piece keeps to it.
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

#include "common/convert.cuh"
#include "monarch_conv/monarch_conv_fused.h"

namespace subq::monarch_dft_smem {

// Each stage reads all of a small DFT's inputs before any of its outputs can overwrite them: every thread computes
// its outputs into registers, the CTA synchronises, then writes them back (one buffer, in place). kMaxItems outputs
// per thread of kMaxThreads bound the half size N = M/2 at 16384, i.e. M <= 32K: issue 4's "one kernel for
// M <= 32K". Threads per CTA scale with N (kItemsTarget each), so short rows leave room for more CTAs per SM.
constexpr int kMaxThreads = 512;
constexpr int kMaxItems = 32;
constexpr int kItemsTarget = 8;
constexpr int64_t kMaxHalf = int64_t{kMaxThreads} * kMaxItems;
constexpr int kRootSlots = kMonarchConvMaxStages * kMonarchConvMaxFactor;  // W_n^m for every stage, m < n

struct Plan {
  int N;                                  // M / 2
  int r;                                  // number of stages
  int n[kMonarchConvMaxStages];           // n_a
  int stride[kMonarchConvMaxStages];      // n_{a+1} ... n_r: axis a's step in the row-major (n1, ..., nr) view
};

// One row's N complex values and the small DFT matrices' roots.
inline size_t smem_bytes(int64_t half) { return static_cast<size_t>(half + kRootSlots) * sizeof(float2); }

inline int threads_for(int half) {
  const int wanted = (half + kItemsTarget - 1) / kItemsTarget;
  return std::min(kMaxThreads, std::max(32, (wanted + 31) / 32 * 32));
}

// Sizes, factors and the pointers every kernel reads (u, the spectrum) consistent; see MonarchConvFusedParams.
inline bool valid_sizes(const MonarchConvFusedParams& p) {
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

// The plan of valid_sizes(p) params.
inline Plan make_plan(const MonarchConvFusedParams& p) {
  Plan plan{};
  plan.N = static_cast<int>(p.fft_size / 2);
  plan.r = p.num_factors;
  int stride = 1;
  for (int a = plan.r - 1; a >= 0; --a) {
    plan.n[a] = p.factors[a];
    plan.stride[a] = stride;
    stride *= p.factors[a];
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

// W_n^e = exp(-2 pi i e / n), conjugated for the inverse; 0 <= e < n. See the accuracy note at the top.
__device__ __forceinline__ float2 root_of_unity(int e, int n, bool inverse) {
  const int centred = 2 * e > n ? e - n : e;
  float s, c;
  sincospif(static_cast<float>(2 * centred) / static_cast<float>(n), &s, &c);
  return make_float2(c, inverse ? s : -s);
}

// Stage a's W_{n_a}^m at roots[a * kMonarchConvMaxFactor + m], in float64 and rounded once (the note at the top).
__device__ __forceinline__ void load_roots(float2* roots, const Plan& plan) {
#pragma unroll
  for (int a = 0; a < kMonarchConvMaxStages; ++a) {
    const int n = a < plan.r ? plan.n[a] : 0;
    for (int m = threadIdx.x; m < n; m += blockDim.x) {
      double s, c;
      sincospi(2.0 * m / n, &s, &c);
      roots[a * kMonarchConvMaxFactor + m] = make_float2(static_cast<float>(c), static_cast<float>(-s));
    }
  }
}

// The storage position of bin k after the forward stages: bin k1 + n1 (k2 + n2 (...)) sits at k1 s1 + k2 s2 + ...
__device__ __forceinline__ int digit_reversed(const Plan& plan, int k) {
  int pos = 0;
#pragma unroll
  for (int a = 0; a < kMonarchConvMaxStages; ++a) {
    if (a < plan.r) {
      pos += (k % plan.n[a]) * plan.stride[a];
      k /= plan.n[a];
    }
  }
  return pos;
}

// x[t] gate[t], zero past the sequence (the padding to M): v = pregate * u, and in the backward g = postgate * dy.
template <typename T>
__device__ __forceinline__ float gated(const T* x, const T* gate, int64_t t, int64_t L) {
  if (t >= L) return 0.f;
  const float value = to_float(x[t]);
  return gate ? value * to_float(gate[t]) : value;
}

// The real row x * gate of length L, zero-padded to M = 2N, as the half-size complex z[j] = x[2j] + i x[2j+1].
template <typename T>
__device__ __forceinline__ void load_real_row(float2* z, const Plan& plan, const T* x, const T* gate, int64_t L) {
  for (int j = threadIdx.x; j < plan.N; j += blockDim.x) {
    z[j] = make_float2(gated(x, gate, 2 * int64_t{j}, L), gated(x, gate, 2 * int64_t{j} + 1, L));
  }
}

// Sample t of the real row that z holds as half-size complex (after an inverse transform: natural order).
__device__ __forceinline__ float real_sample(const float2* z, int64_t t) {
  const float2 pair = z[t >> 1];
  return (t & 1) ? pair.y : pair.x;
}

// One stage along `axis`: the small DFT F_n (conj(F_n) for the inverse) on each of the N / n length-n fibres, then
// the twiddle diagonal the factorisation puts next to it: T_axis after a forward stage (none after the last), and
// conj(T_{axis-1}) after an inverse one (none after the first axis, which the inverse does last).
// T_a[k, r] = W_{N_a}^{k r}, k the axis-a index and r the flat index of the later axes, N_a = n_a * stride_a.
// A call, not inlined: its register tile (kMaxItems complex outputs, 64 registers) and loop state come close to the
// 128 registers a 512-thread CTA allows, and inlined into the backward's kernels, with their row pointers live
// across the stages, it made ptxas spill; as a call, ptxas keeps the two apart without spilling (-Xptxas -v).
__device__ __noinline__ inline void dft_stage(float2* z, const float2* roots, const Plan& plan, int axis,
                                              bool inverse) {
  const int n = plan.n[axis], stride = plan.stride[axis];
  const float2* w = roots + axis * kMonarchConvMaxFactor;
  const int twiddle_axis = inverse ? axis - 1 : (axis + 1 < plan.r ? axis : -1);
  float2 out[kMaxItems];
#pragma unroll
  for (int q = 0; q < kMaxItems; ++q) {
    const int pos = threadIdx.x + q * blockDim.x;
    if (pos < plan.N) {
      const int k = (pos / stride) % n;
      const float2* fibre = z + (pos - k * stride);  // element j at fibre[j * stride]
      const int step = inverse ? (n - k) % n : k;    // F_n[k][j] = W_n^{kj}, its conjugate W_n^{(n-k) j}
      float2 acc = make_float2(0.f, 0.f);
      int e = 0;
      for (int j = 0; j < n; ++j) {
        acc = cfma(w[e], fibre[j * stride], acc);
        e += step;
        if (e >= n) e -= n;
      }
      out[q] = acc;
    }
  }
  __syncthreads();
#pragma unroll
  for (int q = 0; q < kMaxItems; ++q) {
    const int pos = threadIdx.x + q * blockDim.x;
    if (pos < plan.N) {
      float2 v = out[q];
      if (twiddle_axis >= 0) {
        const int tn = plan.n[twiddle_axis], ts = plan.stride[twiddle_axis];
        v = cmul(v, root_of_unity(((pos / ts) % tn) * (pos % ts), tn * ts, inverse));  // k r < N_a: no reduction
      }
      z[pos] = v;
    }
  }
  __syncthreads();
}

// The forward stages: z (natural order, synchronised) to its DFT, bins digit-reversed.
__device__ __forceinline__ void forward_dft(float2* z, const float2* roots, const Plan& plan) {
  for (int a = 0; a < plan.r; ++a) dft_stage(z, roots, plan, a, /*inverse=*/false);
}

// The transposed factorisation conj(F_N) = S_1 T_1 ... T_{r-1} S_r P^T (F_N and every S_a are symmetric): per axis
// a = r..1, conj(F_{n_a}) along a, then conj(T_{a-1}). It reads the bins digit-reversed (P^T) and leaves the
// samples in natural order. z must be synchronised; unnormalised (the 1/N is in store_half_bins).
__device__ __forceinline__ void inverse_dft(float2* z, const float2* roots, const Plan& plan) {
  for (int a = plan.r - 1; a >= 0; --a) dft_stage(z, roots, plan, a, /*inverse=*/true);
}

// Bins k and N-k of a length-M = 2N real transform, or of the half-size complex one (the pair the split couples).
struct BinPair {
  float2 k, nk;
};

// monarch_dft.h's split from the half-size DFT Z to the real transform's bins X, with E = (Z[k] + conj Z[N-k]) / 2
// and O = (Z[k] - conj Z[N-k]) / 2i (the DFTs of the even and the odd samples) and w = W_M^k:
//   X[k] = E + w O,   X[N-k] = conj(E - w O)        (Z[N] = Z[0]; W_M^{N-k} = -conj(w))
__device__ __forceinline__ BinPair real_bins(float2 zk, float2 znk, float2 w) {
  const float2 znk_conj = cconj(znk);
  const float2 even = scale(add(zk, znk_conj), 0.5f);
  const float2 odd = scale(times_i(sub(znk_conj, zk)), 0.5f);  // (Z[k] - conj Z[N-k]) / 2i
  const float2 w_odd = cmul(w, odd);
  return {add(even, w_odd), cconj(sub(even, w_odd))};
}

// The inverse split (monarch_irfft) of the real transform's bins Y[k], Y[N-k] back to the half-size spectrum, with
// irfft's 1/M normalisation as 1/N on the half size, stored at the digit-reversed positions the inverse stages
// read:
//   E' = (Y[k] + conj Y[N-k]) / 2,  O' = conj(w) (Y[k] - conj Y[N-k]) / 2,
//   Z'[k] = (E' + i O') / N,  Z'[N-k] = (conj E' + i conj O') / N.
// Bins 0 and N of Y are taken real, as irfft takes any Hermitian spectrum's (their imaginary parts are round-off,
// or a caller's spectrum that is not Hermitian there).
__device__ __forceinline__ void store_half_bins(float2* z, const Plan& plan, int k, BinPair y) {
  const int pk = digit_reversed(plan, k), pnk = digit_reversed(plan, (plan.N - k) % plan.N);
  const float2 w = root_of_unity(k, 2 * plan.N, /*inverse=*/false);
  if (k == 0) y.k.y = y.nk.y = 0.f;
  const float inv_n = 1.f / static_cast<float>(plan.N);
  const float2 ynk_conj = cconj(y.nk);
  const float2 even = scale(add(y.k, ynk_conj), 0.5f);
  const float2 odd = cmul(cconj(w), scale(sub(y.k, ynk_conj), 0.5f));
  z[pk] = scale(add(even, times_i(odd)), inv_n);
  if (pnk != pk) z[pnk] = scale(add(cconj(even), times_i(cconj(odd))), inv_n);
}

// Per bin pair (k, N-k), k = 0 .. N/2, of the half-size DFT in z (digit-reversed, after forward_dft), in place:
// X = the real transform's bins, then z <- the half-size spectrum of Y = product(k, X) (store_half_bins), ready
// for inverse_dft. For k = N-k (k = N/2, N even) product gets X.k == X.nk and must return Y.k == Y.nk. Each pair is
// one thread's, so product may also read and write per-bin global state at k and N-k without a barrier.
template <typename Product>
__device__ __forceinline__ void multiply_real_bins(float2* z, const Plan& plan, Product product) {
  for (int k = threadIdx.x; k <= plan.N / 2; k += blockDim.x) {
    const int pk = digit_reversed(plan, k), pnk = digit_reversed(plan, (plan.N - k) % plan.N);
    const BinPair x = real_bins(z[pk], z[pnk], root_of_unity(k, 2 * plan.N, /*inverse=*/false));
    store_half_bins(z, plan, k, product(k, x));
  }
}

}  // namespace subq::monarch_dft_smem
