// Mamba-2 SSD chunk scan as ATen composites: the CPU implementation, and the CUDA path until the fused kernels
// land. The four steps of the SSD paper per chunk of Q positions: intra-chunk quadratic form, chunk states,
// state passing, state to output; the backward is the same steps' adjoints, in reverse. Memory is linear in L:
// the largest temporary is one Q x Q decay matrix per (batch, chunk, head).
#pragma once

#include <optional>
#include <tuple>
#include <vector>

#include <ATen/ATen.h>

namespace subq::composite {

struct SsdOptions {
  int64_t chunk_size = 256;
  bool dt_softplus = false;
  double dt_min = 0.0;            // dt_limit; applied only when it is not (0, inf)
  double dt_max = 0.0;
  bool has_dt_limit = false;
};

struct SsdInputs {
  at::Tensor x, dt, A, B, C;      // (b, L, H, P), (b, L, H), (H,), (b, L, G, N), (b, L, G, N)
  std::optional<at::Tensor> D, z, dt_bias, initial_states, seq_idx;
};

// Returns (y (b, L, H, P) in x's dtype, final_states (b, H, P, N) in the compute dtype, varlen_states
// (S, H, P, N): the state after the last position of each packed sequence of cu_seqlens (S+1,), batch 1;
// empty without cu_seqlens).
std::tuple<at::Tensor, at::Tensor, at::Tensor> ssd_chunk_scan_fwd(const SsdInputs& in,
                                                                  const std::optional<at::Tensor>& cu_seqlens,
                                                                  const SsdOptions& opt);

// Gradients (dx, ddt, dA, dB, dC, dD, dz, ddt_bias, dinitial_states), each in its input's dtype; the gradient of
// an absent optional input is an empty tensor. dfinal_states may be absent (no gradient reaches the final states).
std::vector<at::Tensor> ssd_chunk_scan_bwd(const at::Tensor& dy, const std::optional<at::Tensor>& dfinal_states,
                                           const SsdInputs& in, const SsdOptions& opt);

}  // namespace subq::composite
