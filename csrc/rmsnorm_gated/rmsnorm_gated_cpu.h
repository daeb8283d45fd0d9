// Gated RMSNorm without the CUDA kernels: the ATen composite (the CUDA path for float64, for the other dtypes while
// the kernels are opt-in, and in builds without them) and the CPU's fused loops. Same math and saved statistic as
// rmsnorm_gated.h; statistics in float32, or in float64 for float64 inputs. Gradients not asked for in output_mask
// (or dz without z) come back as empty tensors.
#pragma once

#include <array>
#include <optional>
#include <tuple>

#include <ATen/ATen.h>

namespace subq::composite {

// x (rows, dim), weight (dim,), z like x or none -> y (rows, dim) in x's dtype, rstd (rows, dim / group_size).
std::tuple<at::Tensor, at::Tensor> rmsnorm_gated_fwd(const at::Tensor& x, const at::Tensor& weight,
                                                     const std::optional<at::Tensor>& z, double eps,
                                                     int64_t group_size, bool norm_before_gate);

// -> dx (like x), dweight (like weight), dz (like z).
std::tuple<at::Tensor, at::Tensor, at::Tensor> rmsnorm_gated_bwd(const at::Tensor& dy, const at::Tensor& x,
                                                                 const at::Tensor& weight,
                                                                 const std::optional<at::Tensor>& z,
                                                                 const at::Tensor& rstd, int64_t group_size,
                                                                 bool norm_before_gate, std::array<bool, 3> output_mask);

// The CPU's fused version of the two above (rmsnorm_gated_cpu_fused.cpp): same contract, one pass per group.
std::tuple<at::Tensor, at::Tensor> rmsnorm_gated_fwd_fused(const at::Tensor& x, const at::Tensor& weight,
                                                           const std::optional<at::Tensor>& z, double eps,
                                                           int64_t group_size, bool norm_before_gate);
std::tuple<at::Tensor, at::Tensor, at::Tensor> rmsnorm_gated_bwd_fused(const at::Tensor& dy, const at::Tensor& x,
                                                                       const at::Tensor& weight,
                                                                       const std::optional<at::Tensor>& z,
                                                                       const at::Tensor& rstd, int64_t group_size,
                                                                       bool norm_before_gate,
                                                                       std::array<bool, 3> output_mask);

}  // namespace subq::composite
