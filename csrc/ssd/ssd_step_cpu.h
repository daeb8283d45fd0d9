// ATen composite Mamba-2 decoding step: the CPU implementation, and the CUDA path for float64 (the kernel takes
// float32, float16 and bfloat16). Same math as ssd_step.h, in float32 (float64 for float64 x). Updates state in
// place and returns y (Bt, H, P) in x's dtype.
#pragma once

#include <optional>

#include <ATen/ATen.h>

namespace subq::composite {

at::Tensor ssd_step(const at::Tensor& state, const at::Tensor& x, const at::Tensor& dt, const at::Tensor& A,
                    const at::Tensor& B, const at::Tensor& C, const std::optional<at::Tensor>& D,
                    const std::optional<at::Tensor>& z, const std::optional<at::Tensor>& dt_bias, bool dt_softplus,
                    double dt_lo, double dt_hi);

}  // namespace subq::composite
