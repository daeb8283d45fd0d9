#include "flash/flash_cpu.h"

#include <algorithm>

namespace subq::composite {
namespace {

using at::Tensor;

// Keys per tile of gau_attention: the scores of one tile are (b, L, keys) in the compute dtype, so this bounds the
// extra memory at L x 256 per batch row while keeping each matmul large enough to run near peak on a CPU. Causal
// tiles stay at 256 keys (their diagonal square is formed as a triangle, whose cost grows with the tile).
// Bidirectional tiles grow up to kScoreElements scores: every tile adds its part into the whole output, so fewer,
// larger tiles save passes over it (the plain formulation's L x L matrix is one tile).
constexpr int64_t kKeyTile = 256;
constexpr int64_t kScoreElements = int64_t{1} << 24;

int64_t keys_per_tile(int64_t batch, int64_t L, bool causal) {
  if (causal) return kKeyTile;
  return std::max(kKeyTile, kScoreElements / std::max<int64_t>(batch * L, 1));
}

at::ScalarType compute_type(const Tensor& t) { return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

Tensor empty_grad(const Tensor& like) { return like.new_empty({0}); }

Tensor grad_as(const std::optional<Tensor>& input, const Tensor& grad, const Tensor& like) {
  return input ? grad.to(input->scalar_type()) : empty_grad(like);
}

// (b, L, D) -> (b, G, C, D) in the compute dtype, zero-padded to whole chunks. Read-only: when L is whole chunks it
// is a view of t itself (no copy), else only the padding rows are zeroed before t is copied in.
Tensor to_chunks(const Tensor& t, int64_t nchunks, int64_t C, at::ScalarType ct) {
  const int64_t b = t.size(0), L = t.size(1), D = t.size(2);
  if (nchunks * C == L) return t.to(ct).reshape({b, nchunks, C, D});
  Tensor padded = at::empty({b, nchunks * C, D}, t.options().dtype(ct));
  padded.narrow(1, L, nchunks * C - L).zero_();
  padded.narrow(1, 0, L).copy_(t);
  return padded.view({b, nchunks, C, D});
}

// Exclusive prefix sum over chunks (dim 1) of x (b, G, S, E): chunk g gets the sum of chunks 0..g-1. reverse: the
// sum of chunks g+1..G-1 instead.
Tensor exclusive_chunk_cumsum(const Tensor& x, bool reverse) {
  const int64_t G = x.size(1);
  Tensor out = at::empty_like(x);
  out.narrow(1, reverse ? G - 1 : 0, 1).zero_();
  if (G > 1) {
    if (reverse) {
      out.narrow(1, 0, G - 1).copy_(x.narrow(1, 1, G - 1).flip(1).cumsum(1).flip(1));
    } else {
      Tensor tail = out.narrow(1, 1, G - 1);
      at::cumsum_out(tail, x.narrow(1, 0, G - 1), 1);
    }
  }
  return out;
}

// (b, G, C, D) -> (b, L, D)
Tensor from_chunks(const Tensor& t, int64_t seqlen) {
  return t.reshape({t.size(0), t.size(1) * t.size(2), t.size(3)}).narrow(1, 0, seqlen);
}

// The (rows, cols) index into a relative-position bias for queries q0.. and keys k0..: (k0 + j) - (q0 + i) + center.
Tensor bias_index(int64_t q0, int64_t rows, int64_t k0, int64_t cols, int64_t center, const at::TensorOptions& o) {
  Tensor i = at::arange(q0, q0 + rows, o.dtype(at::kLong)).view({rows, 1});
  Tensor j = at::arange(k0, k0 + cols, o.dtype(at::kLong)).view({1, cols});
  return j - i + center;
}

// ---- flash_chunk_attention ---------------------------------------------------------------------------------------

// Everything the forward computes that the backward reuses, chunked and in the compute dtype.
struct Chunked {
  int64_t batch = 0, seqlen = 0, nchunks = 0, C = 0;
  at::ScalarType ct = at::kFloat;
  Tensor q_quad, k_quad, q_lin, k_lin, v;  // (b, G, C, S|E)
  Tensor relu_scores;  // (b, G, C, C): relu(quad_scale q.k + bias), zero where masked; the kernel is its square
  Tensor lin_state;    // the k_lin^T v state chunk g reads: (b, G, S, E) exclusive prefix over chunks (causal),
                       // (b, 1, S, E) the total (bidirectional)
};

// (b, G, C, X) -> (b, G * C, X)
Tensor unchunked(const Tensor& t) { return t.reshape({t.size(0), t.size(1) * t.size(2), t.size(3)}); }

// x_g @ state_g for chunked rows x (b, G, C, X) and a per-chunk (b, G, X, Y) or shared (b, 1, X, Y) state. A shared
// state takes one (b, G*C, X) x (X, Y) matmul per batch row instead of broadcasting it to every chunk.
Tensor times_state(const Tensor& x, const Tensor& state) {
  if (state.size(1) > 1) return at::matmul(x, state);
  return at::matmul(unchunked(x), state.squeeze(1)).view({x.size(0), x.size(1), x.size(2), state.size(-1)});
}

Chunked chunk_scores(const FlashChunkInputs& in, const FlashChunkOptions& opt) {
  Chunked k;
  k.batch = in.v.size(0);
  k.seqlen = in.v.size(1);
  k.C = opt.chunk_size;
  k.nchunks = (k.seqlen + k.C - 1) / k.C;
  k.ct = compute_type(in.v);
  const int64_t G = k.nchunks, C = k.C;
  k.q_quad = to_chunks(in.q_quad, G, C, k.ct);
  k.k_quad = to_chunks(in.k_quad, G, C, k.ct);
  k.q_lin = to_chunks(in.q_lin, G, C, k.ct);
  k.k_lin = to_chunks(in.k_lin, G, C, k.ct);
  k.v = to_chunks(in.v, G, C, k.ct);

  Tensor scores = at::matmul(k.q_quad, k.k_quad.transpose(-1, -2)).mul_(opt.quad_scale);
  const auto opts = in.v.options();
  if (in.rel_bias) {
    Tensor index = bias_index(0, C, 0, C, C - 1, opts);
    scores.add_(in.rel_bias->to(k.ct).index_select(0, index.flatten()).view({C, C}));
  }
  // Keys past L are masked explicitly: a padded key has q.k = 0 but relu(0 + bias)² need not be 0.
  Tensor key_pos = at::arange(G * C, opts.dtype(at::kLong)).view({G, 1, C});
  Tensor mask = key_pos.lt(k.seqlen);
  if (opt.causal) mask = mask.logical_and(at::ones({C, C}, opts.dtype(at::kBool)).tril());
  k.relu_scores = at::relu(scores).mul_(mask);

  // Padded positions have k_lin = v = 0, so they add nothing to any state.
  if (opt.causal) {
    // (b, G, S, E): each chunk's own k_lin^T v, then the sum over the chunks before it
    k.lin_state = exclusive_chunk_cumsum(at::matmul(k.k_lin.transpose(-1, -2), k.v), /*reverse=*/false);
  } else {
    k.lin_state = at::matmul(unchunked(k.k_lin).transpose(1, 2), unchunked(k.v)).unsqueeze(1);
  }
  return k;
}

// quad + lin, before the gate: (b, G, C, E).
Tensor ungated_output(const Chunked& k, const FlashChunkOptions& opt) {
  Tensor quad = at::matmul(k.relu_scores.square(), k.v);
  return quad.add_(times_state(k.q_lin, k.lin_state), opt.lin_scale);
}

// ---- gau_attention ----------------------------------------------------------------------------------------------

// One key tile [k0, k0 + kt): the queries that can see it (all, or from k0 on when causal) and their relu'd scores.
struct KeyTile {
  int64_t q0 = 0, rows = 0, k0 = 0, cols = 0;
  bool causal = false;  // then the first cols rows are the diagonal square, where query i sees keys j <= i only
  Tensor index;         // (rows, cols) into rel_bias; undefined without a bias
  Tensor relu_scores;   // (b, rows, cols), zero where masked
};

// sum_{j <= i} a[:, i, j] b[:, j, :] for square a (batch, T, T) and b (batch, T, E), without ever forming a product
// a_ij b_j with j > i: a masked zero times a NaN or Inf of a later position is NaN, which a plain matmul of the
// masked a would carry to earlier rows. The strict lower triangle splits into the lower-left squares of the 2s x 2s
// diagonal blocks, s = 1, 2, 4, ... (T padded to a power of two with zeros); one batched matmul per size s.
Tensor lower_triangular_matmul(const Tensor& a, const Tensor& b) {
  const int64_t batch = a.size(0), T = a.size(1), E = b.size(2);
  int64_t P = 1;
  while (P < T) P *= 2;
  Tensor ap = at::constant_pad_nd(a, {0, P - T, 0, P - T}).contiguous();
  Tensor bp = at::constant_pad_nd(b, {0, 0, 0, P - T}).contiguous();
  Tensor out = ap.diagonal(0, 1, 2).unsqueeze(-1) * bp;
  for (int64_t s = 1; s < P; s *= 2) {
    const int64_t n = P / (2 * s);
    Tensor blocks = ap.view({batch, n, 2 * s, n, 2 * s}).diagonal(0, 1, 3).permute({0, 3, 1, 2});  // (b, n, 2s, 2s)
    Tensor earlier = bp.view({batch, n, 2 * s, E}).narrow(2, 0, s);
    out.view({batch, n, 2 * s, E}).narrow(2, s, s).add_(at::matmul(blocks.narrow(2, s, s).narrow(3, 0, s), earlier));
  }
  return out.narrow(1, 0, T);
}

// sum_{i >= j} a[:, i, j] b[:, i, :]: the transposed product, as the lower one on both orders reversed.
Tensor upper_transposed_matmul(const Tensor& a, const Tensor& b) {
  return lower_triangular_matmul(a.transpose(1, 2).flip({1, 2}), b.flip({1})).flip({1});
}

// The tile's contribution to its query rows, m (b, rows, cols) times x at the tile's keys (b, cols, X).
Tensor rows_times_keys(const KeyTile& t, const Tensor& m, const Tensor& x) {
  if (!t.causal) return at::matmul(m, x);
  Tensor out = at::empty({m.size(0), t.rows, x.size(2)}, x.options());
  out.narrow(1, 0, t.cols).copy_(lower_triangular_matmul(m.narrow(1, 0, t.cols), x));
  if (t.rows > t.cols) out.narrow(1, t.cols, t.rows - t.cols).copy_(at::matmul(m.narrow(1, t.cols, t.rows - t.cols), x));
  return out;
}

// The tile's contribution to its keys, m (b, rows, cols) transposed times y at the tile's query rows (b, rows, X).
Tensor keys_times_rows(const KeyTile& t, const Tensor& m, const Tensor& y) {
  if (!t.causal) return at::matmul(m.transpose(1, 2), y);
  Tensor out = upper_transposed_matmul(m.narrow(1, 0, t.cols), y.narrow(1, 0, t.cols));
  if (t.rows > t.cols) {
    out.add_(at::matmul(m.narrow(1, t.cols, t.rows - t.cols).transpose(1, 2), y.narrow(1, t.cols, t.rows - t.cols)));
  }
  return out;
}

// Zero the diagonal square's future (j > i) in place, by masked_fill: multiplying by a 0/1 mask keeps a NaN there.
void mask_future(const KeyTile& t, Tensor& m) {
  if (!t.causal) return;
  m.narrow(1, 0, t.cols).masked_fill_(at::ones({t.cols, t.cols}, m.options().dtype(at::kBool)).triu(1), 0);
}

KeyTile key_tile(const Tensor& q, const Tensor& k, const std::optional<Tensor>& bias, int64_t k0, int64_t keys,
                 const GauOptions& opt) {
  const int64_t L = q.size(1);
  KeyTile t;
  t.k0 = k0;
  t.cols = std::min(keys, L - k0);
  t.q0 = opt.causal ? k0 : 0;
  t.rows = L - t.q0;
  Tensor scores = at::matmul(q.narrow(1, t.q0, t.rows), k.narrow(1, k0, t.cols).transpose(1, 2)).mul_(opt.scale);
  if (bias) {
    t.index = bias_index(t.q0, t.rows, k0, t.cols, L - 1, q.options());
    scores.add_(bias->index_select(0, t.index.flatten()).view({t.rows, t.cols}));
  }
  t.causal = opt.causal;
  t.relu_scores = at::relu(scores);
  mask_future(t, t.relu_scores);  // only the tile's first cols query rows can precede one of its keys
  return t;
}

}  // namespace

Tensor flash_chunk_attention_fwd(const FlashChunkInputs& in, const FlashChunkOptions& opt) {
  if (in.v.numel() == 0) return at::zeros_like(in.v);
  Chunked k = chunk_scores(in, opt);
  Tensor out = from_chunks(ungated_output(k, opt), k.seqlen);
  if (in.u) out = out * in.u->to(k.ct);
  return out.to(in.v.scalar_type());
}

std::vector<Tensor> flash_chunk_attention_bwd(const Tensor& dout, const FlashChunkInputs& in,
                                              const FlashChunkOptions& opt) {
  if (in.v.numel() == 0 || in.q_quad.numel() == 0) {
    return {at::zeros_like(in.q_quad), at::zeros_like(in.k_quad), at::zeros_like(in.q_lin),
            at::zeros_like(in.k_lin), at::zeros_like(in.v), in.u ? at::zeros_like(*in.u) : empty_grad(in.v),
            in.rel_bias ? at::zeros_like(*in.rel_bias) : empty_grad(in.v)};
  }
  Chunked k = chunk_scores(in, opt);
  const int64_t G = k.nchunks, C = k.C, L = k.seqlen;
  Tensor g = to_chunks(dout, G, C, k.ct);  // padded rows get zero gradient, so nothing flows from them
  Tensor du;
  if (in.u) {
    du = g * ungated_output(k, opt);
    g = g * to_chunks(*in.u, G, C, k.ct);
  }

  // Linear part: lin_g = lin_scale q_lin,g lin_state_g.
  Tensor dq_lin = times_state(g, k.lin_state.transpose(-1, -2)).mul_(opt.lin_scale);
  Tensor dkv;  // the gradient of each chunk's k_lin^T v: (b, G, S, E) causal, (b, 1, S, E) shared bidirectional
  if (opt.causal) {
    // chunk h's k_lin^T v reaches the chunks after h: a reverse exclusive prefix sum of the states' gradients
    Tensor d_lin_state = at::matmul(k.q_lin.transpose(-1, -2), g).mul_(opt.lin_scale);  // (b, G, S, E)
    dkv = exclusive_chunk_cumsum(d_lin_state, /*reverse=*/true);
  } else {
    dkv = at::matmul(unchunked(k.q_lin).transpose(1, 2), unchunked(g)).mul_(opt.lin_scale).unsqueeze(1);
  }
  Tensor dk_lin = times_state(k.v, dkv.transpose(-1, -2));
  Tensor dv = times_state(k.k_lin, dkv);

  // Quadratic part: quad_g = relu(s)² v_g with s = quad_scale q.k + bias; d relu(s)² / ds = 2 relu(s).
  dv.add_(at::matmul(k.relu_scores.square().transpose(-1, -2), g));
  Tensor ds = at::matmul(g, k.v.transpose(-1, -2)).mul_(k.relu_scores).mul_(2.0);  // (b, G, C, C)
  Tensor dq_quad = at::matmul(ds, k.k_quad).mul_(opt.quad_scale);
  Tensor dk_quad = at::matmul(ds.transpose(-1, -2), k.q_quad).mul_(opt.quad_scale);
  Tensor drel_bias;
  if (in.rel_bias) {
    Tensor index = bias_index(0, C, 0, C, C - 1, in.v.options());
    drel_bias = at::zeros({2 * C - 1}, ds.options()).index_add_(0, index.flatten(), ds.sum(at::IntArrayRef{0, 1}).flatten());
  }

  return {from_chunks(dq_quad, L).to(in.q_quad.scalar_type()),
          from_chunks(dk_quad, L).to(in.k_quad.scalar_type()),
          from_chunks(dq_lin, L).to(in.q_lin.scalar_type()),
          from_chunks(dk_lin, L).to(in.k_lin.scalar_type()),
          from_chunks(dv, L).to(in.v.scalar_type()),
          in.u ? grad_as(in.u, from_chunks(du, L), dv) : empty_grad(dv),
          in.rel_bias ? grad_as(in.rel_bias, drel_bias, dv) : empty_grad(dv)};
}

Tensor gau_attention_fwd(const GauInputs& in, const GauOptions& opt) {
  if (in.v.numel() == 0) return at::zeros_like(in.v);
  const auto ct = compute_type(in.v);
  const int64_t L = in.v.size(1);
  Tensor q = in.q.to(ct), k = in.k.to(ct), v = in.v.to(ct);
  std::optional<Tensor> bias;
  if (in.rel_bias) bias = in.rel_bias->to(ct);
  // The first tile is seen by every query (q0 = 0 in both modes): its product starts the sum, no zeros + add.
  Tensor out;
  const int64_t keys = keys_per_tile(q.size(0), L, opt.causal);
  for (int64_t k0 = 0; k0 < L; k0 += keys) {
    KeyTile t = key_tile(q, k, bias, k0, keys, opt);
    Tensor part = rows_times_keys(t, t.relu_scores.square_(), v.narrow(1, k0, t.cols));
    if (k0 == 0) {
      out = part;
    } else {
      out.narrow(1, t.q0, t.rows).add_(part);
    }
  }
  if (in.u) out.mul_(in.u->to(ct));
  return out.to(in.v.scalar_type());
}

std::vector<Tensor> gau_attention_bwd(const Tensor& dout, const GauInputs& in, const GauOptions& opt) {
  if (in.v.numel() == 0 || in.q.numel() == 0) {
    return {at::zeros_like(in.q), at::zeros_like(in.k), at::zeros_like(in.v),
            in.u ? at::zeros_like(*in.u) : empty_grad(in.v),
            in.rel_bias ? at::zeros_like(*in.rel_bias) : empty_grad(in.v)};
  }
  const auto ct = compute_type(in.v);
  const int64_t L = in.v.size(1);
  Tensor q = in.q.to(ct), k = in.k.to(ct), v = in.v.to(ct);
  std::optional<Tensor> bias;
  if (in.rel_bias) bias = in.rel_bias->to(ct);
  Tensor g = dout.to(ct);
  Tensor ungated;  // the output before the gate, rebuilt tile by tile for du
  if (in.u) {
    g = g * in.u->to(ct);
    ungated = at::zeros(v.sizes(), v.options());
  }
  Tensor dq = at::zeros(q.sizes(), q.options()), dk = at::empty(k.sizes(), k.options());
  Tensor dv = at::empty(v.sizes(), v.options());
  Tensor drel_bias = bias ? at::zeros({2 * L - 1}, q.options()) : Tensor();
  const int64_t keys = keys_per_tile(q.size(0), L, opt.causal);
  for (int64_t k0 = 0; k0 < L; k0 += keys) {
    KeyTile t = key_tile(q, k, bias, k0, keys, opt);
    Tensor v_t = v.narrow(1, k0, t.cols), g_t = g.narrow(1, t.q0, t.rows);
    Tensor kernel = t.relu_scores.square();
    if (in.u) ungated.narrow(1, t.q0, t.rows).add_(rows_times_keys(t, kernel, v_t));
    dv.narrow(1, k0, t.cols).copy_(keys_times_rows(t, kernel, g_t));
    Tensor ds = at::matmul(g_t, v_t.transpose(1, 2)).mul_(t.relu_scores).mul_(2.0);  // (b, rows, cols)
    mask_future(t, ds);
    dq.narrow(1, t.q0, t.rows).add_(rows_times_keys(t, ds, k.narrow(1, k0, t.cols)), opt.scale);
    dk.narrow(1, k0, t.cols).copy_(keys_times_rows(t, ds, q.narrow(1, t.q0, t.rows)).mul_(opt.scale));
    if (bias) drel_bias.index_add_(0, t.index.flatten(), ds.sum(0).flatten());
  }
  return {dq.to(in.q.scalar_type()), dk.to(in.k.scalar_type()), dv.to(in.v.scalar_type()),
          in.u ? grad_as(in.u, dout.to(ct) * ungated, dv) : empty_grad(dv),
          in.rel_bias ? grad_as(in.rel_bias, drel_bias, dv) : empty_grad(dv)};
}

Tensor flash_step(const Tensor& q_quad, const Tensor& k_quad, const Tensor& q_lin, const Tensor& k_lin,
                  const Tensor& v, const std::optional<Tensor>& u, const std::optional<Tensor>& rel_bias,
                  FlashDecodeState& state, double quad_scale, double lin_scale) {
  const auto ct = state.lin_state.scalar_type();
  const int64_t C = state.k_quad_cache.size(1), i = state.position % C;
  // A new chunk begins: the finished chunk's keys and values join the linear state (causal: strictly earlier).
  if (i == 0 && state.position > 0) {
    state.lin_state.add_(state.chunk_kv);
    state.chunk_kv.zero_();
  }
  Tensor kq = k_quad.to(ct), vv = v.to(ct);
  state.k_quad_cache.select(1, i).copy_(kq);
  state.v_cache.select(1, i).copy_(vv);
  state.chunk_kv.add_(k_lin.to(ct).unsqueeze(2) * vv.unsqueeze(1));

  Tensor keys = state.k_quad_cache.narrow(1, 0, i + 1);                            // (b, i+1, S)
  Tensor scores = at::matmul(keys, q_quad.to(ct).unsqueeze(2)).squeeze(2).mul_(quad_scale);  // (b, i+1)
  if (rel_bias) scores.add_(rel_bias->to(ct).narrow(0, C - 1 - i, i + 1));   // offsets j - i = -i .. 0
  Tensor kernel = at::relu(scores).square_();
  Tensor out = at::matmul(kernel.unsqueeze(1), state.v_cache.narrow(1, 0, i + 1)).squeeze(1);
  out.add_(at::matmul(q_lin.to(ct).unsqueeze(1), state.lin_state).squeeze(1), lin_scale);
  if (u) out.mul_(u->to(ct));
  return out.to(v.scalar_type());
}

}  // namespace subq::composite
