#include "ssd/ssd_chunk_scan_cpu.h"

#include <algorithm>
#include <limits>

namespace subq::composite {
namespace {

using at::Tensor;

at::ScalarType compute_type(const Tensor& x) { return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

// (b, L, ...) -> (b, chunks, Q, ...), zero-padded to whole chunks. A padded position has dt = 0 and x = B = C = 0:
// it decays nothing and adds nothing, so the padded scan equals the unpadded one.
Tensor to_chunks(const Tensor& t, int64_t nchunks, int64_t Q) {
  auto sizes = t.sizes().vec();
  sizes[1] = nchunks * Q;
  Tensor padded = at::zeros(sizes, t.options());
  padded.narrow(1, 0, t.size(1)).copy_(t);
  sizes[1] = Q;
  sizes.insert(sizes.begin() + 1, nchunks);
  return padded.view(sizes);
}

// (b, chunks, Q, ...) -> (b, L, ...)
Tensor from_chunks(const Tensor& t, int64_t seqlen) {
  auto sizes = t.sizes().vec();
  sizes[1] *= sizes[2];
  sizes.erase(sizes.begin() + 2);
  return t.reshape(sizes).narrow(1, 0, seqlen);
}

// Everything the forward computes that the backward reuses, in the compute dtype, with heads split as
// (G groups, J heads per group) so B and C broadcast over the heads of their group.
struct Chunked {
  int64_t batch = 0, seqlen = 0, nheads = 0, headdim = 0, ngroups = 0, dstate = 0, per_group = 0;
  int64_t Q = 0, nchunks = 0;
  at::ScalarType ct = at::kFloat;
  Tensor dt_pre;      // (b, L, H): dt + dt_bias, before softplus
  Tensor dt_soft;     // (b, L, H): after softplus, before the clamp
  Tensor dtp;         // (b, c, Q, G, J): processed dt
  Tensor x;           // (b, c, Q, G, J, P)
  Tensor B, C;        // (b, c, Q, G, N)
  Tensor seq;         // (b, c, Q) int64 sequence index; padded positions continue the last sequence
  Tensor prev_seq;    // (b, c): the sequence entering each chunk (the first position's, for chunk 0)
  Tensor cum;         // (b, c, Q, G, J): inclusive cumulative sum of dt*A within the chunk
  Tensor same_seq;    // (b, c, t, s): s <= t and both in one sequence
  Tensor to_end;      // (b, c, Q, G, J): exp(cum_last - cum_s) where s is in the chunk's last sequence
  Tensor carry;       // (b, c, G, J): exp(cum_last) where the chunk continues the entering sequence
  Tensor from_start;  // (b, c, Q, G, J): exp(cum_t) where t is still in the entering sequence
  Tensor entering;    // (b, c, G, J, P, N): the state before each chunk
  Tensor final_state; // (b, G, J, P, N)
};

Chunked scan_states(const SsdInputs& in, const SsdOptions& opt) {
  Chunked k;
  k.batch = in.x.size(0);
  k.seqlen = in.x.size(1);
  k.nheads = in.x.size(2);
  k.headdim = in.x.size(3);
  k.ngroups = in.B.size(2);
  k.dstate = in.B.size(3);
  k.per_group = k.nheads / k.ngroups;
  k.Q = opt.chunk_size;
  k.nchunks = (k.seqlen + k.Q - 1) / k.Q;
  k.ct = compute_type(in.x);
  const int64_t b = k.batch, c = k.nchunks, Q = k.Q, G = k.ngroups, J = k.per_group;
  auto f = [&](const Tensor& t) { return t.to(k.ct); };

  Tensor dt = f(in.dt);
  if (in.dt_bias) dt = dt + f(*in.dt_bias);
  k.dt_pre = dt;
  if (opt.dt_softplus) dt = at::softplus(dt);  // beta 1, threshold 20, as torch.nn.functional.softplus
  k.dt_soft = dt;
  if (opt.has_dt_limit) dt = at::clamp(dt, opt.dt_min, opt.dt_max);
  Tensor dtp = to_chunks(dt, c, Q);                                          // (b, c, Q, H)
  Tensor cum = at::cumsum(dtp * f(in.A), 2);
  k.dtp = dtp.view({b, c, Q, G, J});
  k.cum = cum.view({b, c, Q, G, J});
  k.x = to_chunks(f(in.x), c, Q).view({b, c, Q, G, J, k.headdim});
  k.B = to_chunks(f(in.B), c, Q);
  k.C = to_chunks(f(in.C), c, Q);

  const int64_t pad = c * Q - k.seqlen;
  Tensor seq = in.seq_idx ? in.seq_idx->to(at::kLong)
                          : at::zeros({b, k.seqlen}, in.x.options().dtype(at::kLong));
  seq = at::cat({seq, seq.narrow(1, k.seqlen - 1, 1).expand({b, pad})}, 1).view({b, c, Q});
  Tensor last_seq = seq.select(2, Q - 1);                                    // (b, c)
  Tensor prev_seq = at::cat({seq.select(2, 0).narrow(1, 0, 1), last_seq.narrow(1, 0, c - 1)}, 1);
  k.seq = seq;
  k.prev_seq = prev_seq;

  Tensor causal = at::ones({Q, Q}, in.x.options().dtype(at::kBool)).tril();
  k.same_seq = causal.logical_and(seq.unsqueeze(3).eq(seq.unsqueeze(2)));

  Tensor cum_last = k.cum.select(2, Q - 1);                                  // (b, c, G, J)
  k.to_end = at::exp(cum_last.unsqueeze(2) - k.cum) * seq.eq(last_seq.unsqueeze(2)).view({b, c, Q, 1, 1});
  k.carry = at::exp(cum_last) * last_seq.eq(prev_seq).view({b, c, 1, 1});
  k.from_start = at::exp(k.cum) * seq.eq(prev_seq.unsqueeze(2)).view({b, c, Q, 1, 1});

  // Chunk states, then the short sequential scan over chunks.
  Tensor xdt = k.x * k.dtp.unsqueeze(-1);
  Tensor chunk_states = at::einsum("bcsgn,bcsgjp->bcgjpn", {k.B, xdt * k.to_end.unsqueeze(-1)});
  Tensor state = in.initial_states ? f(*in.initial_states).reshape({b, G, J, k.headdim, k.dstate})
                                   : at::zeros({b, G, J, k.headdim, k.dstate}, k.x.options());
  k.entering = at::empty({b, c, G, J, k.headdim, k.dstate}, k.x.options());
  for (int64_t i = 0; i < c; ++i) {
    k.entering.select(1, i).copy_(state);
    state = k.carry.select(1, i).unsqueeze(-1).unsqueeze(-1) * state + chunk_states.select(1, i);
  }
  k.final_state = state;
  return k;
}

// The quadratic (intra-chunk) terms are computed a slice of chunks at a time, so their Q x Q temporaries stay
// within a fixed budget however long the sequence is.
constexpr int64_t kIntraBudgetBytes = int64_t(256) << 20;

int64_t chunks_per_slice(const Chunked& k) {
  const int64_t per_chunk = k.batch * k.nheads * k.Q * k.Q * at::elementSize(k.ct);
  return std::max<int64_t>(1, kIntraBudgetBytes / std::max<int64_t>(per_chunk, 1));
}

struct IntraSlice {
  int64_t begin = 0, size = 0;
  Tensor decay;       // (b, n, G, J, t, s): exp(cum_t - cum_s) for s <= t in one sequence, else 0
  Tensor CB;          // (b, n, G, t, s): C_t . B_s
  Tensor at(const Tensor& t) const { return t.narrow(1, begin, size); }
};

IntraSlice intra_slice(const Chunked& k, int64_t begin, int64_t end) {
  IntraSlice sl;
  sl.begin = begin;
  sl.size = end - begin;
  // Segment sums are differences of fp32 cumulative sums; entries above the diagonal (positive when A < 0)
  // are masked to -inf before the exp, so no exp of a positive number is ever taken.
  Tensor cum_ts = sl.at(k.cum).permute({0, 1, 3, 4, 2});                     // (b, n, G, J, Q)
  Tensor segsum = cum_ts.unsqueeze(-1) - cum_ts.unsqueeze(-2);
  Tensor masked = sl.at(k.same_seq).unsqueeze(2).unsqueeze(2).logical_not();
  sl.decay = at::exp(segsum.masked_fill_(masked, -std::numeric_limits<double>::infinity()));
  sl.CB = at::einsum("bctgn,bcsgn->bcgts", {sl.at(k.C), sl.at(k.B)});
  return sl;
}

// The SSM output before the skip and the gate, (b, L, H, P): intra-chunk quadratic form plus state to output.
Tensor ssm_output(const Chunked& k) {
  Tensor xdt = k.x * k.dtp.unsqueeze(-1);
  Tensor y = at::einsum("bctgn,bcgjpn->bctgjp", {k.C, k.entering}) * k.from_start.unsqueeze(-1);
  const int64_t step = chunks_per_slice(k);
  for (int64_t c0 = 0; c0 < k.nchunks; c0 += step) {
    IntraSlice sl = intra_slice(k, c0, std::min(k.nchunks, c0 + step));
    sl.at(y).add_(at::einsum("bcgjts,bcsgjp->bctgjp", {sl.CB.unsqueeze(3) * sl.decay, sl.at(xdt)}));
  }
  return from_chunks(y.reshape({k.batch, k.nchunks, k.Q, k.nheads, k.headdim}), k.seqlen);
}

Tensor skip_weight(const Tensor& D, const Chunked& k) {
  return D.dim() == 1 ? D.to(k.ct).view({k.nheads, 1}) : D.to(k.ct);
}

// The state after the last position of each packed sequence: the state entering that position's chunk, decayed,
// plus the chunk's own inputs up to the position.
Tensor varlen_states(const Chunked& k, const Tensor& cu_seqlens) {
  const int64_t S = cu_seqlens.size(0) - 1, Q = k.Q, G = k.ngroups, J = k.per_group;
  Tensor cu = cu_seqlens.to(at::kLong);
  Tensor ends = cu.narrow(0, 1, S), starts = cu.narrow(0, 0, S);
  Tensor last = (ends - 1).clamp(0, k.seqlen - 1);
  Tensor chunk = at::div(last, Q, "floor"), pos = at::remainder(last, Q);

  Tensor cum = k.cum.select(0, 0).index_select(0, chunk);                   // (S, Q, G, J)
  Tensor cum_end = cum.gather(1, pos.view({S, 1, 1, 1}).expand({S, 1, G, J}));
  Tensor seq = k.seq.select(0, 0).index_select(0, chunk);                   // (S, Q)
  Tensor seq_end = seq.gather(1, pos.view({S, 1}));
  Tensor upto = at::arange(Q, cu.options()).view({1, Q}).le(pos.view({S, 1})).logical_and(seq.eq(seq_end));
  Tensor decay = at::exp((cum_end - cum).masked_fill(upto.view({S, Q, 1, 1}).logical_not(),
                                                     -std::numeric_limits<double>::infinity()));
  Tensor xdt = (k.x * k.dtp.unsqueeze(-1)).select(0, 0).index_select(0, chunk);  // (S, Q, G, J, P)
  Tensor Bs = k.B.select(0, 0).index_select(0, chunk);                       // (S, Q, G, N)
  Tensor local = at::einsum("sqgn,sqgjp->sgjpn", {Bs, xdt * decay.unsqueeze(-1)});
  Tensor continues = seq_end.squeeze(1).eq(k.prev_seq.select(0, 0).index_select(0, chunk));
  Tensor carried = at::exp(cum_end.squeeze(1)) * continues.view({S, 1, 1});  // (S, G, J)
  Tensor entering = k.entering.select(0, 0).index_select(0, chunk);          // (S, G, J, P, N)
  Tensor state = local + entering * carried.unsqueeze(-1).unsqueeze(-1);
  state = state * ends.gt(starts).view({S, 1, 1, 1, 1});                     // an empty sequence has no state
  return state.reshape({S, k.nheads, k.headdim, k.dstate});
}

Tensor empty_grad(const Tensor& like) { return like.new_empty({0}); }

}  // namespace

std::tuple<Tensor, Tensor, Tensor> ssd_chunk_scan_fwd(const SsdInputs& in, const std::optional<Tensor>& cu_seqlens,
                                                      const SsdOptions& opt) {
  const int64_t b = in.x.size(0), L = in.x.size(1), H = in.x.size(2), P = in.x.size(3), N = in.B.size(3);
  const auto ct = compute_type(in.x);
  const int64_t S = cu_seqlens ? cu_seqlens->size(0) - 1 : 0;
  if (L == 0 || b == 0) {
    Tensor final_state = in.initial_states ? in.initial_states->to(ct).clone()
                                           : at::zeros({b, H, P, N}, in.x.options().dtype(ct));
    return {at::empty_like(in.x), final_state, at::zeros({S, H, P, N}, in.x.options().dtype(ct))};
  }
  Chunked k = scan_states(in, opt);
  Tensor y = ssm_output(k);
  if (in.D) y = y + in.x.to(k.ct) * skip_weight(*in.D, k);
  if (in.z) y = y * at::silu(in.z->to(k.ct));
  Tensor varlen = cu_seqlens ? varlen_states(k, *cu_seqlens) : at::empty({0, H, P, N}, in.x.options().dtype(ct));
  return {y.to(in.x.scalar_type()), k.final_state.reshape({b, H, P, N}), varlen};
}

std::vector<Tensor> ssd_chunk_scan_bwd(const Tensor& dy, const std::optional<Tensor>& dfinal_states,
                                       const SsdInputs& in, const SsdOptions& opt) {
  const int64_t b = in.x.size(0), L = in.x.size(1);
  auto opt_grad = [](const std::optional<Tensor>& t, const Tensor& g) {
    return t ? g.to(t->scalar_type()) : empty_grad(g);
  };
  if (L == 0 || b == 0) {
    Tensor dinit = in.initial_states && dfinal_states ? dfinal_states->to(in.initial_states->scalar_type())
                   : in.initial_states ? at::zeros_like(*in.initial_states) : empty_grad(in.x);
    return {at::zeros_like(in.x), at::zeros_like(in.dt), at::zeros_like(in.A), at::zeros_like(in.B),
            at::zeros_like(in.C), in.D ? at::zeros_like(*in.D) : empty_grad(in.x),
            in.z ? at::zeros_like(*in.z) : empty_grad(in.x), in.dt_bias ? at::zeros_like(*in.dt_bias) : empty_grad(in.x),
            dinit};
  }
  Chunked k = scan_states(in, opt);
  const int64_t c = k.nchunks, Q = k.Q, G = k.ngroups, J = k.per_group, H = k.nheads, P = k.headdim;
  auto f = [&](const Tensor& t) { return t.to(k.ct); };
  Tensor x = f(in.x);

  // Gate and skip.
  Tensor g_out = f(dy);
  Tensor dz, dD;
  if (in.z) {
    Tensor y = ssm_output(k);
    if (in.D) y = y + x * skip_weight(*in.D, k);
    Tensor z = f(*in.z), sig = at::sigmoid(z);
    dz = g_out * y * sig * (1 + z * (1 - sig));
    g_out = g_out * z * sig;
  }
  Tensor dx_skip;
  if (in.D) {
    Tensor prod = g_out * x;
    dD = in.D->dim() == 1 ? prod.sum({0, 1, 3}) : prod.sum(at::IntArrayRef{0, 1});
    dx_skip = g_out * skip_weight(*in.D, k);
  }
  Tensor g = to_chunks(g_out, c, Q).view({b, c, Q, G, J, P});

  // 4. state to output: y_t += from_start_t * (C_t . h_entering)
  Tensor C_state = at::einsum("bctgn,bcgjpn->bctgjp", {k.C, k.entering});
  Tensor dcum = (g * C_state).sum(-1) * k.from_start;                         // (b, c, Q, G, J)
  Tensor g_from_start = g * k.from_start.unsqueeze(-1);
  Tensor dC = at::einsum("bctgjp,bcgjpn->bctgn", {g_from_start, k.entering});
  Tensor d_entering = at::einsum("bctgjp,bctgn->bcgjpn", {g_from_start, k.C});

  // 3. state passing in reverse: the gradient of each chunk's final state, the carries, the initial state.
  Tensor d_state = dfinal_states ? f(*dfinal_states).reshape({b, G, J, P, k.dstate}).clone()
                                 : at::zeros({b, G, J, P, k.dstate}, x.options());
  Tensor d_chunk_states = at::empty_like(k.entering);
  Tensor d_carry = at::empty_like(k.carry);
  for (int64_t i = c - 1; i >= 0; --i) {
    d_chunk_states.select(1, i).copy_(d_state);
    d_carry.select(1, i).copy_((d_state * k.entering.select(1, i)).sum({-2, -1}));
    d_state = d_entering.select(1, i) + k.carry.select(1, i).unsqueeze(-1).unsqueeze(-1) * d_state;
  }
  Tensor d_cum_last = d_carry * k.carry;                                     // (b, c, G, J)

  // 2. chunk states: state_c = sum_s B_s (x_s dt_s to_end_s)
  Tensor dstate_B = at::einsum("bcgjpn,bcsgn->bcsgjp", {d_chunk_states, k.B});
  Tensor dx = dstate_B * (k.to_end * k.dtp).unsqueeze(-1);
  Tensor dB = at::einsum("bcgjpn,bcsgjp->bcsgn", {d_chunk_states, k.x * (k.dtp * k.to_end).unsqueeze(-1)});
  Tensor d_weight = (k.x * dstate_B).sum(-1);                                // d(dt_s * to_end_s)
  Tensor ddtp = d_weight * k.to_end;
  Tensor d_to_end = d_weight * k.dtp * k.to_end;                            // through exp(cum_last - cum_s)
  d_cum_last = d_cum_last + d_to_end.sum(2);
  dcum = dcum - d_to_end;

  // 1. intra-chunk: y_t = sum_s CB_ts decay_ts dt_s x_s, a slice of chunks at a time
  const int64_t step = chunks_per_slice(k);
  for (int64_t c0 = 0; c0 < c; c0 += step) {
    IntraSlice sl = intra_slice(k, c0, std::min(c, c0 + step));
    Tensor g_s = sl.at(g), x_s = sl.at(k.x), dtp_s = sl.at(k.dtp);
    Tensor scores = sl.CB.unsqueeze(3) * sl.decay;                           // (b, n, G, J, t, s)
    Tensor g_dot_x = at::einsum("bctgjp,bcsgjp->bcgjts", {g_s, x_s});
    sl.at(dx).add_(at::einsum("bcgjts,bctgjp->bcsgjp", {scores, g_s}) * dtp_s.unsqueeze(-1));
    sl.at(ddtp).add_((scores * g_dot_x).sum(4).permute({0, 1, 4, 2, 3}));
    Tensor d_scores = g_dot_x.mul_(dtp_s.permute({0, 1, 3, 4, 2}).unsqueeze(4));  // times dt_s
    Tensor dCB = (d_scores * sl.decay).sum(3);                               // (b, n, G, t, s)
    Tensor d_segsum = d_scores.mul_(scores);                                 // d decay * decay
    sl.at(dC).add_(at::einsum("bcgts,bcsgn->bctgn", {dCB, sl.at(k.B)}));
    sl.at(dB).add_(at::einsum("bcgts,bctgn->bcsgn", {dCB, sl.at(k.C)}));
    sl.at(dcum).add_(d_segsum.sum(5).permute({0, 1, 4, 2, 3})).sub_(d_segsum.sum(4).permute({0, 1, 4, 2, 3}));
  }

  // cum is an inclusive prefix sum of a = dt * A over the chunk: da_s = sum_{t >= s} dcum_t.
  dcum.select(2, Q - 1).add_(d_cum_last);
  Tensor da = dcum.flip(2).cumsum(2).flip(2);
  Tensor A = f(in.A).view({G, J});
  ddtp = ddtp + da * A;
  Tensor dA = (da * k.dtp).sum({0, 1, 2}).reshape({H});

  // dt processing: clamp, softplus, bias.
  Tensor ddt = from_chunks(ddtp.reshape({b, c, Q, H}), L);
  if (opt.has_dt_limit) ddt = ddt * k.dt_soft.ge(opt.dt_min).logical_and(k.dt_soft.le(opt.dt_max));
  if (opt.dt_softplus) ddt = at::softplus_backward(ddt, k.dt_pre, 1, 20);
  Tensor ddt_bias = ddt.sum(at::IntArrayRef{0, 1});

  dx = from_chunks(dx.reshape({b, c, Q, H, P}), L);
  if (in.D) dx = dx + dx_skip;
  return {dx.to(in.x.scalar_type()),
          ddt.to(in.dt.scalar_type()),
          dA.to(in.A.scalar_type()),
          from_chunks(dB, L).to(in.B.scalar_type()),
          from_chunks(dC, L).to(in.C.scalar_type()),
          in.D ? dD.to(in.D->scalar_type()) : empty_grad(x),
          in.z ? dz.to(in.z->scalar_type()) : empty_grad(x),
          in.dt_bias ? ddt_bias.to(in.dt_bias->scalar_type()) : empty_grad(x),
          opt_grad(in.initial_states, d_state.reshape({b, H, P, k.dstate}))};
}

}  // namespace subq::composite
