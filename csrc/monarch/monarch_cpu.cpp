#include "monarch/monarch_cpu.h"

#include <algorithm>

namespace subq::composite {
namespace {

int64_t padded_tokens(int64_t tokens) { return (tokens + 7) / 8 * 8; }

// (nblocks, tokens, block) view of a (tokens, nblocks*block) matrix.
at::Tensor blocks_first(const at::Tensor& m, int64_t nblocks) {
  return m.reshape({m.size(0), nblocks, m.size(1) / nblocks}).transpose(0, 1);
}

// Block j of u = P (R x): u[j, t, m] = T[m*l + j, t] for the feature-major intermediate T.
at::Tensor permuted_blocks(const at::Tensor& intermediate, int64_t tokens, int64_t l) {
  return intermediate.narrow(1, 0, tokens).reshape({intermediate.size(0) / l, l, tokens}).permute({1, 2, 0});
}

// ATen's CPU GEMM in float16/bfloat16 pays a large fixed cost per call on strided column slices, which a batched bmm
// amortises over the blocks. Measured (bf16, 1 thread, blockdiag_fwd against one bmm): with blocks of 64 features
// or fewer the per-block calls took 1.1-10x the bmm's time, with 128 or more 0.8-0.97x. The batched backward falls
// onto a slow path from a few hundred tokens on (4-10x behind per block at 2048 tokens), so it is only taken below.
constexpr int64_t kSmallBlock = 64;
constexpr int64_t kFewTokens = 512;
bool small_16bit_blocks(const at::Tensor& x, int64_t block) {
  const at::ScalarType t = x.scalar_type();
  return (t == at::kHalf || t == at::kBFloat16) && block <= kSmallBlock;
}

}  // namespace

// On the CPU the block-diagonal products run one GEMM per block, reading and writing column slices of the
// (tokens, features) matrices in place (BLAS takes their row stride as the leading dimension). The batched form
// would leave a (nblocks, tokens, block) result to transpose and copy, which in M2-BERT's GLU cost as much time as
// the products. The CUDA fallback keeps one batched launch, and so do small 16-bit blocks (small_16bit_blocks above).
at::Tensor blockdiag_fwd(const at::Tensor& x, const at::Tensor& w) {
  const int64_t nblocks = w.size(0), bo = w.size(1), bi = w.size(2);
  if (!x.is_cpu() || small_16bit_blocks(x, std::max(bo, bi))) {
    return at::bmm(blocks_first(x, nblocks), w.transpose(1, 2)).transpose(0, 1).reshape({x.size(0), nblocks * bo});
  }
  at::Tensor y = at::empty({x.size(0), nblocks * bo}, x.options());
  for (int64_t j = 0; j < nblocks; ++j) {
    at::Tensor y_j = y.narrow(1, j * bo, bo);
    at::mm_out(y_j, x.narrow(1, j * bi, bi), w[j].t());
  }
  return y;
}

std::tuple<at::Tensor, at::Tensor> blockdiag_bwd(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& w,
                                                 std::array<bool, 2> output_mask) {
  const int64_t nblocks = w.size(0), bo = w.size(1), bi = w.size(2);
  if (!x.is_cpu() || (small_16bit_blocks(x, std::max(bo, bi)) && x.size(0) <= kFewTokens)) {
    const at::Tensor dy_b = blocks_first(dy, nblocks);
    at::Tensor dx = output_mask[0] ? at::bmm(dy_b, w).transpose(0, 1).reshape(x.sizes()) : x.new_empty({0});
    at::Tensor dw = output_mask[1] ? at::bmm(dy_b.transpose(1, 2), blocks_first(x, nblocks)) : x.new_empty({0});
    return {dx, dw};
  }
  at::Tensor dx = output_mask[0] ? at::empty(x.sizes(), x.options()) : x.new_empty({0});
  at::Tensor dw = output_mask[1] ? at::empty(w.sizes(), w.options()) : x.new_empty({0});
  for (int64_t j = 0; j < nblocks; ++j) {
    const at::Tensor dy_j = dy.narrow(1, j * bo, bo);
    if (output_mask[0]) {
      at::Tensor dx_j = dx.narrow(1, j * bi, bi);
      at::mm_out(dx_j, dy_j, w[j]);
    }
    if (output_mask[1]) {
      at::Tensor dw_j = dw[j];
      at::mm_out(dw_j, dy_j.t(), x.narrow(1, j * bi, bi));
    }
  }
  return {dx, dw};
}

// Order 2 on the CPU: one GEMM per block, each reading and writing row or column slices of the feature-major
// intermediate in place, so every operand BLAS sees has unit stride in one dimension. The batched form reads block j
// of P R x as a (tokens, r) matrix with row stride 1 and column stride l*tokens, which ATen's CPU bf16 bmm takes on a
// slow elementwise path (2-13x behind HazyResearch m2's two-bmm), and needs a transposing copy into the intermediate
// as well. Here the forward copies only the output (an (l, s) -> (s, l) transpose per token, as two-bmm does) and the
// backward only dy (its inverse); two-bmm copies twice each way. Other devices keep the batched calls.
namespace {

// Rows m*l + j (m = 0..r-1) of a feature-major (k*q, ld) matrix, first `tokens` columns: block j of P R x, transposed.
at::Tensor permuted_block_t(const at::Tensor& feature_major, int64_t tokens, int64_t l, int64_t j) {
  const int64_t r = feature_major.size(0) / l;
  return feature_major.reshape({r, l, feature_major.size(1)}).select(1, j).narrow(1, 0, tokens);  // (r, tokens)
}

// float16 has no fast CPU GEMM for strided slices (ATen's fallback is 3-9x behind its batched one), so it runs
// HazyResearch m2's two-bmm formulation, every bmm on operands with a unit inner stride, plus one copy each way
// between its (l, tokens, r) layout of P R x and the feature-major intermediate.
bool use_two_bmm(const at::Tensor& x) { return x.scalar_type() == at::kHalf; }

// u[j, t, m] = T[m*l + j, t]: the feature-major intermediate as m2's contiguous (l, tokens, r) tensor.
at::Tensor two_bmm_layout(const at::Tensor& intermediate, int64_t tokens, int64_t l) {
  return permuted_blocks(intermediate, tokens, l).contiguous();
}

std::tuple<at::Tensor, at::Tensor> monarch_fwd_two_bmm(const at::Tensor& x, const at::Tensor& w1,
                                                       const at::Tensor& w2) {
  const int64_t tokens = x.size(0), k = w1.size(0), q = w1.size(1);
  const int64_t l = w2.size(0), s = w2.size(1), r = w2.size(2);
  at::Tensor t = at::empty({tokens, k, q}, x.options());  // R x, token-major
  at::Tensor t_blocks = t.transpose(0, 1);
  at::bmm_out(t_blocks, blocks_first(x, k), w1.transpose(1, 2));
  const at::Tensor u = t.view({tokens, r, l}).permute({2, 0, 1}).contiguous();  // (l, tokens, r)
  at::Tensor o = at::empty({tokens, l, s}, x.options());
  at::Tensor o_blocks = o.transpose(0, 1);
  at::bmm_out(o_blocks, u, w2.transpose(1, 2));
  const int64_t padded = padded_tokens(tokens);
  at::Tensor intermediate = at::empty({k * q, padded}, x.options());
  if (padded > tokens) intermediate.narrow(1, tokens, padded - tokens).zero_();
  intermediate.view({r, l, padded}).narrow(2, 0, tokens).copy_(u.permute({2, 0, 1}));
  return {o.transpose(1, 2).reshape({tokens, s * l}), intermediate};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> monarch_bwd_two_bmm(const at::Tensor& dy, const at::Tensor& x,
                                                                   const at::Tensor& intermediate,
                                                                   const at::Tensor& w1, const at::Tensor& w2,
                                                                   std::array<bool, 3> output_mask) {
  const int64_t tokens = x.size(0), k = w1.size(0), q = w1.size(1), p = w1.size(2);
  const int64_t l = w2.size(0), s = w2.size(1), r = w2.size(2);
  const at::Tensor d_out = dy.reshape({tokens, s, l}).transpose(1, 2).contiguous().transpose(0, 1);  // (l, tokens, s)
  at::Tensor dx = x.new_empty({0}), dw1 = x.new_empty({0}), dw2 = x.new_empty({0});
  if (output_mask[2]) dw2 = at::bmm(d_out.transpose(1, 2), two_bmm_layout(intermediate, tokens, l));
  if (!(output_mask[0] || output_mask[1])) return {dx, dw1, dw2};
  at::Tensor du = at::empty({tokens, l, r}, x.options());
  at::Tensor du_blocks = du.transpose(0, 1);
  at::bmm_out(du_blocks, d_out, w2);
  const at::Tensor dt = du.transpose(1, 2).contiguous().reshape({tokens, k, q}).transpose(0, 1);  // (k, tokens, q)
  if (output_mask[0]) {
    dx = at::empty({tokens, k, p}, x.options());
    at::Tensor dx_blocks = dx.transpose(0, 1);
    at::bmm_out(dx_blocks, dt, w1);
    dx = dx.view({tokens, k * p});
  }
  if (output_mask[1]) dw1 = at::bmm(dt.transpose(1, 2), blocks_first(x, k));
  return {dx, dw1, dw2};
}

std::tuple<at::Tensor, at::Tensor> monarch_fwd_cpu(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& w2) {
  if (use_two_bmm(x)) return monarch_fwd_two_bmm(x, w1, w2);
  const int64_t tokens = x.size(0), k = w1.size(0), q = w1.size(1), p = w1.size(2);
  const int64_t l = w2.size(0), s = w2.size(1);
  const int64_t padded = padded_tokens(tokens);
  at::Tensor intermediate = at::empty({k * q, padded}, x.options());
  if (padded > tokens) intermediate.narrow(1, tokens, padded - tokens).zero_();
  for (int64_t i = 0; i < k; ++i) {  // rows i*q.. of the intermediate: w1[i] @ x_i^T
    at::Tensor t_i = intermediate.narrow(0, i * q, q).narrow(1, 0, tokens);
    at::mm_out(t_i, w1[i], x.narrow(1, i * p, p).t());
  }
  at::Tensor o = at::empty({tokens, l, s}, x.options());  // o[t, j, :] = w2[j] @ u_j[t, :]
  for (int64_t j = 0; j < l; ++j) {
    at::Tensor o_j = o.select(1, j);
    at::mm_out(o_j, permuted_block_t(intermediate, tokens, l, j).t(), w2[j].t());
  }
  return {o.transpose(1, 2).reshape({tokens, s * l}), intermediate};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> monarch_bwd_cpu(const at::Tensor& dy, const at::Tensor& x,
                                                               const at::Tensor& intermediate, const at::Tensor& w1,
                                                               const at::Tensor& w2, std::array<bool, 3> output_mask) {
  if (use_two_bmm(x)) return monarch_bwd_two_bmm(dy, x, intermediate, w1, w2, output_mask);
  const int64_t tokens = x.size(0), k = w1.size(0), q = w1.size(1), p = w1.size(2);
  const int64_t l = w2.size(0), s = w2.size(1);
  // d_out[t, j, :] = dy[t, s'*l + j]: block j of the output gradient with unit stride along s'.
  at::Tensor d_out = at::empty({tokens, l, s}, x.options());
  d_out.copy_(dy.reshape({tokens, s, l}).transpose(1, 2));
  at::Tensor dx = x.new_empty({0}), dw1 = x.new_empty({0}), dw2 = x.new_empty({0});
  if (output_mask[2]) {
    dw2 = at::empty(w2.sizes(), x.options());
    for (int64_t j = 0; j < l; ++j) {
      at::Tensor dw2_j = dw2[j];
      at::mm_out(dw2_j, d_out.select(1, j).t(), permuted_block_t(intermediate, tokens, l, j).t());
    }
  }
  if (!(output_mask[0] || output_mask[1])) return {dx, dw1, dw2};
  // The intermediate's gradient, feature-major like the intermediate: its rows i*q.. are block i's dt^T.
  at::Tensor d_intermediate = at::empty({k * q, tokens}, x.options());
  for (int64_t j = 0; j < l; ++j) {
    at::Tensor du_j = permuted_block_t(d_intermediate, tokens, l, j);
    at::mm_out(du_j, w2[j].t(), d_out.select(1, j).t());
  }
  if (output_mask[0]) dx = at::empty(x.sizes(), x.options());
  if (output_mask[1]) dw1 = at::empty(w1.sizes(), x.options());
  for (int64_t i = 0; i < k; ++i) {
    const at::Tensor dt_i = d_intermediate.narrow(0, i * q, q);  // (q, tokens)
    if (output_mask[0]) {
      at::Tensor dx_i = dx.narrow(1, i * p, p);
      at::mm_out(dx_i, dt_i.t(), w1[i]);
    }
    if (output_mask[1]) {
      at::Tensor dw1_i = dw1[i];
      at::mm_out(dw1_i, dt_i, x.narrow(1, i * p, p));
    }
  }
  return {dx, dw1, dw2};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> monarch_fwd(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& w2) {
  if (x.is_cpu()) return monarch_fwd_cpu(x, w1, w2);
  const int64_t tokens = x.size(0), k = w1.size(0), q = w1.size(1), l = w2.size(0);
  const at::Tensor t = at::bmm(blocks_first(x, k), w1.transpose(1, 2));  // (k, tokens, q)
  at::Tensor intermediate = at::zeros({k * q, padded_tokens(tokens)}, x.options());
  intermediate.narrow(1, 0, tokens).copy_(t.permute({0, 2, 1}).reshape({k * q, tokens}));
  const at::Tensor o = at::bmm(permuted_blocks(intermediate, tokens, l), w2.transpose(1, 2));  // (l, tokens, s)
  return {o.permute({1, 2, 0}).reshape({tokens, l * w2.size(1)}), intermediate};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> monarch_bwd(const at::Tensor& dy, const at::Tensor& x,
                                                           const at::Tensor& intermediate, const at::Tensor& w1,
                                                           const at::Tensor& w2, std::array<bool, 3> output_mask) {
  if (x.is_cpu()) return monarch_bwd_cpu(dy, x, intermediate, w1, w2, output_mask);
  const int64_t tokens = x.size(0), k = w1.size(0), l = w2.size(0), s = w2.size(1);
  const at::Tensor d_out = dy.reshape({tokens, s, l}).permute({2, 0, 1});  // dO[j, t, s'] = dy[t, s'*l + j]
  at::Tensor dw2 = output_mask[2] ? at::bmm(d_out.transpose(1, 2), permuted_blocks(intermediate, tokens, l))
                                  : x.new_empty({0});
  at::Tensor dx = x.new_empty({0}), dw1 = x.new_empty({0});
  if (output_mask[0] || output_mask[1]) {
    const at::Tensor du = at::bmm(d_out, w2);                                            // (l, tokens, r)
    const at::Tensor dt = blocks_first(du.permute({1, 2, 0}).reshape({tokens, k * w1.size(1)}), k);  // (k, tokens, q)
    if (output_mask[0]) dx = at::bmm(dt, w1).transpose(0, 1).reshape(x.sizes());
    if (output_mask[1]) dw1 = at::bmm(dt.transpose(1, 2), blocks_first(x, k));
  }
  return {dx, dw1, dw2};
}

}  // namespace subq::composite
