// Decoding step of the causal conv1d: a few new tokens against a rolling state. One thread per (batch, channel):
// the work is a handful of multiply-adds per token, so the kernel is a single pass over the state and the tokens.
#include "causal_conv1d/causal_conv1d_common.cuh"

namespace subq {
namespace conv1d {
namespace {

template <typename T, int W>
__global__ void __launch_bounds__(kThreads) causal_conv1d_update_kernel(CausalConv1dUpdateParams p) {
  constexpr int kHalo = W - 1;
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= p.batch * p.dim) return;
  const int64_t b = idx / p.dim, d = idx % p.dim;
  const T* x = static_cast<const T*>(p.x);
  T* state = static_cast<T*>(p.conv_state);
  T* y = static_cast<T*>(p.y);
  const int64_t S = p.state_len;

  float w[W];
#pragma unroll
  for (int k = 0; k < W; ++k) w[k] = p.weight[d * W + k];
  const float bias = p.bias != nullptr ? p.bias[d] : 0.f;

  // window[k] = input at (current token - kHalo + k); the state's last kHalo entries precede the first token.
  float window[W];
#pragma unroll
  for (int k = 0; k < kHalo; ++k) window[k] = to_float(state[at(p.state_strides, b, d, S - kHalo + k)]);
  for (int64_t i = 0; i < p.tokens; ++i) {
    window[kHalo] = to_float(x[at(p.x_strides, b, d, i)]);
    float acc = bias;
#pragma unroll
    for (int k = 0; k < W; ++k) acc += w[k] * window[k];
    y[at(p.y_strides, b, d, i)] = from_float<T>(p.silu ? silu(acc) : acc);
#pragma unroll
    for (int k = 0; k < kHalo; ++k) window[k] = window[k + 1];
  }

  // Shift left by `tokens` and append them: new[j] = (state ++ x)[j + tokens]. Ascending j reads only entries at
  // or after j, none of them written yet, so the shift is safe in place; elements are copied, not rounded.
  for (int64_t j = 0; j < S; ++j) {
    const int64_t src = j + p.tokens;
    state[at(p.state_strides, b, d, j)] =
        src < S ? state[at(p.state_strides, b, d, src)] : x[at(p.x_strides, b, d, src - S)];
  }
}

}  // namespace
}  // namespace conv1d

Status run_causal_conv1d_update(const CausalConv1dUpdateParams& p, cudaStream_t stream) {
  using namespace conv1d;
  if (p.batch < 0 || p.dim < 0 || p.tokens < 0 || p.width < 2 || p.width > 4 || p.state_len < p.width - 1) {
    return Status::kInvalidArgument;
  }
  const int64_t threads = p.batch * p.dim;
  const int64_t blocks = (threads + kThreads - 1) / kThreads;
  if (blocks > INT_MAX) return Status::kInvalidArgument;
  if (blocks == 0) return Status::kSuccess;
  return dispatch(p.dtype, p.width, [&](auto t, auto w) {
    using T = decltype(t);
    causal_conv1d_update_kernel<T, decltype(w)::value><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(p);
    return launch_status();
  });
}

}  // namespace subq
