// The glue's one way to turn a failed core Status into a torch error, with the CUDA error the core saw.
#pragma once

#include <string>

#include <c10/util/Exception.h>

#include "common/cuda_status.h"

namespace subq::glue {

inline void check_cuda_status(Status status, const std::string& what) {
  if (status == Status::kSuccess) return;
  const cudaError_t error = take_last_cuda_error();
  TORCH_CHECK(false, what, " failed: ", status_string(status),
              error != cudaSuccess ? std::string(": ") + cudaGetErrorString(error) : std::string());
}

}  // namespace subq::glue
