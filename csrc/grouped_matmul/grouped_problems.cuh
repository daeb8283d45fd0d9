// What the setup kernel hands the CUTLASS grouped GEMM: per-problem sizes, pointers and leading dimensions, all in
// device memory. Declares the launcher (defined in grouped_matmul_launch.cuh and instantiated once per kernel family
// in grouped_matmul_<family>.cu), so the dispatcher compiles without the CUTLASS kernel templates.
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

#include <cutlass/gemm_coord.h>
#include <cutlass/layout/matrix.h>

#include "common/status.h"
#include "gemm/kernel_families.cuh"

namespace subq::grouped_matmul {

using RowMajor = cutlass::layout::RowMajor;
using ColumnMajor = cutlass::layout::ColumnMajor;

// Operand slots of D = A·B + beta·C, in the order of the arrays below.
enum Operand { kA = 0, kB = 1, kC = 2, kD = 3, kOperands = 4 };

struct Problems {
  cutlass::gemm::GemmCoord* sizes = nullptr;  // (count,) as (m, n, k)
  void** ptr[kOperands] = {};                 // (count,) each
  int64_t* ld[kOperands] = {};                // (count,) each, in elements
  int count = 0;
  bool add_c = false;  // beta = 1 (C is the bias row, broadcast over rows by ld 0); else beta = 0 and C is not read
};

// All problems in one launch of a persistent CUTLASS grouped GEMM (one CTA per SM slot, tiles scheduled on the
// device). D is row-major; A and B as the layouts say.
template <typename Family, typename LayoutA, typename LayoutB>
Status launch_grouped_gemm(const Problems& problems, cudaStream_t stream);

}  // namespace subq::grouped_matmul
