// Short depthwise causal convolution (Mamba / Mamba-2's conv1d), plain C++ API: raw device pointers, sizes,
// element strides, a CUDA stream; no framework types.
//
//   y[b, d, t] = act(bias[d] + sum_{k<W} weight[d, k] * xs[b, d, t - (W-1) + k]),   W = width in 2..4
//
// where xs is x extended to negative times by initial_states (b, d, W-1 + t) or by zeros, and act is the identity
// or SiLU. With seq_idx (packed sequences) a tap reading time s counts only when seq_idx[b, s] == seq_idx[b, t];
// seq_idx and initial_states are exclusive. final_states[b, d, j] = xs[b, d, L - (W-1) + j], the inputs the next
// call needs. x, y, the states and their gradients share `dtype`; weight and bias are float32 (the caller converts
// them), and so are their gradients. All tensors take arbitrary element strides (channels-first or channels-last
// x alike); weight is dense (dim, width). Every function returns a Status and never throws.
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

#include "common/dtype.h"
#include "common/status.h"

namespace subq {

// Element strides of a (batch, dim, time) tensor; the time axis of the states is their W-1 (or state_len) axis.
struct Strides3 {
  int64_t batch = 0, dim = 0, time = 0;
};

struct CausalConv1dParams {
  DType dtype = DType::kBFloat16;
  int64_t batch = 0, dim = 0, seqlen = 0;
  int width = 4;
  bool silu = false;
  const void* x = nullptr;                // (batch, dim, seqlen)
  Strides3 x_strides;
  const float* weight = nullptr;          // (dim, width), dense
  const float* bias = nullptr;            // (dim,); nullptr: no bias
  const int32_t* seq_idx = nullptr;       // (batch, seqlen); nullptr: one sequence per row
  int64_t seq_idx_batch_stride = 0, seq_idx_time_stride = 0;
  const void* initial_states = nullptr;   // (batch, dim, width-1); nullptr: zeros
  Strides3 initial_strides;
  void* y = nullptr;                      // (batch, dim, seqlen); written by the forward
  Strides3 y_strides;
  void* final_states = nullptr;           // (batch, dim, width-1); nullptr: not wanted
  Strides3 final_strides;
};

// Float32 scratch of the backward: per (batch, time tile) partial sums of the weight and bias gradients, reduced in
// a fixed order by a second pass so that the gradients are deterministic.
int64_t causal_conv1d_bwd_workspace_elements(const CausalConv1dParams& p);

struct CausalConv1dGrads {
  const void* dy = nullptr;               // (batch, dim, seqlen)
  Strides3 dy_strides;
  const void* dfinal_states = nullptr;    // (batch, dim, width-1); nullptr: zero
  Strides3 dfinal_strides;
  void* dx = nullptr;                     // (batch, dim, seqlen); nullptr: not wanted
  Strides3 dx_strides;
  float* dweight = nullptr;               // (dim, width), dense; nullptr: not wanted
  float* dbias = nullptr;                 // (dim,); nullptr: not wanted
  void* dinitial_states = nullptr;        // (batch, dim, width-1); nullptr: not wanted
  Strides3 dinitial_strides;
  float* workspace = nullptr;             // causal_conv1d_bwd_workspace_elements(p) floats, when dweight or dbias
};

// Decoding: conv_state (batch, dim, state_len >= width-1) holds the latest inputs, oldest first. For each of the
// `tokens` new inputs x[:, :, i] in order: y[:, :, i] = the forward's output at that token; then the state shifts
// left by `tokens` and ends with the new inputs. conv_state is updated in place.
struct CausalConv1dUpdateParams {
  DType dtype = DType::kBFloat16;
  int64_t batch = 0, dim = 0, tokens = 0, state_len = 0;
  int width = 4;
  bool silu = false;
  const void* x = nullptr;                // (batch, dim, tokens)
  Strides3 x_strides;
  void* conv_state = nullptr;             // (batch, dim, state_len), read and written
  Strides3 state_strides;
  const float* weight = nullptr;          // (dim, width), dense
  const float* bias = nullptr;            // (dim,); nullptr: no bias
  void* y = nullptr;                      // (batch, dim, tokens)
  Strides3 y_strides;
};

Status run_causal_conv1d_fwd(const CausalConv1dParams& p, cudaStream_t stream);
Status run_causal_conv1d_bwd(const CausalConv1dParams& p, const CausalConv1dGrads& g, cudaStream_t stream);
Status run_causal_conv1d_update(const CausalConv1dUpdateParams& p, cudaStream_t stream);

}  // namespace subq
