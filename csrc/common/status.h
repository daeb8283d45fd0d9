// Status codes returned by every plain C++ API entry point: the API never throws, so callers in other
// frameworks can map them onto their own error handling.
#pragma once

namespace subq {

enum class Status {
  kSuccess = 0,
  kInvalidArgument,     // a size, stride or pointer the kernels cannot take (see the function's comment)
  kMisaligned,          // pointers or strides not multiples of the vector width the kernel loads
  kUnsupported,         // a dtype / math-mode combination not built
  kCudaError,           // a launch or runtime call failed; cudaGetLastError() holds the cause
};

inline const char* status_string(Status s) {
  switch (s) {
    case Status::kSuccess: return "success";
    case Status::kInvalidArgument: return "invalid argument";
    case Status::kMisaligned: return "misaligned pointer or stride";
    case Status::kUnsupported: return "unsupported dtype or math mode";
    case Status::kCudaError: return "CUDA error";
  }
  return "unknown status";
}

}  // namespace subq
