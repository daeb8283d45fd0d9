// Argument checks shared by the torch glue. The Python wrappers check first and raise ValueError with the
// public argument names; these keep direct torch.ops.subq.* callers from reaching a kernel with bad input.
#pragma once

#include <optional>
#include <string>
#include <utility>

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <c10/util/Exception.h>

namespace subq::glue {

// The four dtypes every op takes (as the Python wrappers' check_tensor): at::isFloatingType also admits the float8
// and float4 types, which the glue's dtype mapping would hand to a kernel as 16-bit elements.
inline void check_floating(const at::Tensor& t, const char* name) {
  const at::ScalarType type = t.scalar_type();
  TORCH_CHECK(type == at::kHalf || type == at::kBFloat16 || type == at::kFloat || type == at::kDouble, name,
              " must be float16, bfloat16, float32 or float64, got ", type);
}

inline void check_same(const at::Tensor& t, const at::Tensor& ref, const char* name, const char* ref_name) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), name, ".dtype (", t.scalar_type(), ") must match ", ref_name,
              ".dtype (", ref.scalar_type(), ")");
  TORCH_CHECK(t.device() == ref.device(), name, " is on ", t.device(), " but ", ref_name, " is on ", ref.device());
}

inline void check_dim(const at::Tensor& t, int64_t dim, const char* name) {
  TORCH_CHECK(t.dim() == dim, name, " must be ", dim, "-D, got shape ", t.sizes());
}

// A weight factor's sizes divide and index the features: a zero among them leaves nothing to factor (and the
// composites would divide by it).
inline void check_nonempty_dims(const at::Tensor& t, const char* name, const char* layout) {
  for (int64_t d = 0; d < t.dim(); ++d) {
    TORCH_CHECK(t.size(d) > 0, name, " ", layout, " must have every dimension at least 1, got shape ", t.sizes());
  }
}

using NamedTensor = std::pair<const at::Tensor*, const char*>;

// An optional argument as a NamedTensor: an absent one is an undefined tensor, which check_written_in_place skips.
inline NamedTensor named(const std::optional<at::Tensor>& t, const char* name) {
  static const at::Tensor undefined;
  return {t ? &*t : &undefined, name};
}

// A tensor an op updates in place (a decoding state): each element must be its own memory, or two rows would write
// one location (an expanded state), and it must share none with another argument, or the result would depend on the
// order of reads and writes. `others` may hold undefined tensors (absent optionals) and `t` itself (skipped). As in
// ATen's own in-place checks, overlaps it cannot decide cheaply (two non-dense views of one storage) pass.
inline void check_written_in_place(const at::Tensor& t, const char* name, c10::ArrayRef<NamedTensor> others) {
  TORCH_CHECK(at::has_internal_overlap(t) != at::MemOverlap::Yes, name,
              " is written in place, so its elements must not share memory (an expanded or stride-0 tensor), got "
              "strides ", t.strides());
  for (const auto& [other, other_name] : others) {
    if (other == &t || !other->defined()) continue;
    const at::MemOverlapStatus status = at::get_overlap_status(t, *other);
    TORCH_CHECK(status != at::MemOverlapStatus::Full && status != at::MemOverlapStatus::Partial, name,
                " is written in place and must not share memory with ", other_name);
  }
}

inline void check_size(const at::Tensor& t, int64_t dim, int64_t expected, const char* name, const std::string& what) {
  TORCH_CHECK(t.size(dim) == expected, name, ".shape[", dim, "] must be ", expected, " (", what, "), got shape ",
              t.sizes());
}

}  // namespace subq::glue
