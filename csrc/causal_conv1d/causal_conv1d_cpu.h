// ATen composite causal conv1d: the CPU implementation, and the CUDA path for float64 (the kernels take float32,
// float16 and bfloat16). Same semantics as causal_conv1d.h; computes in float32 (float64 for float64 x) and
// returns x's dtype, y and dx with x's memory layout. Undefined optional tensors mean "absent"; gradients not asked
// for in output_mask come back as empty tensors.
#pragma once

#include <array>
#include <optional>
#include <tuple>

#include <ATen/ATen.h>

namespace subq::composite {

// Returns (y, final_states); final_states is empty unless return_final_states.
std::tuple<at::Tensor, at::Tensor> causal_conv1d_fwd(const at::Tensor& x, const at::Tensor& weight,
                                                     const std::optional<at::Tensor>& bias,
                                                     const std::optional<at::Tensor>& seq_idx,
                                                     const std::optional<at::Tensor>& initial_states,
                                                     bool return_final_states, bool silu);

// Returns (dx, dweight, dbias, dinitial_states) for output_mask over the same four.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> causal_conv1d_bwd(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& seq_idx, const std::optional<at::Tensor>& initial_states, const at::Tensor& dy,
    const std::optional<at::Tensor>& dfinal_states, bool silu, std::array<bool, 4> output_mask);

// Decoding: returns y (batch, dim, tokens) and shifts conv_state (batch, dim, state_len) in place.
at::Tensor causal_conv1d_update(const at::Tensor& x, const at::Tensor& conv_state, const at::Tensor& weight,
                                const std::optional<at::Tensor>& bias, bool silu);

}  // namespace subq::composite
