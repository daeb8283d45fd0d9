// The fused Monarch-DFT convolution backward (monarch_conv_fused.h): the rows kernel, one CTA per (b, h) row, and
// the filter kernel, one CTA per channel, on monarch_dft_smem.cuh's shared-memory stages. Step by step
// monarch_conv_cpu.cpp's monarch_conv_bwd, with the real transforms' bins X = real_bins(...) of the half-size DFT:
//   V = rfft(v)                             rows, pass 1: load v, forward_dft, X_V (kept in the workspace row)
//   dpostgate = dy (irfft(V K)[:L] + D v)   rows, pass 1: X_V K, inverse_dft, epilogue (only with a postgate)
//   g = dy postgate, G = rfft(g)            rows, pass 2: load g, forward_dft, X_G
//   dv = irfft(G conj(K))[:L] + D g         rows, pass 2: X_G conj(K), inverse_dft, epilogue: du, dpregate
//   dD = sum_{b,t} g v                      rows: the row's sum over t; filter: the sum over b
//   dc = irfft(sum_b G conj(V))             rows, pass 2: the workspace row X_V becomes X_G conj(X_V);
//                                           filter: the sum over b, store_half_bins, inverse_dft
//   dk = dc[:Lk], dk_rev[j] = dc[M-1-j]     filter epilogue (j < min(Lk, L-1); zero beyond)
// irfft's conventions carry over through store_half_bins: the 1/M scale, and the imaginary parts of bins 0 and M/2
// dropped (those of X_G conj(X_V) and X_G conj(K) are round-off, or a caller's spectrum's).
#include "monarch_conv/monarch_conv_fused.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "common/cuda_status.h"
#include "common/dispatch.h"
#include "monarch_conv/monarch_dft_smem.cuh"

namespace subq {
namespace {

using namespace monarch_dft_smem;

// The workspace, carved: the rows' product spectra (B H (N+1) complex, with a filter gradient) and the rows' shares
// of dD (B H floats, with D); nullptr where absent.
struct Workspace {
  float2* spectra;
  float* dD_shares;
};

int64_t spectra_count(const MonarchConvParams& p, const MonarchConvGrads& grads) {
  return grads.filter_len > 0 ? p.batch * p.heads * (p.fft_size / 2 + 1) : 0;
}

int64_t shares_count(const MonarchConvParams& p) { return p.D ? p.batch * p.heads : 0; }

Workspace carve(const MonarchConvParams& p, const MonarchConvGrads& grads) {
  auto* spectra = static_cast<float2*>(grads.workspace);
  return {spectra_count(p, grads) > 0 ? spectra : nullptr,
          shares_count(p) > 0 ? reinterpret_cast<float*>(spectra + spectra_count(p, grads)) : nullptr};
}

// The CTA's sum of one float per thread in a fixed order (deterministic from run to run): each warp's by shuffles,
// then the warps' sums by warp 0. Thread 0 holds the result. Every thread must call it.
__device__ float block_sum(float x, float* warp_sums) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) x += __shfl_down_sync(0xffffffffu, x, offset);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) warp_sums[warp] = x;
  __syncthreads();
  if (warp == 0) {
    x = lane < static_cast<int>(blockDim.x / 32) ? warp_sums[lane] : 0.f;
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) x += __shfl_down_sync(0xffffffffu, x, offset);
  }
  return x;
}

