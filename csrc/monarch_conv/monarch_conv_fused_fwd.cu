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
// The shared-memory stages, twiddles, loads and the real/half-size split are monarch_dft_smem.cuh's (shared with
// the backward).
#include "monarch_conv/monarch_conv_fused.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "common/cuda_status.h"
#include "common/dispatch.h"
#include "monarch_conv/monarch_dft_smem.cuh"

namespace subq {
namespace {

using namespace monarch_dft_smem;

// The spectrum step: Y = X K per bin of the real transform (multiply_real_bins), in place on the digit-reversed
// bins.
__device__ void spectrum_product(const Row& z, const float2* spectrum, const Plan& plan) {
  const int N = plan.N;
  multiply_real_bins(z, plan, [&](int k, BinPair x) {
    return BinPair{cmul(x.k, spectrum[k]), cmul(x.nk, spectrum[N - k])};
  });
}

template <typename T>
__global__ void __launch_bounds__(kMaxThreads) monarch_conv_fused_fwd_kernel(MonarchConvParams p,
                                                                             Plan plan_param) {
  __shared__ Plan plan;
  kernel_plan(plan, plan_param);
  const SmemLayout smem = smem_layout(plan_param.N);
  const int64_t row = blockIdx.x, h = row % p.heads, L = p.seqlen;
  const T* u = static_cast<const T*>(p.u) + row * L;
  const T* pregate = p.pregate ? static_cast<const T*>(p.pregate) + row * L : nullptr;

  load_dft_constants(smem, plan_param);
  load_real_row(smem.z, plan_param, u, pregate, L);
  __syncthreads();

  forward_dft(plan);
  spectrum_product(smem.z, reinterpret_cast<const float2*>(p.filter_spectrum) + h * (plan.N + 1), plan);
  __syncthreads();
  inverse_dft(plan);

  const T* postgate = p.postgate ? static_cast<const T*>(p.postgate) + row * L : nullptr;
  T* y = static_cast<T*>(p.y) + row * L;
  for (int64_t t = threadIdx.x; t < L; t += blockDim.x) {
    float out = real_sample(smem.z, t);
    if (p.D) out += p.D[h] * gated(u, pregate, t, L);
    if (postgate) out *= to_float(postgate[t]);
    y[t] = from_float<T>(out);
  }
}

template <typename T>
Status launch(const MonarchConvParams& p, const Plan& plan, cudaStream_t stream) {
  const size_t smem = smem_bytes(plan);
  if (cudaFuncSetAttribute(monarch_conv_fused_fwd_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                           static_cast<int>(smem)) != cudaSuccess) {
    return Status::kCudaError;
  }
  const auto rows = static_cast<unsigned>(p.batch * p.heads);
  monarch_conv_fused_fwd_kernel<T><<<rows, threads_for(plan.N), smem, stream>>>(p, plan);
  return launch_status();
}

bool valid(const MonarchConvParams& p) { return valid_sizes(p) && p.y; }

}  // namespace

// The row and the CUDA-core stages' roots must fit; the tensor-core tables come on top where they fit too
// (make_plan).
bool monarch_conv_fwd_supports(int64_t fft_size) {
  if (fft_size < 2 || fft_size / 2 > kMaxHalf) return false;
  const auto bytes = static_cast<size_t>(smem_floats(static_cast<int>(fft_size / 2), 0)) * sizeof(float);
  return bytes <= dynamic_smem_limit();
}

Status run_monarch_conv_fwd(const MonarchConvParams& p, cudaStream_t stream) {
  if (!valid(p)) return Status::kInvalidArgument;
  if (!monarch_conv_fwd_supports(p.fft_size)) return Status::kUnsupported;
  if (p.batch == 0) return Status::kSuccess;
  const Plan plan = make_plan(p, dynamic_smem_limit());
  return SUBQ_DTYPE_SWITCH(p.dtype, T, [&] { return launch<T>(p, plan, stream); });
}

}  // namespace subq
