// Hopper path of run_batched_gemm: a CUTLASS 3 TMA + wgmma kernel (warp-specialized, cooperative, persistent) for
// 16-bit inputs with row-major D. mma.sync, the Sm80 path, reaches about 40% of an H100's bf16 peak; wgmma is the
// only way to the top of it. Explicit instantiations live in instantiations/batched_gemm_sm90_*.cu.
//
// The device code exists only in the sm_90a pass: for other targets CUTLASS compiles the kernel body to a trap, and
// batched_gemm.cu calls this only on a compute capability 9.0 device in a build that includes sm_90a.
#pragma once

#include <climits>
#include <type_traits>

#include <cute/tensor.hpp>
#include <cutlass/cutlass.h>
#include <cutlass/epilogue/collective/collective_builder.hpp>
#include <cutlass/gemm/collective/collective_builder.hpp>
#include <cutlass/gemm/device/gemm_universal_adapter.h>
#include <cutlass/gemm/kernel/gemm_universal.hpp>
#include <cutlass/kernel_hardware_info.h>
#include <cutlass/layout/matrix.h>

#include "gemm/batched_gemm.h"
#include "common/cuda_status.h"

namespace subq::gemm {

using RowMajor = cutlass::layout::RowMajor;
using ColumnMajor = cutlass::layout::ColumnMajor;

// Fills a CuTe (outer, inner, batch) stride; the slots CuTe holds as static 1 are the unit-stride dimension the
// layout dispatch already guaranteed, so they are left alone.
template <typename Stride>
Stride cute_stride(int64_t first, int64_t second, int64_t batch) {
  Stride stride{};
  auto set = [](auto&& slot, int64_t value) {
    if constexpr (!cute::is_static<std::decay_t<decltype(slot)>>::value) slot = value;
  };
  set(cute::get<0>(stride), first);
  set(cute::get<1>(stride), second);
  set(cute::get<2>(stride), batch);
  return stride;
}

template <typename Element, typename LayoutA, typename LayoutB>
Status launch_batched_gemm_sm90(const BatchedGemmParams& p, cudaStream_t stream) {
  using namespace cute;
  // 128x128x64 tiles on two consumer warpgroups; 16-byte (8-element) TMA boxes.
  using TileShape = Shape<_128, _128, _64>;
  using ClusterShape = Shape<_1, _1, _1>;
  constexpr int kAlignment = 8;
  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float,
      void, cutlass::layout::RowMajor, kAlignment,  // no C operand: D = A B
      Element, cutlass::layout::RowMajor, kAlignment,
      cutlass::epilogue::TmaWarpSpecializedCooperative>::CollectiveOp;
  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Element, LayoutA, kAlignment, Element, LayoutB,
      kAlignment, float, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
      cutlass::gemm::KernelTmaWarpSpecializedCooperative>::CollectiveOp;
  using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, Mainloop, Epilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;

  if (p.m > INT_MAX || p.n > INT_MAX || p.k > INT_MAX || p.batch > INT_MAX) return Status::kInvalidArgument;
  // CuTe's B is (N, K): its first stride walks N (our column stride), its second walks K (our row stride).
  const auto stride_a = cute_stride<typename Kernel::StrideA>(p.a.row_stride, p.a.col_stride, p.a.batch_stride);
  const auto stride_b = cute_stride<typename Kernel::StrideB>(p.b.col_stride, p.b.row_stride, p.b.batch_stride);
  const auto stride_d = cute_stride<typename Kernel::StrideD>(p.d.row_stride, p.d.col_stride, p.d.batch_stride);

  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return Status::kCudaError;
  cutlass::KernelHardwareInfo hw_info;
  hw_info.device_id = device;
  hw_info.sm_count = cutlass::KernelHardwareInfo::query_device_multiprocessor_count(device);

  typename Gemm::Arguments args{
      cutlass::gemm::GemmUniversalMode::kGemm,
      {int(p.m), int(p.n), int(p.k), int(p.batch)},
      {static_cast<const Element*>(p.a.ptr), stride_a, static_cast<const Element*>(p.b.ptr), stride_b},
      {{1.0f, 0.0f}, nullptr, typename Kernel::StrideC{}, static_cast<Element*>(p.d.ptr), stride_d},
      hw_info};
  Gemm gemm;
  // kMisaligned below means "not for this path": run_batched_gemm then takes the portable kernels. The persistent
  // scheduler needs no workspace; one that did would need an allocator the plain API lacks.
  if (Gemm::get_workspace_size(args) != 0) return Status::kMisaligned;
  if (gemm.can_implement(args) != cutlass::Status::kSuccess) return Status::kMisaligned;
  if (gemm.initialize(args, nullptr, stream) != cutlass::Status::kSuccess) return Status::kCudaError;
  if (gemm.run(stream) != cutlass::Status::kSuccess) return Status::kCudaError;
  return launch_status();
}

}  // namespace subq::gemm

// Explicit instantiation (in instantiations/batched_gemm_sm90_*.cu) and the matching extern declaration
// (instantiations/extern_sm90.h).
#define SUBQ_BATCHED_GEMM_SM90_SIGNATURE(Element, LayoutA, LayoutB)                                                \
  template subq::Status subq::gemm::launch_batched_gemm_sm90<Element, subq::gemm::LayoutA, subq::gemm::LayoutB>( \
      const subq::BatchedGemmParams&, cudaStream_t)
#define SUBQ_INSTANTIATE_BATCHED_GEMM_SM90(Element, LayoutA, LayoutB) \
  SUBQ_BATCHED_GEMM_SM90_SIGNATURE(Element, LayoutA, LayoutB);
#define SUBQ_EXTERN_BATCHED_GEMM_SM90(Element, LayoutA, LayoutB) \
  extern SUBQ_BATCHED_GEMM_SM90_SIGNATURE(Element, LayoutA, LayoutB);
