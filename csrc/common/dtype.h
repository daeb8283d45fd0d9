// Element types and math modes of the plain C++ API (no framework types).
#pragma once

namespace subq {

enum class DType { kFloat32, kFloat16, kBFloat16 };

// How float32 products are formed. kExact: IEEE fp32 fused multiply-add (SIMT cores);
// kTF32: tensor cores on TF32-rounded operands with fp32 accumulation.
enum class MathMode { kExact, kTF32 };

inline int dtype_size(DType dtype) { return dtype == DType::kFloat32 ? 4 : 2; }

}  // namespace subq
