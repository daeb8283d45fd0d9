// Mamba-2 SSD chunk scan forward on tensor cores, plain C++ API (raw device pointers, a CUDA stream; no framework
// types). The four steps of the SSD paper, per chunk of Q positions, as five kernels:
//   chunk_cumsum   dt' = clamp(softplus?(dt + dt_bias)) and the inclusive cumulative sum of dt' * A in the chunk;
//   chunk_cb       C_t . B_s for every (t, s) pair of a chunk, per group (lower-triangular tiles only);
//   chunk_state    the state each chunk leaves behind: sum_s exp(cum_last - cum_s) dt'_s x_s ⊗ B_s;
//   state_passing  h_c = exp(cum_last_c) h_{c-1} + state_c over the chunks, in place: the buffer ends up holding
//                  the state entering each chunk;
//   chunk_scan     y_t = sum_{s<=t} C_t.B_s exp(cum_t - cum_s) dt'_s x_s + exp(cum_t) C_t . h_entering
//                        + D x_t, then times silu(z_t).
// The backward recomputes the first four (and the SSM output) and walks the same steps' adjoints in reverse; see
// csrc/ssd/ssd_chunk_scan_bwd.cu.
// Packed sequences (seq_idx) reset the state where the index changes, as in csrc/ssd/ssd_chunk_scan_cpu.cpp.
// Inputs are 16-bit (float16 / bfloat16) and dense (contiguous); decays, scans and states are float32.
// Every function returns a Status and never throws.
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

#include "common/dtype.h"
#include "common/status.h"

namespace subq {

struct SsdShape {
  int64_t batch = 0, seqlen = 0, heads = 0, head_dim = 0, groups = 0, state_dim = 0;  // b, L, H, P, G, N
  int64_t chunk_size = 256;                                                         // Q: 64, 128 or 256
};

// The forward's dtype, shape, options, inputs, outputs and workspace. The backward takes the same struct (its
// outputs and workspace are not read) with an SsdChunkScanGrads.
struct SsdChunkScanParams {
  DType dtype = DType::kBFloat16;   // x, B, C, z, y (and dy, dx, dB, dC, dz): kFloat16 or kBFloat16
  SsdShape shape;
  bool dt_softplus = false;
  float dt_lo = 0.f, dt_hi = 0.f;   // clamp of the processed dt, applied when has_dt_limit
  bool has_dt_limit = false;

  const void* x = nullptr;          // (b, L, H, P)
  const float* dt = nullptr;        // (b, L, H) raw dt, float32
  const float* A = nullptr;         // (H,)
  const void* B = nullptr;          // (b, L, G, N)
  const void* C = nullptr;          // (b, L, G, N)
  const float* D = nullptr;         // (H,) or (H, P); nullptr: no skip
  bool D_per_channel = false;
  const void* z = nullptr;          // (b, L, H, P); nullptr: no gate
  const float* dt_bias = nullptr;   // (H,); nullptr: none
  const float* initial_states = nullptr;  // (b, H, P, N); nullptr: zero
  const int32_t* seq_idx = nullptr;       // (b, L); nullptr: one sequence per row

  void* y = nullptr;                // (b, L, H, P), written
  float* y_float32 = nullptr;       // instead of y: the output in float32 (the backward's recompute keeps it so)
  float* final_states = nullptr;    // (b, H, P, N), written
  void* workspace = nullptr;        // ssd_chunk_scan_fwd_workspace_bytes(shape) bytes, 256-byte aligned
};

size_t ssd_chunk_scan_fwd_workspace_bytes(const SsdShape& shape);

// kInvalidArgument for shapes outside the kernels' range (chunk_size not 64/128/256, P > 128, N > 256, empty
// dimensions are fine and do nothing); kUnsupported for float32 inputs (the caller takes its composite path).
Status run_ssd_chunk_scan_fwd(const SsdChunkScanParams& params, cudaStream_t stream);

// The gradients of the forward above given dy (and optionally dfinal_states). Every gradient of a present input is
// written in full, those of absent inputs (D, z, dt_bias, initial_states) are not. dx, dB, dC, dz are 16-bit like
// their inputs; the others float32. dA, dD and ddt_bias are sums over the batch and the sequence, accumulated with
// float32 atomics (their order, so their last bits, may vary run to run); every other gradient is reduced in a
// fixed order.
struct SsdChunkScanGrads {
  const void* dy = nullptr;                // (b, L, H, P)
  const float* dfinal_states = nullptr;    // (b, H, P, N); nullptr: no gradient reaches the final states

  void* dx = nullptr;               // (b, L, H, P)
  float* ddt = nullptr;             // (b, L, H): the gradient of the raw dt
  float* dA = nullptr;              // (H,)
  void* dB = nullptr;               // (b, L, G, N)
  void* dC = nullptr;               // (b, L, G, N)
  float* dD = nullptr;              // D's shape; written when D is given
  void* dz = nullptr;               // (b, L, H, P); written when z is given
  float* ddt_bias = nullptr;        // (H,); written when dt_bias is given
  float* dinitial_states = nullptr; // (b, H, P, N); written when initial_states is given
  void* workspace = nullptr;        // ssd_chunk_scan_bwd_workspace_bytes(shape) bytes, 256-byte aligned
};

size_t ssd_chunk_scan_bwd_workspace_bytes(const SsdShape& shape);

// The same shape and dtype rules as run_ssd_chunk_scan_fwd; kInvalidArgument also when a gradient output of a
// present input is missing.
Status run_ssd_chunk_scan_bwd(const SsdChunkScanParams& params, const SsdChunkScanGrads& grads, cudaStream_t stream);

}  // namespace subq
