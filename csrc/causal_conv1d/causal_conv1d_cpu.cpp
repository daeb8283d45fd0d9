#include "causal_conv1d/causal_conv1d_cpu.h"

#include <vector>

namespace subq::composite {
namespace {

at::ScalarType compute_type(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

bool present(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// The input extended to negative times: (batch, dim, width-1 + seqlen), initial states (or zeros) first. Tap k of
// output t reads column t + k.
at::Tensor padded_input(const at::Tensor& x, const std::optional<at::Tensor>& initial_states, int64_t width) {
  const at::Tensor xc = x.to(compute_type(x));
  const at::Tensor head = present(initial_states) ? initial_states->to(xc.scalar_type())
                                                  : at::zeros({x.size(0), x.size(1), width - 1}, xc.options());
  return at::cat({head, xc}, 2);
}

// masks[k] (batch, 1, seqlen): 1 where tap k of output t reads the same sequence, seq_idx[t - (W-1) + k] ==
// seq_idx[t]. Empty without seq_idx. Negative times get -1; the input there is zero, so their match is harmless.
std::vector<at::Tensor> tap_masks(const std::optional<at::Tensor>& seq_idx, int64_t width, at::ScalarType type) {
  std::vector<at::Tensor> masks;
  if (!present(seq_idx)) return masks;
  const at::Tensor seq = *seq_idx;
  const int64_t seqlen = seq.size(1);
  const at::Tensor padded = at::cat({at::full({seq.size(0), width - 1}, -1, seq.options()), seq}, 1);
  for (int64_t k = 0; k < width; ++k) masks.push_back(padded.narrow(1, k, seqlen).eq(seq).unsqueeze(1).to(type));
  return masks;
}

// Tap k's contribution weight[:, k] * xs[t - (W-1) + k], restricted to the output's own sequence.
at::Tensor tap(const at::Tensor& xs, const at::Tensor& w, const std::vector<at::Tensor>& masks, int64_t k,
               int64_t seqlen) {
  at::Tensor term = xs.narrow(2, k, seqlen) * w.select(1, k).view({1, -1, 1});
  return masks.empty() ? term : term * masks[k];
}

at::Tensor pre_activation(const at::Tensor& xs, const at::Tensor& w, const std::optional<at::Tensor>& bias,
                          const std::vector<at::Tensor>& masks, int64_t seqlen) {
  at::Tensor acc = tap(xs, w, masks, 0, seqlen);
  for (int64_t k = 1; k < w.size(1); ++k) acc = acc + tap(xs, w, masks, k, seqlen);
  if (present(bias)) acc = acc + bias->to(xs.scalar_type()).view({1, -1, 1});
  return acc;
}

// A result with x's dtype and memory layout (what the CUDA kernels write and the fake kernels promise).
at::Tensor like_x(const at::Tensor& x, const at::Tensor& values) { return at::empty_like(x).copy_(values); }

}  // namespace

std::tuple<at::Tensor, at::Tensor> causal_conv1d_fwd(const at::Tensor& x, const at::Tensor& weight,
                                                     const std::optional<at::Tensor>& bias,
                                                     const std::optional<at::Tensor>& seq_idx,
                                                     const std::optional<at::Tensor>& initial_states,
                                                     bool return_final_states, bool silu) {
  const int64_t width = weight.size(1), seqlen = x.size(2);
  const at::Tensor xs = padded_input(x, initial_states, width);
  const at::Tensor w = weight.to(xs.scalar_type());
  at::Tensor y = pre_activation(xs, w, bias, tap_masks(seq_idx, width, xs.scalar_type()), seqlen);
  if (silu) y = at::silu(y);
  at::Tensor final_states = return_final_states ? xs.narrow(2, seqlen, width - 1).to(x.scalar_type()).contiguous()
                                                : x.new_empty({0});
  return {like_x(x, y), final_states};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> causal_conv1d_bwd(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& seq_idx, const std::optional<at::Tensor>& initial_states, const at::Tensor& dy,
    const std::optional<at::Tensor>& dfinal_states, bool silu, std::array<bool, 4> output_mask) {
  const int64_t width = weight.size(1), seqlen = x.size(2);
  const at::Tensor xs = padded_input(x, initial_states, width);
  const at::Tensor w = weight.to(xs.scalar_type());
  const std::vector<at::Tensor> masks = tap_masks(seq_idx, width, xs.scalar_type());
  at::Tensor dp = dy.to(xs.scalar_type());
  if (silu) {  // d silu(v) / dv = sigmoid(v) (1 + v (1 - sigmoid(v))), v recomputed rather than saved
    const at::Tensor pre = pre_activation(xs, w, bias, masks, seqlen);
    const at::Tensor s = at::sigmoid(pre);
    dp = dp * s * (1 + pre * (1 - s));
  }
  const std::array<int64_t, 2> kBatchAndTime{0, 2};  // weight and bias gradients reduce over these
  // Distinct empty tensors: outputs must not alias one another.
  at::Tensor dx = x.new_empty({0}), dweight = x.new_empty({0}), dbias = x.new_empty({0}), dinitial = x.new_empty({0});
  if (output_mask[1]) {
    std::vector<at::Tensor> columns;
    for (int64_t k = 0; k < width; ++k) {
      const at::Tensor term = dp * xs.narrow(2, k, seqlen);
      columns.push_back((masks.empty() ? term : term * masks[k]).sum(kBatchAndTime));
    }
    dweight = at::stack(columns, 1).to(weight.scalar_type());
  }
  if (output_mask[2] && present(bias)) dbias = dp.sum(kBatchAndTime).to(bias->scalar_type());
  if (output_mask[0] || output_mask[3]) {
    // x at padded column s feeds outputs s - k through tap k: scatter each tap's gradient back onto its columns.
    at::Tensor dxs = at::zeros_like(xs);
    for (int64_t k = 0; k < width; ++k) {
      const at::Tensor term = dp * w.select(1, k).view({1, -1, 1});
      dxs.narrow(2, k, seqlen).add_(masks.empty() ? term : term * masks[k]);
    }
    if (present(dfinal_states) && dfinal_states->numel() > 0) dxs.narrow(2, seqlen, width - 1).add_(*dfinal_states);
    if (output_mask[0]) dx = like_x(x, dxs.narrow(2, width - 1, seqlen));
    if (output_mask[3] && present(initial_states)) {
      dinitial = dxs.narrow(2, 0, width - 1).to(initial_states->scalar_type()).contiguous();
    }
  }
  return {dx, dweight, dbias, dinitial};
}

at::Tensor causal_conv1d_update(const at::Tensor& x, const at::Tensor& conv_state, const at::Tensor& weight,
                                const std::optional<at::Tensor>& bias, bool silu) {
  const int64_t width = weight.size(1), tokens = x.size(2), state_len = conv_state.size(2);
  // The state's last W-1 inputs followed by the new tokens: the forward's padded input for this chunk.
  const at::Tensor xs = at::cat({conv_state.to(compute_type(x)), x.to(compute_type(x))}, 2);
  const at::Tensor window = xs.narrow(2, state_len - (width - 1), width - 1 + tokens);
  at::Tensor y = pre_activation(window, weight.to(xs.scalar_type()), bias, {}, tokens);
  if (silu) y = at::silu(y);
  conv_state.copy_(xs.narrow(2, tokens, state_len));
  return like_x(x, y);
}

}  // namespace subq::composite
