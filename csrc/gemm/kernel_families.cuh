// CUTLASS tile configurations, one per element type / math mode. Each is a CUTLASS 2.x multistage mainloop on the
// Sm80 tensor-core (or SIMT) path: the same code runs on sm_80, sm_89 and sm_90a.
#pragma once

#include <cutlass/cutlass.h>
#include <cutlass/numeric_types.h>
#include <cutlass/arch/arch.h>
#include <cutlass/arch/mma.h>
#include <cutlass/gemm/gemm.h>

namespace subq::gemm {

using cutlass::gemm::GemmShape;

// 16-bit inputs: 128x128 tiles of 16x8x16 bf16/fp16 MMAs, 4 warps of 64x64, 8-element (16-byte) cp.async vectors.
// Three stages hide global latency while keeping shared memory (48 KB) low enough for two CTAs per SM.
template <typename Element>
struct TensorOp16 {
  using ElementInput = Element;
  using ElementOutput = Element;
  using OpClass = cutlass::arch::OpClassTensorOp;
  using Operator = cutlass::arch::OpMultiplyAdd;
  using ThreadblockShape = GemmShape<128, 128, 32>;
  using WarpShape = GemmShape<64, 64, 32>;
  using InstructionShape = GemmShape<16, 8, 16>;
  static constexpr int kStages = 3;
  static constexpr int kAlignment = 8;
};

// float32 inputs on tensor cores in TF32 (round-to-nearest into 10-bit mantissa, fp32 accumulate).
struct TensorOpTF32 {
  using ElementInput = float;
  using ElementOutput = float;
  using OpClass = cutlass::arch::OpClassTensorOp;
  using Operator = cutlass::arch::OpMultiplyAdd;
  using ThreadblockShape = GemmShape<128, 128, 16>;
  using WarpShape = GemmShape<64, 64, 16>;
  using InstructionShape = GemmShape<16, 8, 8>;
  static constexpr int kStages = 4;
  static constexpr int kAlignment = 4;
};

// Exact float32: FFMA on the SIMT cores, scalar loads (any alignment).
struct SimtF32 {
  using ElementInput = float;
  using ElementOutput = float;
  using OpClass = cutlass::arch::OpClassSimt;
  using Operator = cutlass::arch::OpMultiplyAdd;
  using ThreadblockShape = GemmShape<128, 128, 8>;
  using WarpShape = GemmShape<32, 64, 8>;
  using InstructionShape = GemmShape<1, 1, 1>;
  static constexpr int kStages = 3;
  static constexpr int kAlignment = 1;
};

using TensorOpBF16 = TensorOp16<cutlass::bfloat16_t>;
using TensorOpF16 = TensorOp16<cutlass::half_t>;

}  // namespace subq::gemm
