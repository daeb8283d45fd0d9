// The device pieces the fused Monarch-DFT convolution kernels share (monarch_conv_fused_fwd.cu, _bwd.cu): the
// Monarch stages that transform a row in shared memory in place (each axis on tensor cores where it suits them,
// monarch_dft_tensor_core.cuh, else on CUDA cores here), the loads with padding to M, and the step between the
// half-size complex spectrum and the real transform's bins. monarch_conv_fused.h states the scheme; the notes here
// say how each piece keeps to it. The plan, the row's layout and the constants are monarch_dft_row.cuh's.
#pragma once

#include "common/convert.cuh"
#include "monarch_conv/monarch_dft_row.cuh"
#include "monarch_conv/monarch_dft_tensor_core.cuh"

namespace subq::monarch_dft_smem {

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
__device__ __forceinline__ void load_real_row(const Row& z, const Plan& plan, const T* x, const T* gate, int64_t L) {
  for (int j = threadIdx.x; j < plan.N; j += blockDim.x) {
    store(z, j, make_float2(gated(x, gate, 2 * int64_t{j}, L), gated(x, gate, 2 * int64_t{j} + 1, L)));
  }
}

// Sample t of the real row that z holds as half-size complex (after an inverse transform: natural order).
__device__ __forceinline__ float real_sample(const Row& z, int64_t t) { return ((t & 1) ? z.im : z.re)[t >> 1]; }

// The CUDA-core stage along `axis`: the small DFT F_n (conj(F_n) for the inverse) on each of the N / n length-n
// fibres as matrix-vector products, then its twiddle diagonal (twiddled). Like the tensor-core stage, a warp owns
// whole fibres and reads all of them before it overwrites any (__syncwarp), so the stage runs in place with one CTA
// barrier at its end and a thread holds at most two outputs: for n <= 32, 32 / n fibres at a time with lane
// = slot * n + k; for n > 32, one, with lane computing k = lane and lane + 32. (Holding every output of the CTA in
// registers across a barrier instead took 64 registers a thread, and spilled once the tensor-core stage joined the
// call graph.) A call, not inlined, so that ptxas allocates the stages apart from the kernels' own live state.
__device__ __noinline__ inline void cuda_core_stage(const Plan& plan, int axis, bool inverse) {
  const SmemLayout smem = smem_layout(plan.N);
  const Row z = smem.z;
  const int n = plan.n[axis], stride = plan.stride[axis], fibres = plan.N / n;
  const float2* w = smem.roots + axis * kMonarchConvMaxFactor;
  const int t_axis = twiddle_axis(plan, axis, inverse), lane = threadIdx.x % 32;
  const int per_warp = n <= 32 ? 32 / n : 1;
  const int slot = n <= 32 ? lane / n : 0, k0 = n <= 32 ? lane % n : lane;
  for (int first = threadIdx.x / 32 * per_warp; first < fibres; first += blockDim.x / 32 * per_warp) {
    const int f = first + slot;  // fibre f = (outer, s): element j at origin + j * stride
    const bool active = slot < per_warp && f < fibres;
    const int origin = (f / stride) * n * stride + f % stride;
    float2 out[2];
#pragma unroll
    for (int q = 0; q < 2; ++q) {
      const int k = k0 + 32 * q;
      if (!active || k >= n) continue;
      const int step = inverse ? (n - k) % n : k;  // F_n[k][j] = W_n^{kj}, its conjugate W_n^{(n-k) j}
      float2 acc = make_float2(0.f, 0.f);
      int e = 0;
      for (int j = 0; j < n; ++j) {
        acc = cfma(w[e], load(z, origin + j * stride), acc);
        e += step;
        if (e >= n) e -= n;
      }
      out[q] = acc;
    }
    __syncwarp();
#pragma unroll
    for (int q = 0; q < 2; ++q) {
      const int k = k0 + 32 * q, pos = origin + k * stride;
      if (active && k < n) store(z, pos, twiddled(out[q], plan, pos, t_axis, inverse));
    }
    __syncwarp();
  }
  __syncthreads();
}

// The stage along `axis`, on tensor cores where the plan gave the axis a table.
__device__ __forceinline__ void dft_stage(const Plan& plan, int axis, bool inverse) {
  if (plan.table[axis] != kNoTable) {
    tensor_core_stage(plan, axis, inverse);
  } else {
    cuda_core_stage(plan, axis, inverse);
  }
}

// The forward stages: z (natural order, synchronised) to its DFT, bins digit-reversed.
__device__ __forceinline__ void forward_dft(const Plan& plan) {
  for (int a = 0; a < plan.r; ++a) dft_stage(plan, a, /*inverse=*/false);
}

// The transposed factorisation conj(F_N) = S_1 T_1 ... T_{r-1} S_r P^T (F_N and every S_a are symmetric): per axis
// a = r..1, conj(F_{n_a}) along a, then conj(T_{a-1}). It reads the bins digit-reversed (P^T) and leaves the
// samples in natural order. z must be synchronised; unnormalised (the 1/N is in store_half_bins).
__device__ __forceinline__ void inverse_dft(const Plan& plan) {
  for (int a = plan.r - 1; a >= 0; --a) dft_stage(plan, a, /*inverse=*/true);
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
__device__ __forceinline__ void store_half_bins(const Row& z, const Plan& plan, int k, BinPair y) {
  const int pk = digit_reversed(plan, k), pnk = digit_reversed(plan, (plan.N - k) % plan.N);
  const float2 w = root_of_unity(k, 2 * plan.N, /*inverse=*/false);
  if (k == 0) y.k.y = y.nk.y = 0.f;
  const float inv_n = 1.f / static_cast<float>(plan.N);
  const float2 ynk_conj = cconj(y.nk);
  const float2 even = scale(add(y.k, ynk_conj), 0.5f);
  const float2 odd = cmul(cconj(w), scale(sub(y.k, ynk_conj), 0.5f));
  store(z, pk, scale(add(even, times_i(odd)), inv_n));
  if (pnk != pk) store(z, pnk, scale(add(cconj(even), times_i(cconj(odd))), inv_n));
}

// Per bin pair (k, N-k), k = 0 .. N/2, of the half-size DFT in z (digit-reversed, after forward_dft), in place:
// X = the real transform's bins, then z <- the half-size spectrum of Y = product(k, X) (store_half_bins), ready
// for inverse_dft. For k = N-k (k = N/2, N even) product gets X.k == X.nk and must return Y.k == Y.nk. Each pair is
// one thread's, so product may also read and write per-bin global state at k and N-k without a barrier.
template <typename Product>
__device__ __forceinline__ void multiply_real_bins(const Row& z, const Plan& plan, Product product) {
  for (int k = threadIdx.x; k <= plan.N / 2; k += blockDim.x) {
    const int pk = digit_reversed(plan, k), pnk = digit_reversed(plan, (plan.N - k) % plan.N);
    const BinPair x = real_bins(load(z, pk), load(z, pnk), root_of_unity(k, 2 * plan.N, /*inverse=*/false));
    store_half_bins(z, plan, k, product(k, x));
  }
}

}  // namespace subq::monarch_dft_smem
