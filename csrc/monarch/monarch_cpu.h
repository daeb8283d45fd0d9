// ATen composite Monarch products: the CPU implementation, and the CUDA path for dtypes and shapes the CUTLASS
// kernels do not take (float64, blocks that are not multiples of the vector width). Same results and the same
// intermediate layout as monarch.h, so saved tensors are interchangeable. Gradients not asked for in output_mask
// come back as empty tensors.
#pragma once

#include <array>
#include <tuple>

#include <ATen/ATen.h>

namespace subq::composite {

at::Tensor blockdiag_fwd(const at::Tensor& x, const at::Tensor& w);
std::tuple<at::Tensor, at::Tensor> blockdiag_bwd(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& w,
                                                 std::array<bool, 2> output_mask);
std::tuple<at::Tensor, at::Tensor> monarch_fwd(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& w2);
std::tuple<at::Tensor, at::Tensor, at::Tensor> monarch_bwd(const at::Tensor& dy, const at::Tensor& x,
                                                           const at::Tensor& intermediate, const at::Tensor& w1,
                                                           const at::Tensor& w2, std::array<bool, 3> output_mask);

}  // namespace subq::composite
