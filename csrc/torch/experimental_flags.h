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

}  // namespace subq::glue
