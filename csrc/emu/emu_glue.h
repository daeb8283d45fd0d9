// Force-included into the emulator's copy of the torch glue (csrc/emu/rewrite.py points at::empty / empty_like
// there): outputs and workspaces start as NaN (floating) or -1 (integer), so an element a kernel never writes shows
// in the result (initcheck), and 512-byte aligned, as the CUDA caching allocator's blocks are (CPU tensors are only
// 64-byte aligned; the cores may rely on more, e.g. grouped_matmul's 256-byte aligned workspace).
#pragma once

#include <cstddef>
#include <cstdlib>
#include <limits>
#include <optional>

#include <ATen/ATen.h>

namespace subq_emu_glue {

inline at::Tensor poisoned(at::Tensor t) {
  if (t.numel() == 0) return t;
  if (at::isFloatingType(t.scalar_type())) {
    t.fill_(std::numeric_limits<double>::quiet_NaN());
  } else if (t.scalar_type() != at::kBool) {
    t.fill_(-1);
  }
  return t;
}

// A tensor with the sizes and strides of `layout` in its own allocation of exactly its bytes, 512-byte aligned
// (posix_memalign, so ASan still bounds it exactly).
inline at::Tensor device_aligned(const at::Tensor& layout) {
  constexpr std::size_t kAlign = 512;
  const std::size_t bytes = layout.storage().nbytes();
  if (bytes == 0) return layout;
  void* data = nullptr;
  TORCH_CHECK(posix_memalign(&data, kAlign, bytes) == 0, "subq-emu: cannot allocate ", bytes, " bytes");
  return at::from_blob(data, layout.sizes(), layout.strides(), [](void* p) { std::free(p); }, layout.options());
}

inline at::Tensor poisoned_empty(at::IntArrayRef size, at::TensorOptions options = {},
                                 std::optional<at::MemoryFormat> format = std::nullopt) {
  return poisoned(device_aligned(at::empty(size, options, format)));
}

inline at::Tensor poisoned_empty_like(const at::Tensor& t, at::TensorOptions options = {},
                                      std::optional<at::MemoryFormat> format = std::nullopt) {
  return poisoned(device_aligned(at::empty_like(t, options, format)));
}

}  // namespace subq_emu_glue
