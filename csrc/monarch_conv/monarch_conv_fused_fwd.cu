// The fused Monarch-DFT convolution forward (monarch_conv_fused.h): one kernel, one CTA per (batch, channel) row,
// the row's M/2 complex values in shared memory from the load to the epilogue. Its steps are monarch_dft.cpp's
// (monarch_rfft, the product with the spectrum, monarch_irfft) and monarch_conv_cpu.cpp's gating, in one pass:
//   load      z[j] = v[2j] + i v[2j+1], v = pregate * u zero-padded to M
//   forward   per axis a = 1..r of the (n1, ..., nr) view: F_{n_a} along a, then the twiddle T_a (not after the last)
//   spectrum  per bin pair (k, N-k), in place on the digit-reversed bins: split to the real transform's bins,
//             times the filter's spectrum, and the inverse split back to a half-size complex spectrum (scaled 1/N)
//   inverse   the transposed factorisation conj(F_N) = S_1 T_1 ... T_{r-1} S_r P^T (F_N and every S_a are
//             symmetric): per axis a = r..1, conj(F_{n_a}) along a, then conj(T_{a-1}); it reads the bins
//             digit-reversed (P^T) and leaves the samples in natural order
//   epilogue  y[t] = postgate[t] (conv[t] + D v[t]) for t < L: the truncation to the first L outputs
//
// Accuracy of the constants: the small DFT matrices (n <= 64 roots per stage, reused N times) are computed once per
// CTA in float64 by sincospi and rounded once, so they are exact to float32 rounding as monarch_dft.cpp's are. The
// twiddles and the split's W_M^k (2 N (r - 1) + N/2 per row, one per element between stages: too many for float64
// on sm_89's 1/64-rate FP64 units, and a table of N roots would double the shared memory) are computed on the fly by
// float32 sincospif, with the exponent reduced mod n in integers first and centred on 0: the argument 2e/n is one
// correctly rounded division of exact integers, so the angle is off by at most pi 2^-24 (a few float32 ulp of the
// root), the same order as the rounding of the float32 products they multiply.
#include "monarch_conv/monarch_conv_fused.h"

#include "common/convert.cuh"

