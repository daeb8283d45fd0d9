// The TensorOpF16 kernel family of run_grouped_gemm: forward, input-gradient and weight-gradient layouts.
#include "grouped_gemm/grouped_gemm_launch.cuh"

SUBQ_INSTANTIATE_GROUPED_GEMM(TensorOpF16)
