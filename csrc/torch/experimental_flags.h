// Opt-in switches for CUDA kernels that were written and compiled without a GPU: each stays off by default until
// its GPU tests have passed on one. Read on every call, so tests and benchmarks can flip them per call.
#pragma once

#include <cstdlib>
#include <cstring>

namespace subq::glue {

// True when the environment variable `name` is exactly "1".
inline bool experimental_flag(const char* name) {
  const char* flag = std::getenv(name);
  return flag != nullptr && std::strcmp(flag, "1") == 0;
}

// The Mamba-2 layer's small kernels (ssd_step, causal_conv1d fwd/bwd/update, rmsnorm_gated): one switch for the
// three ops, which a Mamba2 layer always uses together.
inline bool mamba2_layer_kernels_enabled() { return experimental_flag("SUBQ_EXPERIMENTAL_MAMBA2_KERNELS"); }

}  // namespace subq::glue