#include <algorithm>
#include <climits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace subq {
namespace {

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

size_t smem_bytes(int64_t half) { return static_cast<size_t>(half + kRootSlots) * sizeof(float2); }

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

// v[t] = pregate[t] u[t], zero past the sequence (the padding to M).
template <typename T>
__device__ __forceinline__ float gated(const T* u, const T* pregate, int64_t t, int64_t L) {
  if (t >= L) return 0.f;
  const float x = to_float(u[t]);
  return pregate ? x * to_float(pregate[t]) : x;
}

// One stage along `axis`: the small DFT F_n (conj(F_n) for the inverse) on each of the N / n length-n fibres, then
// the twiddle diagonal the factorisation puts next to it: T_axis after a forward stage (none after the last), and
// conj(T_{axis-1}) after an inverse one (none after the first axis, which the inverse does last).
// T_a[k, r] = W_{N_a}^{k r}, k the axis-a index and r the flat index of the later axes, N_a = n_a * stride_a.
__device__ void dft_stage(float2* z, const float2* roots, const Plan& plan, int axis, bool inverse) {
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

// The spectrum step, per bin pair (k, N-k) of the half-size DFT Z (digit-reversed in z), in place. monarch_dft.h's
// split to the real transform of length M = 2N, written with E = (Z[k] + conj Z[N-k]) / 2 and
// O = (Z[k] - conj Z[N-k]) / 2i (the DFTs of the even and the odd samples) and w = W_M^k:
//   X[k] = E + w O,   X[N-k] = conj(E - w O)        (Z[N] = Z[0]; W_M^{N-k} = -conj(w))
// then Y = X K, and the inverse split (monarch_irfft), with irfft's 1/M normalisation as 1/N on the half size:
//   E' = (Y[k] + conj Y[N-k]) / 2,  O' = conj(w) (Y[k] - conj Y[N-k]) / 2,
//   Z'[k] = (E' + i O') / N,  Z'[N-k] = (conj E' + i conj O') / N.
// Bins 0 and N of Y are taken real, as irfft takes any Hermitian spectrum's (their imaginary parts are round-off,
// or a caller's spectrum that is not Hermitian there).
__device__ void spectrum_product(float2* z, const float2* spectrum, const Plan& plan) {
  const int N = plan.N;
  const float inv_n = 1.f / static_cast<float>(N);
  for (int k = threadIdx.x; k <= N / 2; k += blockDim.x) {
    const int pk = digit_reversed(plan, k), pnk = digit_reversed(plan, (N - k) % N);
    const float2 w = root_of_unity(k, 2 * N, /*inverse=*/false);
    const float2 zk = z[pk], znk = cconj(z[pnk]);  // Z[k], conj Z[N-k]
    const float2 even = scale(add(zk, znk), 0.5f);
    const float2 odd = scale(times_i(sub(znk, zk)), 0.5f);  // (Z[k] - conj Z[N-k]) / 2i
    const float2 w_odd = cmul(w, odd);
    float2 yk = cmul(add(even, w_odd), spectrum[k]);
    float2 ynk = cmul(cconj(sub(even, w_odd)), spectrum[N - k]);
    if (k == 0) yk.y = ynk.y = 0.f;
    const float2 ynk_conj = cconj(ynk);
    const float2 even_y = scale(add(yk, ynk_conj), 0.5f);
    const float2 odd_y = cmul(cconj(w), scale(sub(yk, ynk_conj), 0.5f));
    z[pk] = scale(add(even_y, times_i(odd_y)), inv_n);
    if (pnk != pk) z[pnk] = scale(add(cconj(even_y), times_i(cconj(odd_y))), inv_n);
  }
}

template <typename T>
__global__ void __launch_bounds__(kMaxThreads) monarch_conv_fused_fwd_kernel(MonarchConvFusedParams p,
                                                                             Plan plan_param) {
  // The stages index the plan by a runtime axis: from shared memory, not a local-memory copy of the parameter.
  __shared__ Plan plan;
  if (threadIdx.x == 0) plan = plan_param;
  extern __shared__ float2 smem[];
  float2* z = smem;                       // the row, N complex values
  float2* roots = smem + plan_param.N;    // stage a's W_{n_a}^m at roots[a * kMonarchConvMaxFactor + m]
  const int64_t row = blockIdx.x, h = row % p.heads, L = p.seqlen;
  const T* u = static_cast<const T*>(p.u) + row * L;
  const T* pregate = p.pregate ? static_cast<const T*>(p.pregate) + row * L : nullptr;

#pragma unroll
  for (int a = 0; a < kMonarchConvMaxStages; ++a) {
    const int n = a < plan_param.r ? plan_param.n[a] : 0;
    for (int m = threadIdx.x; m < n; m += blockDim.x) {
      double s, c;
      sincospi(2.0 * m / n, &s, &c);
      roots[a * kMonarchConvMaxFactor + m] = make_float2(static_cast<float>(c), static_cast<float>(-s));
    }
  }
  for (int j = threadIdx.x; j < plan_param.N; j += blockDim.x) {
    z[j] = make_float2(gated(u, pregate, 2 * int64_t{j}, L), gated(u, pregate, 2 * int64_t{j} + 1, L));
  }
  __syncthreads();

  for (int a = 0; a < plan.r; ++a) dft_stage(z, roots, plan, a, /*inverse=*/false);
  spectrum_product(z, reinterpret_cast<const float2*>(p.filter_spectrum) + h * (plan.N + 1), plan);
  __syncthreads();
  for (int a = plan.r - 1; a >= 0; --a) dft_stage(z, roots, plan, a, /*inverse=*/true);

  const T* postgate = p.postgate ? static_cast<const T*>(p.postgate) + row * L : nullptr;
  T* y = static_cast<T*>(p.y) + row * L;
  for (int64_t t = threadIdx.x; t < L; t += blockDim.x) {
    const float2 pair = z[t >> 1];
    float out = (t & 1) ? pair.y : pair.x;
    if (p.D) out += p.D[h] * gated(u, pregate, t, L);
    if (postgate) out *= to_float(postgate[t]);
    y[t] = from_float<T>(out);
  }
}

int threads_for(int half) {
  const int wanted = (half + kItemsTarget - 1) / kItemsTarget;
  return std::min(kMaxThreads, std::max(32, (wanted + 31) / 32 * 32));
}

template <typename T>
Status launch(const MonarchConvFusedParams& p, const Plan& plan, cudaStream_t stream) {
  const size_t smem = smem_bytes(plan.N);
  if (cudaFuncSetAttribute(monarch_conv_fused_fwd_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                           static_cast<int>(smem)) != cudaSuccess) {
    return Status::kCudaError;
  }
  const auto rows = static_cast<unsigned>(p.batch * p.heads);
  monarch_conv_fused_fwd_kernel<T><<<rows, threads_for(plan.N), smem, stream>>>(p, plan);
  return cudaGetLastError() == cudaSuccess ? Status::kSuccess : Status::kCudaError;
}

bool valid(const MonarchConvFusedParams& p) {
  if (p.batch < 0 || p.heads < 1 || p.seqlen < 1 || p.fft_size < 2 * p.seqlen || p.fft_size % 2 != 0) return false;
  if (p.batch * p.heads > INT_MAX || p.num_factors < 0 || p.num_factors > kMonarchConvMaxStages) return false;
  if (!p.u || !p.filter_spectrum || !p.y) return false;
  int64_t product = 1;
  for (int a = 0; a < p.num_factors; ++a) {
    if (p.factors[a] < 2 || p.factors[a] > kMonarchConvMaxFactor) return false;
    product *= p.factors[a];
  }
  return product == p.fft_size / 2;
}

}  // namespace

bool monarch_conv_fused_fwd_supports(int64_t fft_size) {
  if (fft_size < 2 || fft_size / 2 > kMaxHalf) return false;
  int device = 0, optin = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) != cudaSuccess) {
    cudaGetLastError();  // not sticky: leave no error behind for the caller's next check
    return false;
  }
  return smem_bytes(fft_size / 2) <= static_cast<size_t>(optin);
}

Status run_monarch_conv_fused_fwd(const MonarchConvFusedParams& p, cudaStream_t stream) {
  if (!valid(p)) return Status::kInvalidArgument;
  if (!monarch_conv_fused_fwd_supports(p.fft_size)) return Status::kUnsupported;
  if (p.batch == 0) return Status::kSuccess;
  Plan plan{};
  plan.N = static_cast<int>(p.fft_size / 2);
  plan.r = p.num_factors;
  int stride = 1;
  for (int a = plan.r - 1; a >= 0; --a) {
    plan.n[a] = p.factors[a];
    plan.stride[a] = stride;
    stride *= p.factors[a];
  }
  switch (p.dtype) {
    case DType::kFloat32: return launch<float>(p, plan, stream);
    case DType::kFloat16: return launch<__half>(p, plan, stream);
    case DType::kBFloat16: return launch<__nv_bfloat16>(p, plan, stream);
  }
  return Status::kUnsupported;
}

}  // namespace subq
