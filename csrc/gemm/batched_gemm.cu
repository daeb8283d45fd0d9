// Runtime dispatch of run_batched_gemm onto the compiled (family, layout) instantiations.
#include <cstdint>
#include <utility>

#include "common/dispatch.h"
#include "gemm/batched_gemm.h"
#include "gemm/batched_gemm_launch.cuh"
#include "gemm/instantiations/extern.h"
#ifdef SUBQ_WITH_SM90A
#include "gemm/instantiations/extern_sm90.h"
#endif

namespace subq {
namespace {

using gemm::Affine;
using gemm::ColumnMajor;
using gemm::RowMajor;

enum class Major { kRow, kColumn, kNeither };

Major major_of(const StridedMatrix& m) {
  if (m.col_stride == 1) return Major::kRow;
  if (m.row_stride == 1) return Major::kColumn;
  return Major::kNeither;
}

StridedMatrix transposed(const StridedMatrix& m) {
  StridedMatrix t = m;
  std::swap(t.row_stride, t.col_stride);
  return t;
}

// Vector loads and stores need the base pointer, the leading dimension and the batch stride to be multiples of
// the vector width. (Extents along a unit-stride dimension are rounded up to the vector: see batched_gemm.h.)
bool aligned(const StridedMatrix& m, Major major, int vector, int element_size) {
  if (vector == 1) return true;
  const int64_t ld = major == Major::kRow ? m.row_stride : m.col_stride;
  return reinterpret_cast<uintptr_t>(m.ptr) % (uintptr_t(vector) * element_size) == 0 && ld % vector == 0 &&
         m.batch_stride % vector == 0;
}

template <typename Family>
Status dispatch_layouts(const BatchedGemmParams& p, cudaStream_t stream) {
  const Major a = major_of(p.a), b = major_of(p.b);
  if (a == Major::kNeither || b == Major::kNeither) return Status::kInvalidArgument;
  const int size = sizeof(typename Family::ElementInput);
  if (!aligned(p.a, a, Family::kAlignment, size) || !aligned(p.b, b, Family::kAlignment, size)) {
    return Status::kMisaligned;
  }
  // The mainloop takes the partial K tile first, so when K is an operand's unit-stride dimension every later
  // vector load is aligned only if K is a multiple of the vector width.
  const bool k_contiguous = a == Major::kRow || b == Major::kColumn;
  if (k_contiguous && p.k % Family::kAlignment != 0) return Status::kMisaligned;
  const bool row_d = major_of(p.d) == Major::kRow && aligned(p.d, Major::kRow, Family::kAlignment, size);
  if (row_d) {
    if (a == Major::kRow && b == Major::kRow) return gemm::launch_batched_gemm<Family, RowMajor, RowMajor, RowMajor>(p, stream);
    if (a == Major::kRow && b == Major::kColumn) return gemm::launch_batched_gemm<Family, RowMajor, ColumnMajor, RowMajor>(p, stream);
    if (a == Major::kColumn && b == Major::kRow) return gemm::launch_batched_gemm<Family, ColumnMajor, RowMajor, RowMajor>(p, stream);
    return gemm::launch_batched_gemm<Family, ColumnMajor, ColumnMajor, RowMajor>(p, stream);
  }
  // Strided output: the Monarch output permutation (A and B column-major, as run_monarch_fwd lays them out).
  if (a == Major::kColumn && b == Major::kColumn) {
    return gemm::launch_batched_gemm<Family, ColumnMajor, ColumnMajor, Affine>(p, stream);
  }
  return Status::kMisaligned;
}

#ifdef SUBQ_WITH_SM90A
bool on_hopper() {
  int device = 0, major = 0, minor = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return false;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess) return false;
  if (cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device) != cudaSuccess) return false;
  return major == 9 && minor == 0;  // sm_90a code runs on exactly 9.0
}

bool tma_strides(const StridedMatrix& m) {
  constexpr int64_t kLimit = (int64_t{1} << 40) / 2;  // elements of 2 bytes
  for (int64_t stride : {m.row_stride, m.col_stride, m.batch_stride}) {
    if (stride < 0 || stride >= kLimit) return false;
  }
  return true;
}

// The wgmma kernels for 16-bit inputs and row-major D. kMisaligned means "not for this path": the caller then runs
// the portable kernels, which take more layouts (strided D) and alignments.
template <typename Element>
Status dispatch_sm90(const BatchedGemmParams& p, cudaStream_t stream) {
  const Major a = major_of(p.a), b = major_of(p.b);
  constexpr int kVector = 8, kSize = 2;
  if (a == Major::kNeither || b == Major::kNeither || major_of(p.d) != Major::kRow) return Status::kMisaligned;
  if (!aligned(p.a, a, kVector, kSize) || !aligned(p.b, b, kVector, kSize) || !aligned(p.d, Major::kRow, kVector, kSize)) {
    return Status::kMisaligned;
  }
  // The TMA descriptor takes strides in [0, 2^40) bytes; CUTLASS reports a rejected descriptor only by an assert
  // that NDEBUG removes, so anything else must not reach it.
  if (!tma_strides(p.a) || !tma_strides(p.b) || !tma_strides(p.d)) return Status::kMisaligned;
  if (a == Major::kRow && b == Major::kRow) return gemm::launch_batched_gemm_sm90<Element, RowMajor, RowMajor>(p, stream);
  if (a == Major::kRow) return gemm::launch_batched_gemm_sm90<Element, RowMajor, ColumnMajor>(p, stream);
  if (b == Major::kRow) return gemm::launch_batched_gemm_sm90<Element, ColumnMajor, RowMajor>(p, stream);
  return gemm::launch_batched_gemm_sm90<Element, ColumnMajor, ColumnMajor>(p, stream);
}

Status try_sm90(const BatchedGemmParams& p, cudaStream_t stream) {
  if (p.path != GemmPath::kHopperWhenAvailable || !on_hopper()) return Status::kMisaligned;
  if (p.dtype == DType::kBFloat16) return dispatch_sm90<cutlass::bfloat16_t>(p, stream);
  if (p.dtype == DType::kFloat16) return dispatch_sm90<cutlass::half_t>(p, stream);
  return Status::kMisaligned;
}
#endif

}  // namespace

Status run_batched_gemm(const BatchedGemmParams& params, cudaStream_t stream) {
  if (params.m < 0 || params.n < 0 || params.k < 1 || params.batch < 0) return Status::kInvalidArgument;
  if (params.m == 0 || params.n == 0 || params.batch == 0) return Status::kSuccess;
  BatchedGemmParams p = params;
  // A single batch has no batch stride: zero it so an arbitrary value (e.g. run_monarch_fwd's 1 when l == 1) does not
  // fail the vector-alignment checks and push an aligned GEMM onto the scalar-store kernels.
  if (p.batch == 1) p.a.batch_stride = p.b.batch_stride = p.d.batch_stride = 0;
  // A column-major D is the row-major D^T = B^T A^T: one set of kernels serves both.
  if (major_of(p.d) == Major::kColumn) {
    std::swap(p.m, p.n);
    StridedMatrix a = transposed(p.b), b = transposed(p.a);
    p.a = a;
    p.b = b;
    p.d = transposed(p.d);
  }
#ifdef SUBQ_WITH_SM90A
  const Status hopper = try_sm90(p, stream);
  if (hopper != Status::kMisaligned) return hopper;
#endif
  return SUBQ_GEMM_FAMILY_SWITCH(p.dtype, p.math, Family, [&] { return dispatch_layouts<Family>(p, stream); });
}

}  // namespace subq
