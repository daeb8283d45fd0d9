// Mamba-2 SSD chunk scan forward on tensor cores, plain C++ API (raw device pointers, a CUDA stream; no framework
// types). The four steps of the SSD paper, per chunk of Q positions, as five kernels:
//   chunk_cumsum   dt' = clamp(softplus?(dt + dt_bias)) and the inclusive cumulative sum of dt' * A in the chunk;
//   chunk_cb       C_t . B_s for every (t, s) pair of a chunk, per group (lower-triangular tiles only);
//   chunk_state    the state each chunk leaves behind: sum_s exp(cum_last - cum_s) dt'_s x_s ⊗ B_s;
//   state_passing  h_c = exp(cum_last_c) h_{c-1} + state_c over the chunks, in place: the buffer ends up holding
//                  the state entering each chunk;
//   chunk_scan     y_t = sum_{s<=t} C_t.B_s exp(cum_t - cum_s) dt'_s x_s + exp(cum_t) C_t . h_entering
//                        + D x_t, then times silu(z_t).
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

struct SsdForwardParams {
  DType dtype = DType::kBFloat16;   // x, B, C, z, y: kFloat16 or kBFloat16
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
  float* final_states = nullptr;    // (b, H, P, N), written
  void* workspace = nullptr;        // ssd_forward_workspace_bytes(shape) bytes, 256-byte aligned
};

size_t ssd_forward_workspace_bytes(const SsdShape& shape);

// kInvalidArgument for shapes outside the kernels' range (chunk_size not 64/128/256, P > 128, N > 256, empty
// dimensions are fine and do nothing); kUnsupported for float32 inputs (the caller takes its composite path).
Status run_ssd_forward(const SsdForwardParams& params, cudaStream_t stream);

}  // namespace subq
