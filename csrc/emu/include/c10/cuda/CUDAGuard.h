// The CPU emulator's stand-in for c10/cuda/CUDAGuard.h: the emulated "device" is the host, so the guard is a no-op.
#pragma once

#include <c10/core/Device.h>

namespace c10::cuda {
struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
};
}  // namespace c10::cuda
