// Monarch products as sequences of strided batched GEMMs (gemm/batched_gemm.h). Each GEMM below is written in the
// paper's indices; the strides are where the permutations live.
#include "monarch/monarch.h"

#include "common/cuda_status.h"
#include "common/dispatch.h"
#include "gemm/batched_gemm.h"
#include "monarch/monarch_permute.cuh"

namespace subq {
namespace {

// A (rows, cols) matrix inside a batch: element (i, j) of batch g at ptr + g*batch + i*row + j*col.
StridedMatrix mat(const void* ptr, int64_t row, int64_t col, int64_t batch) {
  return StridedMatrix{const_cast<void*>(ptr), row, col, batch};
}

Status gemm(DType dtype, MathMode math, GemmPath path, int64_t m, int64_t n, int64_t k, int64_t batch, StridedMatrix a,
            StridedMatrix b, StridedMatrix d, cudaStream_t stream) {
  BatchedGemmParams params;
  params.dtype = dtype;
  params.math = math;
  params.path = path;
  params.m = m;
  params.n = n;
  params.k = k;
  params.batch = batch;
  params.a = a;
  params.b = b;
  params.d = d;
  return run_batched_gemm(params, stream);
}


char* offset(void* ptr, int64_t elements, DType dtype) {
  return static_cast<char*>(ptr) + elements * dtype_size(dtype);
}

// Zero the columns [tokens, padded) of a feature-major (features, padded) buffer: the GEMMs' vector loads along
// tokens read them, and they must contribute nothing to reductions over tokens.
Status zero_token_padding(void* buffer, int64_t features, int64_t tokens, DType dtype, cudaStream_t stream) {
  const int64_t padded = monarch_padded_tokens(tokens);
  if (padded == tokens || features == 0) return Status::kSuccess;
  const size_t esize = dtype_size(dtype);
  return cuda_status(cudaMemset2DAsync(offset(buffer, tokens, dtype), padded * esize, 0, (padded - tokens) * esize,
                                     features, stream));
}

bool valid(const MonarchShape& s) {
  return s.tokens >= 0 && s.k > 0 && s.p > 0 && s.q > 0 && s.l > 0 && s.r > 0 && s.s > 0 && s.k * s.q == s.l * s.r;
}

}  // namespace

// ---- Order 1 --------------------------------------------------------------------------------------------------

Status run_blockdiag_fwd(const BlockdiagParams& p, cudaStream_t stream) {
  if (p.tokens < 0 || p.nblocks < 1 || p.in_block < 1 || p.out_block < 1) return Status::kInvalidArgument;
  const int64_t n_out = p.nblocks * p.out_block;
  // y_j (t, o) = sum_i x_j(t, i) w_j(o, i)
  return gemm(p.dtype, p.math, p.gemm_path, p.tokens, p.out_block, p.in_block, p.nblocks,
              mat(p.x, p.x_row_stride, 1, p.in_block),
              mat(p.w, 1, p.in_block, p.out_block * p.in_block),
              mat(p.y, n_out, 1, p.out_block), stream);
}

Status run_blockdiag_bwd(const BlockdiagParams& p, const BlockdiagGrads& g, cudaStream_t stream) {
  if (p.tokens < 0 || p.nblocks < 1 || p.in_block < 1 || p.out_block < 1) return Status::kInvalidArgument;
  const int64_t n_in = p.nblocks * p.in_block, n_out = p.nblocks * p.out_block;
  if (g.dx) {  // dx_j (t, i) = sum_o dy_j(t, o) w_j(o, i)
    SUBQ_RETURN_IF_ERROR(gemm(p.dtype, p.math, p.gemm_path, p.tokens, p.in_block, p.out_block, p.nblocks,
                              mat(g.dy, n_out, 1, p.out_block),
                              mat(p.w, p.in_block, 1, p.out_block * p.in_block),
                              mat(g.dx, n_in, 1, p.in_block), stream));
  }
  if (g.dw) {  // dw_j (o, i) = sum_t dy_j(t, o) x_j(t, i)
    if (p.tokens == 0) {
      return cuda_status(cudaMemsetAsync(g.dw, 0, p.nblocks * p.out_block * p.in_block * dtype_size(p.dtype), stream));
    }
    SUBQ_RETURN_IF_ERROR(gemm(p.dtype, p.math, p.gemm_path, p.out_block, p.in_block, p.tokens, p.nblocks,
                              mat(g.dy, 1, n_out, p.out_block),
                              mat(p.x, p.x_row_stride, 1, p.in_block),
                              mat(g.dw, p.in_block, 1, p.out_block * p.in_block), stream));
  }
  return Status::kSuccess;
}

// ---- Order 2 --------------------------------------------------------------------------------------------------

int64_t monarch_padded_tokens(int64_t tokens) { return (tokens + 7) / 8 * 8; }

int64_t monarch_intermediate_elements(const MonarchShape& s) { return s.k * s.q * monarch_padded_tokens(s.tokens); }

int64_t monarch_fwd_workspace_elements(const MonarchShape& s) {
  return s.l > 1 && s.s % 8 == 0 ? s.tokens * s.l * s.s : 0;
}

int64_t monarch_bwd_workspace_elements(const MonarchShape& s) {
  const int64_t padded = monarch_padded_tokens(s.tokens);
  const int64_t x_copy = padded == s.tokens ? 0 : padded * s.k * s.p;
  return padded * s.l * s.s + monarch_intermediate_elements(s) + x_copy;
}

// Feature-major intermediate: T[f][t] = (R x)[t, f] with f = i*q + c and ld = padded tokens. Block j of u = P t is
// u_j(t, m) = T[m*l + j][t]: column-major with leading dimension l*padded and batch stride padded.
Status run_monarch_fwd(const MonarchParams& p, cudaStream_t stream) {
  const MonarchShape& s = p.shape;
  if (!valid(s)) return Status::kInvalidArgument;
  if (s.tokens == 0) return Status::kSuccess;
  const int64_t padded = monarch_padded_tokens(s.tokens);
  SUBQ_RETURN_IF_ERROR(zero_token_padding(p.intermediate, s.k * s.q, s.tokens, p.dtype, stream));
  // t_i (t, c) = sum_pp x_i(t, pp) w1_i(c, pp), stored transposed
  SUBQ_RETURN_IF_ERROR(gemm(p.dtype, p.math, p.gemm_path, s.tokens, s.q, s.p, s.k,
                            mat(p.x, p.x_row_stride, 1, s.p),
                            mat(p.w1, 1, s.p, s.q * s.p),
                            mat(p.intermediate, 1, padded, s.q * padded), stream));
  // o_j(t, s') = sum_m u_j(t, m) w2_j(s', m), and y(t, s'*l + j) = o_j(t, s') applies P^T. With scratch, o is stored
  // block-major (tokens, l, s) with vector stores and transposed within each token row; without, the GEMM writes y
  // directly at strides (l*s, l), batch stride 1.
  const bool block_major = p.workspace != nullptr && reinterpret_cast<uintptr_t>(p.workspace) % 16 == 0 &&
                           monarch_fwd_workspace_elements(s) > 0;
  if (block_major) {
    SUBQ_RETURN_IF_ERROR(gemm(p.dtype, p.math, p.gemm_path, s.tokens, s.s, s.r, s.l,
                              mat(p.intermediate, 1, s.l * padded, padded),
                              mat(p.w2, 1, s.r, s.s * s.r),
                              mat(p.workspace, s.l * s.s, 1, s.s), stream));
    return cuda_status(transpose_within_rows(p.workspace, p.y, s.tokens, s.s, s.l, int(dtype_size(p.dtype)), stream));
  }
  return gemm(p.dtype, p.math, p.gemm_path, s.tokens, s.s, s.r, s.l,
              mat(p.intermediate, 1, s.l * padded, padded),
              mat(p.w2, 1, s.r, s.s * s.r),
              mat(p.y, s.l * s.s, s.l, 1), stream);
}

Status run_monarch_bwd(const MonarchParams& p, const MonarchGrads& g, cudaStream_t stream) {
  const MonarchShape& s = p.shape;
  if (!valid(s)) return Status::kInvalidArgument;
  const size_t esize = dtype_size(p.dtype);
  if (s.tokens == 0) {
    if (g.dw1) SUBQ_RETURN_IF_ERROR(cuda_status(cudaMemsetAsync(g.dw1, 0, s.k * s.q * s.p * esize, stream)));
    if (g.dw2) SUBQ_RETURN_IF_ERROR(cuda_status(cudaMemsetAsync(g.dw2, 0, s.l * s.s * s.r * esize, stream)));
    return Status::kSuccess;
  }
  const int64_t padded = monarch_padded_tokens(s.tokens);
  const int64_t n_in = s.k * s.p, n_out = s.l * s.s;
  // dO_j (t, s') = dy(t, s'*l + j), token-major (padded, l, s): the cp.async loads of 16-bit types cannot gather at
  // stride l, so the output gradient is un-permuted once here and read with unit stride by the GEMMs below.
  // The weight gradients reduce over tokens, which the feature-major operands hold contiguously: they run over
  // padded tokens (zero rows) so that K is a multiple of the vector width.
  void* d_out = g.workspace;
  void* d_inter = offset(d_out, padded * n_out, p.dtype);
  SUBQ_RETURN_IF_ERROR(cuda_status(transpose_within_rows(g.dy, d_out, s.tokens, s.l, s.s, int(esize), stream)));
  SUBQ_RETURN_IF_ERROR(cuda_status(
      cudaMemsetAsync(offset(d_out, s.tokens * n_out, p.dtype), 0, (padded - s.tokens) * n_out * esize, stream)));

  if (g.dw2) {  // dw2_j (s', m) = sum_t dO_j(t, s') u_j(t, m)
    SUBQ_RETURN_IF_ERROR(gemm(p.dtype, p.math, p.gemm_path, s.s, s.r, padded, s.l,
                              mat(d_out, 1, s.l * s.s, s.s),
                              mat(p.intermediate, 1, s.l * padded, padded),
                              mat(g.dw2, s.r, 1, s.s * s.r), stream));
  }
  if (!g.dx && !g.dw1) return Status::kSuccess;
  // du_j (t, m) = sum_s' dO_j(t, s') w2_j(s', m), stored feature-major like the forward intermediate, which
  // applies P^T for free: dT[m*l + j][t].
  SUBQ_RETURN_IF_ERROR(zero_token_padding(d_inter, s.k * s.q, s.tokens, p.dtype, stream));
  SUBQ_RETURN_IF_ERROR(gemm(p.dtype, p.math, p.gemm_path, s.tokens, s.r, s.s, s.l,
                            mat(d_out, s.l * s.s, 1, s.s),
                            mat(p.w2, s.r, 1, s.s * s.r),
                            mat(d_inter, 1, s.l * padded, padded), stream));
  if (g.dx) {  // dx_i (t, pp) = sum_c dT_i(t, c) w1_i(c, pp)
    SUBQ_RETURN_IF_ERROR(gemm(p.dtype, p.math, p.gemm_path, s.tokens, s.p, s.q, s.k,
                              mat(d_inter, 1, padded, s.q * padded),
                              mat(p.w1, s.p, 1, s.q * s.p),
                              mat(g.dx, s.k * s.p, 1, s.p), stream));
  }
  if (g.dw1) {  // dw1_i (c, pp) = sum_t dT_i(t, c) x_i(t, pp)
    const void* x = p.x;
    int64_t x_row_stride = p.x_row_stride;
    if (padded != s.tokens) {
      void* x_padded = offset(d_inter, monarch_intermediate_elements(s), p.dtype);
      SUBQ_RETURN_IF_ERROR(cuda_status(cudaMemcpy2DAsync(x_padded, n_in * esize, p.x, p.x_row_stride * esize,
                                                       n_in * esize, s.tokens, cudaMemcpyDeviceToDevice, stream)));
      SUBQ_RETURN_IF_ERROR(cuda_status(cudaMemsetAsync(offset(x_padded, s.tokens * n_in, p.dtype), 0,
                                                     (padded - s.tokens) * n_in * esize, stream)));
      x = x_padded;
      x_row_stride = n_in;
    }
    SUBQ_RETURN_IF_ERROR(gemm(p.dtype, p.math, p.gemm_path, s.q, s.p, padded, s.k,
                              mat(d_inter, padded, 1, s.q * padded),
                              mat(x, x_row_stride, 1, s.p),
                              mat(g.dw1, s.p, 1, s.q * s.p), stream));
  }
  return Status::kSuccess;
}

}  // namespace subq
