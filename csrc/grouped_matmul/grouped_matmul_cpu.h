// ATen composites of the grouped matmul (grouped_matmul.h has the math). Two of them:
//  - grouped_matmul_*: the CPU implementation. It reads the group sizes on the host, checks them (non-negative,
//    summing to at most the rows of x; ValueError otherwise) and runs one matmul per group.
//  - grouped_matmul_*_expanded: for CUDA tensors without a kernel (float64, or a build without the CUDA kernels).
//    The sizes stay on the device: each row's group becomes a one-hot column mask, and x spread over G blocks of
//    columns by it turns all groups into one matmul (G times the FLOPs and the memory of x, so for testing dtypes
//    only). Sizes are clamped as the kernels clamp them.
// Gradients not asked for in output_mask come back as empty tensors.
#pragma once

#include <array>
#include <optional>
#include <tuple>

#include <ATen/ATen.h>

namespace subq::composite {

at::Tensor grouped_matmul_fwd(const at::Tensor& x, const at::Tensor& w, const at::Tensor& group_sizes,
                              const std::optional<at::Tensor>& bias);
// Returns (dx, dw, dbias).
std::tuple<at::Tensor, at::Tensor, at::Tensor> grouped_matmul_bwd(const at::Tensor& dy, const at::Tensor& x,
                                                                  const at::Tensor& w, const at::Tensor& group_sizes,
                                                                  std::array<bool, 3> output_mask);

at::Tensor grouped_matmul_fwd_expanded(const at::Tensor& x, const at::Tensor& w, const at::Tensor& group_sizes,
                                       const std::optional<at::Tensor>& bias);
std::tuple<at::Tensor, at::Tensor, at::Tensor> grouped_matmul_bwd_expanded(const at::Tensor& dy, const at::Tensor& x,
                                                                           const at::Tensor& w,
                                                                           const at::Tensor& group_sizes,
                                                                           std::array<bool, 3> output_mask);

}  // namespace subq::composite
