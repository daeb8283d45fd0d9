// Status from the CUDA runtime's error, remembering the error for the caller that reports the failure:
// cudaGetLastError() returns and clears it, and the core (or CUTLASS inside it) reads it to decide the Status, so
// a later cudaGetLastError() in the caller would find cudaSuccess.
#pragma once

#include <cuda_runtime.h>

#include "common/status.h"

namespace subq {

inline thread_local cudaError_t last_cuda_error_seen = cudaSuccess;

// kSuccess for cudaSuccess, else kCudaError with `error` kept for take_last_cuda_error().
inline Status cuda_status(cudaError_t error) {
  if (error == cudaSuccess) return Status::kSuccess;
  last_cuda_error_seen = error;
  return Status::kCudaError;
}

// The status of this thread's launches since the last check (it clears the runtime's error).
inline Status launch_status() { return cuda_status(cudaGetLastError()); }

// The CUDA error behind this thread's last kCudaError, reset to cudaSuccess: cudaSuccess where the failure was not
// a runtime error (e.g. CUTLASS refusing a launch it had already checked).
inline cudaError_t take_last_cuda_error() {
  const cudaError_t error = last_cuda_error_seen;
  last_cuda_error_seen = cudaSuccess;
  return error;
}

}  // namespace subq
