// Runtime values turned into template parameters in one place (the idea of flash-attention's static_switch.h).
// Each switch takes the value, the name to bind, and a lambda whose body uses that name as a type or a
// compile-time constant; it returns the lambda's Status:
//
//   return SUBQ_DTYPE_SWITCH(p.dtype, T, [&] { return launch<T>(p, stream); });
//
// Every branch calls the lambda, so every instantiation is compiled; a value the switch does not take returns
// Status::kUnsupported without calling it. Host code only (the launchers), CUDA types only (no framework types).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "common/dtype.h"
#include "common/status.h"

// One case of the switches below: T = TYPE where the dtype is ENUM.
#define SUBQ_DTYPE_CASE(ENUM, TYPE, T, ...) \
  case ::subq::DType::ENUM: {               \
    using T = TYPE;                         \
    return __VA_ARGS__();                   \
  }

// T = the element type of DTYPE: float, __half or __nv_bfloat16.
#define SUBQ_DTYPE_SWITCH(DTYPE, T, ...)                         \
  [&]() -> ::subq::Status {                                      \
    switch (DTYPE) {                                             \
      SUBQ_DTYPE_CASE(kFloat32, float, T, __VA_ARGS__)           \
      SUBQ_DTYPE_CASE(kFloat16, __half, T, __VA_ARGS__)          \
      SUBQ_DTYPE_CASE(kBFloat16, __nv_bfloat16, T, __VA_ARGS__)  \
    }                                                            \
    return ::subq::Status::kUnsupported;                         \
  }()

// The same for the kernels that take 16-bit inputs only (tensor-core MMAs on half / bfloat16 operands): T is
// __half or __nv_bfloat16, and kFloat32 is kUnsupported (the caller then takes its composite path).
#define SUBQ_HALF_DTYPE_SWITCH(DTYPE, T, ...)                    \
  [&]() -> ::subq::Status {                                      \
    switch (DTYPE) {                                             \
      SUBQ_DTYPE_CASE(kFloat16, __half, T, __VA_ARGS__)          \
      SUBQ_DTYPE_CASE(kBFloat16, __nv_bfloat16, T, __VA_ARGS__)  \
      case ::subq::DType::kFloat32: break;                       \
    }                                                            \
    return ::subq::Status::kUnsupported;                         \
  }()

// A second operand type that is either float32 or the main element type T, the type DTYPE stands for (a float32
// weight or state next to 16-bit activations): S = float for kFloat32, S = T when SECOND_DTYPE == DTYPE, else
// kUnsupported. Use inside the SUBQ_DTYPE_SWITCH that binds T.
#define SUBQ_FLOAT32_OR_SAME_SWITCH(SECOND_DTYPE, DTYPE, T, S, ...) \
  [&]() -> ::subq::Status {                                      \
    if ((SECOND_DTYPE) == ::subq::DType::kFloat32) {             \
      using S = float;                                           \
      return __VA_ARGS__();                                      \
    }                                                            \
    if ((SECOND_DTYPE) != (DTYPE)) return ::subq::Status::kUnsupported; \
    using S = T;                                                 \
    return __VA_ARGS__();                                        \
  }()

// NAME = COND as a compile-time bool.
#define SUBQ_BOOL_SWITCH(COND, NAME, ...)                      \
  [&]() -> ::subq::Status {                                    \
    if (COND) {                                                \
      static constexpr bool NAME = true;                       \
      return __VA_ARGS__();                                    \
    }                                                          \
    static constexpr bool NAME = false;                        \
    return __VA_ARGS__();                                      \
  }()

// Family = the CUTLASS kernel family of the GEMMs (csrc/gemm/kernel_families.cuh, which the caller includes) for a
// dtype and math mode: TensorOpBF16, TensorOpF16, and for float32 TensorOpTF32 (MathMode::kTF32) or SimtF32
// (kExact, FFMA).
#define SUBQ_GEMM_FAMILY_SWITCH(DTYPE, MATH, Family, ...)                        \
  [&]() -> ::subq::Status {                                                      \
    switch (DTYPE) {                                                             \
      SUBQ_DTYPE_CASE(kBFloat16, ::subq::gemm::TensorOpBF16, Family, __VA_ARGS__) \
      SUBQ_DTYPE_CASE(kFloat16, ::subq::gemm::TensorOpF16, Family, __VA_ARGS__)   \
      case ::subq::DType::kFloat32: {                                            \
        if ((MATH) == ::subq::MathMode::kTF32) {                                 \
          using Family = ::subq::gemm::TensorOpTF32;                             \
          return __VA_ARGS__();                                                  \
        }                                                                        \
        using Family = ::subq::gemm::SimtF32;                                    \
        return __VA_ARGS__();                                                    \
      }                                                                          \
    }                                                                            \
    return ::subq::Status::kUnsupported;                                         \
  }()

// Returns the Status of the expression from the calling function unless it is kSuccess (variadic, so that the
// expression may hold commas, e.g. template arguments).
#define SUBQ_RETURN_IF_ERROR(...)                                      \
  do {                                                                 \
    const ::subq::Status subq_status_ = (__VA_ARGS__);                 \
    if (subq_status_ != ::subq::Status::kSuccess) return subq_status_; \
  } while (0)
