// Force-included into the emulator's copy of the torch glue (csrc/emu/rewrite.py points at::empty / empty_like
// there): outputs and workspaces start as NaN (floating) or -1 (integer), so an element a kernel never writes shows
// in the result (initcheck).
#pragma once

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

inline at::Tensor poisoned_empty(at::IntArrayRef size, at::TensorOptions options = {},
                                 std::optional<at::MemoryFormat> format = std::nullopt) {
  return poisoned(at::empty(size, options, format));
}

inline at::Tensor poisoned_empty_like(const at::Tensor& t, at::TensorOptions options = {},
                                      std::optional<at::MemoryFormat> format = std::nullopt) {
  return poisoned(at::empty_like(t, options, format));
}

}  // namespace subq_emu_glue
