// The kernel API's element type and float32 math mode for a torch dtype, shared by the CUDA glue. The glue hands the
// kernels float32, float16 and bfloat16 only (float64 takes the ATen composites), so any other dtype is a glue bug.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include "common/dtype.h"

namespace subq::glue {

// The dtypes the kernels take; the glue sends the others (float64) to the ATen composites.
inline bool has_kernel_dtype(at::ScalarType t) { return t == at::kFloat || t == at::kHalf || t == at::kBFloat16; }

inline DType kernel_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: TORCH_CHECK(false, "subq internal error: no kernel element type for ", t);
  }
}

// TF32 tensor cores for float32 when torch allows them for matmuls (torch.backends.cuda.matmul.allow_tf32).
inline MathMode kernel_math_mode(at::ScalarType t) {
  return t == at::kFloat && at::globalContext().allowTF32CuBLAS() ? MathMode::kTF32 : MathMode::kExact;
}

}  // namespace subq::glue
