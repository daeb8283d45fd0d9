// The one templated launcher behind run_grouped_matmul: CUTLASS 2.x GemmGrouped with device-only scheduling on the
// kernel families of csrc/gemm (the same tiles as the batched GEMM, so the same code runs on sm_80, sm_89 and
// sm_90a). Each grouped_matmul_<family>.cu instantiates it for the three products' operand layouts.
#pragma once

#include <atomic>

#include <cutlass/cutlass.h>
#include <cutlass/epilogue/thread/linear_combination.h>
#include <cutlass/gemm/device/gemm_grouped.h>
#include <cutlass/gemm/kernel/default_gemm_grouped.h>

#include "grouped_matmul/grouped_problems.cuh"

namespace subq::grouped_matmul {

template <typename Family, typename LayoutA, typename LayoutB>
using GroupedGemm = cutlass::gemm::device::GemmGrouped<typename cutlass::gemm::kernel::DefaultGemmGrouped<
    typename Family::ElementInput, LayoutA, cutlass::ComplexTransform::kNone, Family::kAlignment,
    typename Family::ElementInput, LayoutB, cutlass::ComplexTransform::kNone, Family::kAlignment,
    typename Family::ElementOutput, RowMajor, float, typename Family::OpClass, cutlass::arch::Sm80,
    typename Family::ThreadblockShape, typename Family::WarpShape, typename Family::InstructionShape,
    cutlass::epilogue::thread::LinearCombination<typename Family::ElementOutput, Family::kAlignment, float, float>,
    // The grouped kernel walks its own tile order; the swizzle only completes the kernel type.
    cutlass::gemm::threadblock::GemmIdentityThreadblockSwizzle<>, Family::kStages,
    // The problem sizes live on the device: every CTA finds its next tile there, the host never reads them.
    cutlass::gemm::kernel::GroupScheduleMode::kDeviceOnly, typename Family::Operator>::GemmKernel>;

// Persistent CTAs: as many as fit on the device at once (SM count times this kernel's occupancy), each looping over
// tiles. Queried once per device and kernel; the queries do not synchronise with any stream.
template <typename Gemm>
int persistent_ctas() {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> cached[kMaxDevices] = {};
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess || device >= kMaxDevices) return 0;
  int ctas = cached[device].load(std::memory_order_relaxed);
  if (ctas == 0) {
    ctas = Gemm::sufficient();
    cached[device].store(ctas, std::memory_order_relaxed);
  }
  return ctas;
}

template <typename Family, typename LayoutA, typename LayoutB>
Status launch_grouped_gemm(const Problems& problems, cudaStream_t stream) {
  using Gemm = GroupedGemm<Family, LayoutA, LayoutB>;
  using ElementA = typename Gemm::ElementA;
  using ElementB = typename Gemm::ElementB;
  using ElementC = typename Gemm::ElementC;
  const int ctas = persistent_ctas<Gemm>();
  if (ctas <= 0) return Status::kCudaError;
  typename Gemm::EpilogueOutputOp::Params epilogue(1.0f, problems.add_c ? 1.0f : 0.0f);
  typename Gemm::Arguments args(problems.sizes, problems.count, ctas, epilogue,
                                reinterpret_cast<ElementA**>(problems.ptr[kA]),
                                reinterpret_cast<ElementB**>(problems.ptr[kB]),
                                reinterpret_cast<ElementC**>(problems.ptr[kC]),
                                reinterpret_cast<ElementC**>(problems.ptr[kD]),
                                problems.ld[kA], problems.ld[kB], problems.ld[kC], problems.ld[kD]);
  Gemm gemm;
  if (gemm.initialize(args, nullptr, stream) != cutlass::Status::kSuccess) return Status::kCudaError;
  if (gemm.run(stream) != cutlass::Status::kSuccess) return Status::kCudaError;
  return Status::kSuccess;
}

}  // namespace subq::grouped_matmul

// Explicit instantiation for one kernel family: forward (A, B row-major), input gradient (B = w^T, column-major),
// weight gradient (A = x^T, column-major).
#define SUBQ_INSTANTIATE_GROUPED_GEMM_LAYOUTS(Family, LayoutA, LayoutB)                        \
  template subq::Status                                                                         \
  subq::grouped_matmul::launch_grouped_gemm<subq::gemm::Family, subq::grouped_matmul::LayoutA,  \
                                            subq::grouped_matmul::LayoutB>(                     \
      const subq::grouped_matmul::Problems&, cudaStream_t);
#define SUBQ_INSTANTIATE_GROUPED_GEMM(Family)                        \
  SUBQ_INSTANTIATE_GROUPED_GEMM_LAYOUTS(Family, RowMajor, RowMajor)  \
  SUBQ_INSTANTIATE_GROUPED_GEMM_LAYOUTS(Family, RowMajor, ColumnMajor) \
  SUBQ_INSTANTIATE_GROUPED_GEMM_LAYOUTS(Family, ColumnMajor, RowMajor)