template <typename T>
__global__ void __launch_bounds__(kMaxThreads) monarch_conv_fused_bwd_rows_kernel(MonarchConvParams p,
                                                                                  MonarchConvGrads grads,
                                                                                  Plan plan_param, Workspace ws) {
  __shared__ Plan plan;
  __shared__ float warp_sums[kMaxThreads / 32];
  kernel_plan(plan, plan_param);
  const SmemLayout smem = smem_layout(plan_param.N);
  const Row& z = smem.z;
  // 32-bit where they fit (rows < 2^31, L <= M/2 <= 16384): registers are at the 128 cap (-Xptxas -v).
  const int N = plan_param.N, row = blockIdx.x, h = row % static_cast<int>(p.heads), L = static_cast<int>(p.seqlen);
  const int64_t offset = int64_t{row} * L;  // of the row in (B, H, L)
  const auto in_row = [&](const void* base) { return base ? static_cast<const T*>(base) + offset : nullptr; };
  const T* u = in_row(p.u);
  const T* pregate = in_row(p.pregate);
  const T* postgate = in_row(p.postgate);
  const T* dy = in_row(grads.dy);
  const float2* K = reinterpret_cast<const float2*>(p.filter_spectrum) + int64_t{h} * (N + 1);
  float2* spectrum_row = ws.spectra ? ws.spectra + int64_t{row} * (N + 1) : nullptr;  // X_V, then X_G conj(X_V)
  const float D = p.D ? p.D[h] : 0.f;
  load_dft_constants(smem, plan_param);

  // Pass 1, V: only the filter gradient (its X_V) and dpostgate (conv(v)) need it.
  if (spectrum_row || postgate) {
    load_real_row(z, plan_param, u, pregate, L);
    __syncthreads();
    forward_dft(plan);
    multiply_real_bins(z, plan, [&](int k, BinPair v) {
      if (spectrum_row) {
        spectrum_row[k] = v.k;
        spectrum_row[N - k] = v.nk;
      }
      return BinPair{cmul(v.k, K[k]), cmul(v.nk, K[N - k])};
    });
    __syncthreads();
    if (postgate) {
      inverse_dft(plan);
      T* dpostgate = static_cast<T*>(grads.dpostgate) + offset;
      for (int t = threadIdx.x; t < L; t += blockDim.x) {
        float pre_gate_out = real_sample(z, t);  // z = conv(v) + D v, the output before the postgate
        if (p.D) pre_gate_out += D * gated(u, pregate, t, L);
        dpostgate[t] = from_float<T>(to_float(dy[t]) * pre_gate_out);
      }
      __syncthreads();  // every read of conv(v) before pass 2's load overwrites it
    }
  }

  // Pass 2, G: the correlation for dv, and the row's product spectrum.
  load_real_row(z, plan_param, dy, postgate, L);
  __syncthreads();
  forward_dft(plan);
  multiply_real_bins(z, plan, [&](int k, BinPair g) {
    if (spectrum_row) {
      const BinPair v{spectrum_row[k], spectrum_row[N - k]};  // both read first: k == N - k at k = N/2
      spectrum_row[k] = cmul(g.k, cconj(v.k));
      spectrum_row[N - k] = cmul(g.nk, cconj(v.nk));
    }
    return BinPair{cmul(g.k, cconj(K[k])), cmul(g.nk, cconj(K[N - k]))};
  });
  __syncthreads();
  inverse_dft(plan);

  T* du = static_cast<T*>(grads.du) + offset;
  T* dpregate = grads.dpregate ? static_cast<T*>(grads.dpregate) + offset : nullptr;
  float dD_share = 0.f;
  for (int t = threadIdx.x; t < L; t += blockDim.x) {
    const float x = to_float(u[t]), g = gated(dy, postgate, t, L);
    float dv = real_sample(z, t);
    if (p.D) dv += D * g;
    du[t] = from_float<T>(pregate ? dv * to_float(pregate[t]) : dv);
    if (dpregate) dpregate[t] = from_float<T>(dv * x);
    dD_share += g * (pregate ? x * to_float(pregate[t]) : x);
  }
  if (ws.dD_shares) {
    const float sum = block_sum(dD_share, warp_sums);
    if (threadIdx.x == 0) ws.dD_shares[row] = sum;
  }
}

