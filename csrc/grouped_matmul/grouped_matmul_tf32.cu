// The TensorOpTF32 kernel family of run_grouped_matmul: forward, input-gradient and weight-gradient layouts.
#include "grouped_matmul/grouped_matmul_launch.cuh"

SUBQ_INSTANTIATE_GROUPED_GEMM(TensorOpTF32)
