// FLASH (Hua et al. 2022, "Transformer Quality in Linear Time") as ATen composites: the CPU implementation, and
// the CUDA path until fused kernels land.
//
//   flash_chunk_attention  mixed-chunk attention: relu² attention inside each chunk of C positions plus a linear
//                          attention over chunks (all of them, or strictly earlier ones when causal). Memory is
//                          linear in L: the largest temporaries are one C x C score square per (batch, chunk) and
//                          one S x E key-value state per (batch, chunk).
//   gau_attention          FLASH-Quad: relu² attention over the whole sequence, in key tiles with a running sum,
//                          never holding more than L x kKeyTile scores; the backward recomputes each tile.
//   flash_step             one causal decoding step of flash_chunk_attention, updating the decoding state in place.
#pragma once

#include <optional>
#include <vector>

#include <ATen/ATen.h>

namespace subq::composite {

struct FlashChunkInputs {
  at::Tensor q_quad, k_quad, q_lin, k_lin;  // (b, L, S)
  at::Tensor v;                             // (b, L, E)
  std::optional<at::Tensor> u;              // (b, L, E) output gate
  std::optional<at::Tensor> rel_bias;       // (2C-1,): bias of query i, key j of one chunk is rel_bias[j - i + C - 1]
};

struct FlashChunkOptions {
  int64_t chunk_size = 256;
  bool causal = false;
  double quad_scale = 1.0;
  double lin_scale = 1.0;
};

// The output (b, L, E) in v's dtype.
at::Tensor flash_chunk_attention_fwd(const FlashChunkInputs& in, const FlashChunkOptions& opt);

// Gradients (dq_quad, dk_quad, dq_lin, dk_lin, dv, du, drel_bias), each in its input's dtype; the gradient of an
// absent optional input is an empty tensor.
std::vector<at::Tensor> flash_chunk_attention_bwd(const at::Tensor& dout, const FlashChunkInputs& in,
                                                  const FlashChunkOptions& opt);

struct GauInputs {
  at::Tensor q, k;                     // (b, L, S)
  at::Tensor v;                        // (b, L, E)
  std::optional<at::Tensor> u;         // (b, L, E)
  std::optional<at::Tensor> rel_bias;  // (2L-1,): bias of query i, key j is rel_bias[j - i + L - 1]
};

struct GauOptions {
  bool causal = false;
  double scale = 1.0;
};

at::Tensor gau_attention_fwd(const GauInputs& in, const GauOptions& opt);

// Gradients (dq, dk, dv, du, drel_bias), as flash_chunk_attention_bwd.
std::vector<at::Tensor> gau_attention_bwd(const at::Tensor& dout, const GauInputs& in, const GauOptions& opt);

// The decoding state of causal flash_chunk_attention after `position` tokens, in the compute dtype:
// lin_state (b, S, E) = sum of k_lin^T v over the completed chunks; chunk_kv (b, S, E) = the same over the current
// chunk's tokens so far; k_quad_cache (b, C, S) and v_cache (b, C, E) = the current chunk's keys and values.
struct FlashDecodeState {
  at::Tensor lin_state, chunk_kv, k_quad_cache, v_cache;
  int64_t position = 0;
};

// The output (b, E) of the token at `state.position` (inputs (b, S) and (b, E)); updates the state in place
// (the caller advances the position).
at::Tensor flash_step(const at::Tensor& q_quad, const at::Tensor& k_quad, const at::Tensor& q_lin,
                      const at::Tensor& k_lin, const at::Tensor& v, const std::optional<at::Tensor>& u,
                      const std::optional<at::Tensor>& rel_bias, FlashDecodeState& state, double quad_scale,
                      double lin_scale);

}  // namespace subq::composite