__global__ void __launch_bounds__(kMaxThreads) monarch_conv_fused_bwd_filter_kernel(MonarchConvParams p,
                                                                                    MonarchConvGrads grads,
                                                                                    Plan plan_param, Workspace ws) {
  __shared__ Plan plan;
  kernel_plan(plan, plan_param);
  const SmemLayout smem = smem_layout(plan_param.N);
  const int N = plan_param.N;
  const int64_t h = blockIdx.x, H = p.heads, B = p.batch;

  // Sums over b in order, one thread per sum: the same result on every run.
  if (grads.dD && threadIdx.x == 0) {
    float sum = 0.f;
    for (int64_t b = 0; b < B; ++b) sum += ws.dD_shares[b * H + h];
    grads.dD[h] = sum;
  }
  if (grads.filter_len == 0) return;  // a precomputed spectrum: no filter gradient

  load_dft_constants(smem, plan_param);
  // The pairs (k, N-k) as the rows kernel wrote them, summed over b and split back to the half size, digit-reversed
  // for inverse_dft. plan_param, not plan: no barrier yet since thread 0 copied it.
  for (int k = threadIdx.x; k <= N / 2; k += blockDim.x) {
    BinPair sum{make_float2(0.f, 0.f), make_float2(0.f, 0.f)};
    for (int64_t b = 0; b < B; ++b) {
      const float2* row = ws.spectra + (b * H + h) * (N + 1);
      sum.k = add(sum.k, row[k]);
      sum.nk = add(sum.nk, row[N - k]);
    }
    store_half_bins(smem.z, plan_param, k, sum);
  }
  __syncthreads();
  inverse_dft(plan);

  // dc in natural order: k at the offsets 0 .. Lk-1, k_rev reversed at the end (monarch_conv_cpu.h's filter c).
  const int64_t Lk = grads.filter_len, M = p.fft_size, rev_taps = Lk < p.seqlen - 1 ? Lk : p.seqlen - 1;
  for (int64_t j = threadIdx.x; j < Lk; j += blockDim.x) {
    grads.dk[h * Lk + j] = real_sample(smem.z, j);
    if (grads.dk_rev) grads.dk_rev[h * Lk + j] = j < rev_taps ? real_sample(smem.z, M - 1 - j) : 0.f;
  }
}

template <typename Kernel>
bool allow_smem(Kernel kernel, size_t bytes) {
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)) ==
         cudaSuccess;
}

template <typename T>
Status launch(const MonarchConvParams& p, const MonarchConvGrads& grads, const Plan& plan, cudaStream_t stream) {
  const size_t smem = smem_bytes(plan);
  const int threads = threads_for(plan.N);
  const Workspace ws = carve(p, grads);
  if (p.batch > 0) {
    if (!allow_smem(monarch_conv_fused_bwd_rows_kernel<T>, smem)) return Status::kCudaError;
    const auto rows = static_cast<unsigned>(p.batch * p.heads);
    monarch_conv_fused_bwd_rows_kernel<T><<<rows, threads, smem, stream>>>(p, grads, plan, ws);
  }
  if (grads.dk || grads.dD) {
    if (!allow_smem(monarch_conv_fused_bwd_filter_kernel, smem)) return Status::kCudaError;
    const auto channels = static_cast<unsigned>(p.heads);
    monarch_conv_fused_bwd_filter_kernel<<<channels, threads, smem, stream>>>(p, grads, plan, ws);
  }
  return launch_status();
}

// Every gradient non-null exactly where its forward input is (monarch_conv_fused.h).
bool valid(const MonarchConvParams& p, const MonarchConvGrads& grads) {
  if (!valid_sizes(p) || !grads.dy || !grads.du || grads.filter_len < 0 || grads.filter_len > p.seqlen) return false;
  if (!p.pregate != !grads.dpregate || !p.postgate != !grads.dpostgate || !p.D != !grads.dD) return false;
  if ((grads.filter_len > 0) != (grads.dk != nullptr) || (grads.dk_rev && !grads.dk)) return false;
  return grads.workspace || monarch_conv_bwd_workspace_bytes(p, grads) == 0;
}

}  // namespace

size_t monarch_conv_bwd_workspace_bytes(const MonarchConvParams& p, const MonarchConvGrads& grads) {
  return static_cast<size_t>(spectra_count(p, grads)) * sizeof(float2) +
         static_cast<size_t>(shares_count(p)) * sizeof(float);
}

bool monarch_conv_bwd_supports(const MonarchConvParams& p, const MonarchConvGrads& grads) {
  return monarch_conv_fwd_supports(p.fft_size) &&
         monarch_conv_bwd_workspace_bytes(p, grads) <= kMonarchConvBwdMaxWorkspace;
}

Status run_monarch_conv_bwd(const MonarchConvParams& p, const MonarchConvGrads& grads, cudaStream_t stream) {
  if (!valid(p, grads)) return Status::kInvalidArgument;
  if (!monarch_conv_bwd_supports(p, grads)) return Status::kUnsupported;
  const Plan plan = make_plan(p, dynamic_smem_limit());
  return SUBQ_DTYPE_SWITCH(p.dtype, T, [&] { return launch<T>(p, grads, plan, stream); });
}

}  // namespace subq
