// Monarch products, plain C++ API (raw device pointers, sizes, strides, a CUDA stream; no framework types).
//
// Order 1, block-diagonal:  y[:, j*bo:(j+1)*bo] = x[:, j*bi:(j+1)*bi] · w[j]^T,   w: (nblocks, bo, bi).
// Order 2, Monarch y = P^T L P R x (Dao et al. 2022), per token:
//   t = R x     t[i, :] = w1[i] · x[i*p:(i+1)*p],        w1: (k, q, p),  k*p = n_in
//   u = P t     the (k*q) vector viewed as (r, l), transposed to (l, r)
//   o = L u     o[j, :] = w2[j] · u[j, :],                w2: (l, s, r),  l*r = k*q
//   y = P^T o   the (l, s) result transposed to (s, l) and flattened: y[s'*l + j] = o[j, s']
// Tensors are dense row-major except where a row stride is given. All functions return Status and never throw.
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

#include "common/dtype.h"
#include "common/status.h"
#include "gemm/batched_gemm.h"

namespace subq {

// ---- Order 1 --------------------------------------------------------------------------------------------------

struct BlockdiagParams {
  DType dtype = DType::kBFloat16;
  MathMode math = MathMode::kExact;  // float32 only
  GemmPath gemm_path = GemmPath::kPortable;  // 16-bit only: see gemm/batched_gemm.h
  int64_t tokens = 0, nblocks = 0, in_block = 0, out_block = 0;
  const void* x = nullptr;           // (tokens, nblocks*in_block), row stride x_row_stride
  int64_t x_row_stride = 0;
  const void* w = nullptr;           // (nblocks, out_block, in_block)
  void* y = nullptr;                 // (tokens, nblocks*out_block)
};

struct BlockdiagGrads {
  const void* dy = nullptr;          // (tokens, nblocks*out_block)
  void* dx = nullptr;                // (tokens, nblocks*in_block); nullptr: not wanted
  void* dw = nullptr;                // (nblocks, out_block, in_block); nullptr: not wanted
};

Status run_blockdiag_fwd(const BlockdiagParams& p, cudaStream_t stream);
Status run_blockdiag_bwd(const BlockdiagParams& p, const BlockdiagGrads& g, cudaStream_t stream);

// ---- Order 2 --------------------------------------------------------------------------------------------------

struct MonarchShape {
  int64_t tokens = 0;
  int64_t k = 0, p = 0, q = 0;       // w1: (k, q, p)
  int64_t l = 0, r = 0, s = 0;       // w2: (l, s, r)
};

// The forward saves R x feature-major, (k*q, tokens rounded up to 8): both factors then read and write it with a
// unit stride, and the permutation P is folded into the second factor's addressing instead of a transpose pass.
int64_t monarch_padded_tokens(int64_t tokens);
int64_t monarch_intermediate_elements(const MonarchShape& shape);
// Forward scratch: the second factor's output block-major, (tokens, l, s), which one transpose pass then turns into
// y. The alternative, the GEMM scattering its stores at stride l, made the forward 2-5x slower than two bmm at
// nblocks 16/64 on H100; this layout (the backward's) has not been timed yet. 0 when no pass is needed (l == 1)
// or s is not a multiple of 8 (no vector stores).
int64_t monarch_fwd_workspace_elements(const MonarchShape& shape);
// Backward scratch: the un-permuted output gradient (padded tokens, l, s), the gradient of the intermediate, and,
// when tokens is not a multiple of 8, x copied to padded tokens (the weight gradients reduce over padded tokens).
int64_t monarch_bwd_workspace_elements(const MonarchShape& shape);

struct MonarchParams {
  DType dtype = DType::kBFloat16;
  MathMode math = MathMode::kExact;  // float32 only
  GemmPath gemm_path = GemmPath::kPortable;  // 16-bit only: see gemm/batched_gemm.h
  MonarchShape shape;
  const void* x = nullptr;           // (tokens, k*p), row stride x_row_stride
  int64_t x_row_stride = 0;
  const void* w1 = nullptr;          // (k, q, p)
  const void* w2 = nullptr;          // (l, s, r)
  void* y = nullptr;                 // (tokens, l*s); written by run_monarch_fwd
  void* intermediate = nullptr;      // monarch_intermediate_elements(shape); written by fwd, read by bwd
  void* workspace = nullptr;         // monarch_fwd_workspace_elements(shape) elements, 16-byte aligned, or
                                     // nullptr: the forward then stores y directly at stride l (slower, no scratch)
};

struct MonarchGrads {
  const void* dy = nullptr;          // (tokens, l*s)
  void* dx = nullptr;                // (tokens, k*p); nullptr: not wanted
  void* dw1 = nullptr;               // (k, q, p); nullptr: not wanted
  void* dw2 = nullptr;               // (l, s, r); nullptr: not wanted
  void* workspace = nullptr;         // monarch_bwd_workspace_elements(shape) elements of the input dtype
};

Status run_monarch_fwd(const MonarchParams& p, cudaStream_t stream);
Status run_monarch_bwd(const MonarchParams& p, const MonarchGrads& g, cudaStream_t stream);

}  // namespace subq
