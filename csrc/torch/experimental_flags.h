// Opt-in switches for CUDA kernels that were written and compiled without a GPU: each stays off by default until
// its GPU tests have passed on one. Read on every call, so tests and benchmarks can flip them per call.
// This table is the one list of them: the glue asks experimental_enabled(Experimental::k...), and Python reads the
// same rows through subq._C.experimental_kernels() (python/subq/experimental.py), so no flag is spelt twice.
#pragma once

#include <array>
#include <cstddef>
#include <cstdlib>
#include <cstring>

namespace subq::glue {

enum class Experimental { kSm90Gemm, kSsdKernels, kMamba2Kernels, kConvKernels, kFlashKernels, kGroupedGemm };

struct ExperimentalKernels {
  Experimental id;
  const char* env;         // the environment variable; on when it is exactly "1"
  const char* ops;         // the public subq.ops whose CUDA path it changes, ", "-separated
  const char* kernels;     // what runs once it is on
  const char* needs_arch;  // the SUBQ_CUDA_ARCHS entry a build needs for them (nullptr: any CUDA build)
  bool whole_op;           // true: they are the op's whole CUDA implementation, so every GPU test runs them;
                           // false: a fused path beside the default one, with GPU tests of its own
  const char* why;         // why it is still opt-in: what has to pass on a GPU first
};

inline constexpr std::array<ExperimentalKernels, 6> kExperimentalKernels{{
    {Experimental::kSm90Gemm, "SUBQ_EXPERIMENTAL_SM90_GEMM", "monarch_matmul, blockdiag_matmul",
     "CUTLASS 3 TMA + wgmma GEMMs", "90a", false,
     "written without an H100: tests/test_monarch.py::test_hopper_gemm_path has to pass on one"},
    {Experimental::kSsdKernels, "SUBQ_EXPERIMENTAL_SSD_KERNELS", "ssd_chunk_scan",
     "fused tensor-core forward and backward", nullptr, false,
     "written without a GPU: tests/test_ssd.py test_fused_cuda_* and compute-sanitizer have to pass on one"},
    // One switch for the three ops, which a Mamba2 layer always uses together.
    {Experimental::kMamba2Kernels, "SUBQ_EXPERIMENTAL_MAMBA2_KERNELS",
     "ssd_step, causal_conv1d, causal_conv1d_update, rmsnorm_gated", "CUDA kernels", nullptr, true,
     "written without a GPU: their GPU tests and compute-sanitizer have to pass on one"},
    {Experimental::kConvKernels, "SUBQ_EXPERIMENTAL_CONV_KERNELS", "monarch_conv",
     "fused Monarch-DFT forward and backward", nullptr, false,
     "written without a GPU: tests/test_monarch_conv.py test_fused_cuda_* and compute-sanitizer have to pass on one"},
    {Experimental::kFlashKernels, "SUBQ_EXPERIMENTAL_FLASH_KERNELS", "flash_chunk_attention",
     "fused tensor-core forward and backward", nullptr, false,
     "written without a GPU: tests/test_flash.py test_fused_cuda_* and compute-sanitizer have to pass on one"},
    {Experimental::kGroupedGemm, "SUBQ_EXPERIMENTAL_GROUPED_GEMM", "grouped_matmul", "CUTLASS grouped GEMM", nullptr,
     true, "written without a GPU: tests/test_grouped_matmul.py and compute-sanitizer have to pass on one"},
}};

// Rows are indexed by their id.
constexpr bool rows_in_id_order() {
  for (std::size_t i = 0; i < kExperimentalKernels.size(); ++i) {
    if (static_cast<std::size_t>(kExperimentalKernels[i].id) != i) return false;
  }
  return true;
}
static_assert(rows_in_id_order(), "kExperimentalKernels must list the Experimental ids in order");

inline bool experimental_enabled(Experimental id) {
  const char* flag = std::getenv(kExperimentalKernels[static_cast<std::size_t>(id)].env);
  return flag != nullptr && std::strcmp(flag, "1") == 0;
}

}  // namespace subq::glue
