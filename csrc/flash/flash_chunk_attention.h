// FLASH mixed-chunk attention forward and backward on tensor cores (Hua et al. 2022), plain C++ API (raw device
// pointers, a CUDA stream; no framework types). The sequence is split into G = ceil(L / C) chunks; the forward runs
// three kernels:
//   chunk_states   K_lin,gᵀ V_g (S x E) per chunk g into a float32 workspace (G x S x E per batch row);
//   state_prefix   in place over the chunks: the exclusive prefix sum (causal: strictly earlier chunks) or the
//                  total (bidirectional: every chunk, left in chunk 0's slot), times lin_scale;
//   chunk_output   per chunk, query tile and E tile: relu(quad_scale Q_quad K_quadᵀ + bias)² V (keys past L masked,
//                  and keys after the query when causal) + Q_lin state, times u; written in the input dtype.
// The backward (flash_chunk_attention_bwd.cu) recomputes the states with the same two kernels, and the states'
// gradients with them too (on Q_lin and dO, the prefix reversed); then per chunk the score gradients, the value
// gradient and the four feature gradients (the list is at the top of that file).
// The math, scaling and masking are those of the ATen composite (csrc/flash/flash_cpu.cpp).
// Inputs are 16-bit (float16 / bfloat16) and contiguous; products accumulate in float32.
// Every function returns a Status and never throws.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cuda_runtime.h>

#include "common/dtype.h"
#include "common/status.h"

namespace subq {

struct FlashChunkShape {
  int64_t batch = 0, seqlen = 0, qk_dim = 0, value_dim = 0;  // B, L, S, E
  int64_t chunk_size = 256;                                  // C: 64, 128, 256 or 512
};

// The forward's dtype, shape, options, inputs, output and workspace. The backward takes the same struct (its out
// and workspace are not read) with a FlashChunkGrads.
struct FlashChunkParams {
  DType dtype = DType::kBFloat16;  // q_quad, k_quad, q_lin, k_lin, v, u (and out, dout and the gradients):
                                   // kFloat16 or kBFloat16
  FlashChunkShape shape;
  bool causal = false;
  float quad_scale = 1.f;          // multiplies Q_quad K_quadᵀ before the bias
  float lin_scale = 1.f;           // multiplies Q_lin state

  const void* q_quad = nullptr;    // (B, L, S)
  const void* k_quad = nullptr;    // (B, L, S)
  const void* q_lin = nullptr;     // (B, L, S)
  const void* k_lin = nullptr;     // (B, L, S)
  const void* v = nullptr;         // (B, L, E)
  const void* u = nullptr;         // (B, L, E) output gate; nullptr: none
  const float* rel_bias = nullptr;  // (2C - 1,): query i, key j of a chunk get rel_bias[j - i + C - 1]; nullptr: none

  void* out = nullptr;             // (B, L, E), written
  void* workspace = nullptr;       // flash_chunk_attention_fwd_workspace_bytes(shape) bytes, 256-byte aligned
};

size_t flash_chunk_attention_fwd_workspace_bytes(const FlashChunkShape& shape);

// kInvalidArgument for shapes outside the kernels' range (C not 64/128/256/512, S > 256, E > 4096, B > 65535,
// a missing pointer); an empty batch or sequence does nothing. kUnsupported for float32 inputs (the caller takes
// its composite path).
Status run_flash_chunk_attention_fwd(const FlashChunkParams& params, cudaStream_t stream);

// The output's gradient and the gradients to write. Gradients are overwritten, not accumulated into.
struct FlashChunkGrads {
  const void* dout = nullptr;       // (B, L, E): the gradient of the forward's output

  void* dq_quad = nullptr;          // (B, L, S), written
  void* dk_quad = nullptr;          // (B, L, S), written
  void* dq_lin = nullptr;           // (B, L, S), written
  void* dk_lin = nullptr;           // (B, L, S), written
  void* dv = nullptr;               // (B, L, E), written
  void* du = nullptr;               // (B, L, E), written when u is given (required then)
  float* drel_bias = nullptr;       // (2C - 1,) float32, written when rel_bias is given (required then)
  void* workspace = nullptr;        // flash_chunk_attention_bwd_workspace_bytes(shape) bytes, 256-byte aligned
};

size_t flash_chunk_attention_bwd_workspace_bytes(const FlashChunkShape& shape);

// The same shape limits, statuses and empty-input behaviour as run_flash_chunk_attention_fwd; kInvalidArgument also
// for a missing gradient pointer (du with u, drel_bias with rel_bias).
Status run_flash_chunk_attention_bwd(const FlashChunkParams& params, const FlashChunkGrads& grads,
                                     cudaStream_t stream);

}  // namespace subq
