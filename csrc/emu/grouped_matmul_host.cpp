// Emulator only: a stand-in for the CUTLASS grouped GEMM behind run_grouped_matmul (grouped_matmul_launch.cuh), which
// the emulator cannot run (its mainloop is inline PTX: cp.async, ldmatrix, mma.sync). It executes the problems the
// setup kernel wrote as CUTLASS would read them: D = A·B + beta·C per problem, A and B in the given layouts with
// their leading dimensions, D and C row-major, float accumulation and the same float epilogue. So the whole op runs
// end to end, and the results judge the setup kernel's problem descriptors (sizes, pointers, leading dimensions);
// they do not judge the CUTLASS kernel's numerics (no TF32 rounding, no tensor-core summation order).
// A plain host loop on the launching thread: emulated launches are synchronous, so the descriptors are final here.
// Built by csrc/emu/build.py with the kernels' sanitizers; setup.py and CMake never see csrc/emu/.
#include <cstdint>
#include <type_traits>

#include "grouped_matmul/grouped_problems.cuh"

namespace subq::grouped_matmul {
namespace {

// What CUTLASS assumes of a descriptor without checking: non-negative extents, and leading dimensions that keep a
// row (column, for column-major) from overlapping the next. C may repeat one row (ld 0, the bias broadcast).
template <typename Layout>
bool covers(int64_t ld, int rows, int columns) {
  const int contiguous = std::is_same_v<Layout, RowMajor> ? columns : rows;
  return ld >= contiguous || (std::is_same_v<Layout, RowMajor> ? rows : columns) <= 1;
}

}  // namespace

template <typename Family, typename LayoutA, typename LayoutB>
Status launch_grouped_gemm(const Problems& problems, cudaStream_t) {
  using Input = typename Family::ElementInput;
  using Output = typename Family::ElementOutput;
  const float beta = problems.add_c ? 1.0f : 0.0f;
  for (int i = 0; i < problems.count; ++i) {
    const int m = problems.sizes[i].m(), n = problems.sizes[i].n(), k = problems.sizes[i].k();
    const int64_t lda = problems.ld[kA][i], ldb = problems.ld[kB][i], ldc = problems.ld[kC][i];
    const int64_t ldd = problems.ld[kD][i];
    if (m < 0 || n < 0 || k < 0 || !covers<LayoutA>(lda, m, k) || !covers<LayoutB>(ldb, k, n) ||
        !covers<RowMajor>(ldd, m, n) || (problems.add_c && ldc != 0 && !covers<RowMajor>(ldc, m, n))) {
      ::subq_emu::report("grouped-gemm", ::subq_emu::Site{__FILE__, __LINE__},
                         "problem %d of %d: (m, n, k) = (%d, %d, %d) with ld (A, B, C, D) = (%lld, %lld, %lld, %lld)",
                         i, problems.count, m, n, k, static_cast<long long>(lda), static_cast<long long>(ldb),
                         static_cast<long long>(ldc), static_cast<long long>(ldd));
      return Status::kCudaError;
    }
    const LayoutA layout_a(lda);
    const LayoutB layout_b(ldb);
    const RowMajor layout_c(ldc), layout_d(ldd);
    const auto* a = static_cast<const Input*>(problems.ptr[kA][i]);
    const auto* b = static_cast<const Input*>(problems.ptr[kB][i]);
    const auto* c = static_cast<const Output*>(problems.ptr[kC][i]);
    auto* d = static_cast<Output*>(problems.ptr[kD][i]);
    for (int row = 0; row < m; ++row) {
      for (int col = 0; col < n; ++col) {
        float acc = 0.f;
        for (int kk = 0; kk < k; ++kk) {
          acc += static_cast<float>(a[layout_a({row, kk})]) * static_cast<float>(b[layout_b({kk, col})]);
        }
        // beta = 0: C is not read (CUTLASS's LinearCombination skips the source then).
        const float source = beta != 0.f ? static_cast<float>(c[layout_c({row, col})]) : 0.f;
        d[layout_d({row, col})] = static_cast<Output>(acc + beta * source);
      }
    }
  }
  return Status::kSuccess;
}

// Exactly the instantiations the dispatcher (grouped_matmul.cu: SUBQ_GEMM_FAMILY_SWITCH, launch_product) calls: four
// kernel families, each with the forward, input-gradient and weight-gradient operand layouts.
#define SUBQ_EMU_GROUPED_GEMM(Family, LayoutA, LayoutB) \
  template Status launch_grouped_gemm<gemm::Family, LayoutA, LayoutB>(const Problems&, cudaStream_t);
#define SUBQ_EMU_GROUPED_GEMM_FAMILY(Family)            \
  SUBQ_EMU_GROUPED_GEMM(Family, RowMajor, RowMajor)     \
  SUBQ_EMU_GROUPED_GEMM(Family, RowMajor, ColumnMajor)  \
  SUBQ_EMU_GROUPED_GEMM(Family, ColumnMajor, RowMajor)
SUBQ_EMU_GROUPED_GEMM_FAMILY(TensorOpBF16)
SUBQ_EMU_GROUPED_GEMM_FAMILY(TensorOpF16)
SUBQ_EMU_GROUPED_GEMM_FAMILY(TensorOpTF32)
SUBQ_EMU_GROUPED_GEMM_FAMILY(SimtF32)

}  // namespace subq::grouped_matmul
