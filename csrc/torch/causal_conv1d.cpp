// Torch glue for the causal conv1d: schemas of subq::causal_conv1d_{fwd,bwd,update}, argument checks, Params
// filling, and the CPU / CUDA implementations. Weight and bias reach the kernels as float32 (they are (dim, width)
// and (dim,), so the conversion is free next to x); their gradients come back in their own dtype.
#include <torch/library.h>

#include "causal_conv1d/causal_conv1d_cpu.h"
#include "torch/checks.h"

#ifdef SUBQ_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "causal_conv1d/causal_conv1d.h"
#include "torch/cuda_status_check.h"
#include "torch/kernel_types.h"
#include "torch/experimental_flags.h"
#endif

TORCH_LIBRARY_FRAGMENT(subq, m) {
  m.def("causal_conv1d_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor? seq_idx, Tensor? initial_states,"
        " bool return_final_states, bool silu) -> (Tensor, Tensor)");
  m.def("causal_conv1d_bwd(Tensor x, Tensor weight, Tensor? bias, Tensor? seq_idx, Tensor? initial_states,"
        " Tensor dy, Tensor? dfinal_states, bool silu, bool[4] output_mask) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("causal_conv1d_update(Tensor x, Tensor(a!) conv_state, Tensor weight, Tensor? bias, bool silu) -> Tensor");
}

namespace subq::glue {
namespace {

using OptTensor = std::optional<at::Tensor>;

bool present(const OptTensor& t) { return t.has_value() && t->defined(); }

// Weight and bias may be float32 or x's dtype.
void check_param(const at::Tensor& t, const at::Tensor& x, const char* name) {
  TORCH_CHECK(t.scalar_type() == x.scalar_type() || t.scalar_type() == at::kFloat, name, ".dtype (", t.scalar_type(),
              ") must be x.dtype (", x.scalar_type(), ") or float32");
  TORCH_CHECK(t.device() == x.device(), name, " is on ", t.device(), " but x is on ", x.device());
}

void check_weight_bias(const at::Tensor& x, const at::Tensor& weight, const OptTensor& bias) {
  check_dim(x, 3, "x");
  check_floating(x, "x");
  check_dim(weight, 2, "weight");
  check_param(weight, x, "weight");
  check_size(weight, 0, x.size(1), "weight", "channels of x (batch, dim, seqlen)");
  TORCH_CHECK(weight.size(1) >= 2 && weight.size(1) <= 4, "weight.shape[1] (the width) must be 2, 3 or 4, got shape ",
              weight.sizes());
  if (present(bias)) {
    check_dim(*bias, 1, "bias");
    check_param(*bias, x, "bias");
    check_size(*bias, 0, x.size(1), "bias", "channels of x");
  }
}

void check_states(const at::Tensor& states, const at::Tensor& x, int64_t length, const char* name) {
  check_dim(states, 3, name);
  check_same(states, x, name, "x");
  check_size(states, 0, x.size(0), name, "batch of x");
  check_size(states, 1, x.size(1), name, "channels of x");
  check_size(states, 2, length, name, "width - 1");
}

void check_conv(const at::Tensor& x, const at::Tensor& weight, const OptTensor& bias, const OptTensor& seq_idx,
                const OptTensor& initial_states) {
  check_weight_bias(x, weight, bias);
  if (present(seq_idx)) {
    const at::Tensor& s = *seq_idx;
    TORCH_CHECK(s.scalar_type() == at::kInt, "seq_idx must be int32, got ", s.scalar_type());
    TORCH_CHECK(s.device() == x.device(), "seq_idx is on ", s.device(), " but x is on ", x.device());
    TORCH_CHECK(s.dim() == 2 && s.size(0) == x.size(0) && s.size(1) == x.size(2),
                "seq_idx must be (batch, seqlen) = (", x.size(0), ", ", x.size(2), "), got shape ", s.sizes());
    TORCH_CHECK(!present(initial_states), "initial_states cannot be combined with seq_idx");
  }
  if (present(initial_states)) check_states(*initial_states, x, weight.size(1) - 1, "initial_states");
}

// An empty dfinal_states (what autograd passes for an unused, not-returned final state) means zero.
OptTensor final_grad(const OptTensor& dfinal, const at::Tensor& x, int64_t width) {
  if (!present(dfinal) || dfinal->numel() == 0) return std::nullopt;
  check_states(*dfinal, x, width - 1, "dfinal_states");
  return dfinal;
}

void check_dy(const at::Tensor& dy, const at::Tensor& x) {
  check_dim(dy, 3, "dy");
  check_same(dy, x, "dy", "x");
  for (int64_t i = 0; i < 3; ++i) check_size(dy, i, x.size(i), "dy", "the shape of x");
}

void check_update(const at::Tensor& x, const at::Tensor& conv_state, const at::Tensor& weight, const OptTensor& bias) {
  check_weight_bias(x, weight, bias);
  check_dim(conv_state, 3, "conv_state");
  check_same(conv_state, x, "conv_state", "x");
  check_size(conv_state, 0, x.size(0), "conv_state", "batch of x");
  check_size(conv_state, 1, x.size(1), "conv_state", "channels of x");
  TORCH_CHECK(conv_state.size(2) >= weight.size(1) - 1, "conv_state.shape[2] (state_len) must be at least width - 1 = ",
              weight.size(1) - 1, ", got shape ", conv_state.sizes());
  check_written_in_place(conv_state, "conv_state", {{&x, "x"}, {&weight, "weight"}, named(bias, "bias")});
}

// ---- CPU, and CUDA for float64 or without the opt-in kernels --------------------------------------------------------

std::tuple<at::Tensor, at::Tensor> fwd_composite(const at::Tensor& x, const at::Tensor& weight, const OptTensor& bias,
                                                 const OptTensor& seq_idx, const OptTensor& initial_states,
                                                 bool return_final_states, bool silu) {
  check_conv(x, weight, bias, seq_idx, initial_states);
  return composite::causal_conv1d_fwd(x, weight, bias, seq_idx, initial_states, return_final_states, silu);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bwd_composite(
    const at::Tensor& x, const at::Tensor& weight, const OptTensor& bias, const OptTensor& seq_idx,
    const OptTensor& initial_states, const at::Tensor& dy, const OptTensor& dfinal_states, bool silu,
    std::array<bool, 4> mask) {
  check_conv(x, weight, bias, seq_idx, initial_states);
  check_dy(dy, x);
  return composite::causal_conv1d_bwd(x, weight, bias, seq_idx, initial_states, dy,
                                final_grad(dfinal_states, x, weight.size(1)), silu, mask);
}

at::Tensor update_composite(const at::Tensor& x, const at::Tensor& conv_state, const at::Tensor& weight,
                            const OptTensor& bias, bool silu) {
  check_update(x, conv_state, weight, bias);
  return composite::causal_conv1d_update(x, conv_state, weight, bias, silu);
}

// ---- CUDA -------------------------------------------------------------------------------------------------------

#ifdef SUBQ_WITH_CUDA

// The kernels are opt-in until their GPU tests have passed on a GPU (they were written without one).
bool has_kernels(at::ScalarType t) { return has_kernel_dtype(t) && experimental_enabled(Experimental::kMamba2Kernels); }

Strides3 strides(const at::Tensor& t) { return Strides3{t.stride(0), t.stride(1), t.stride(2)}; }

at::Tensor as_float(const at::Tensor& t) { return t.to(at::kFloat).contiguous(); }

void check_status(Status status, const char* op) {
  check_cuda_status(status, std::string("subq::") + op);
}

// Fills everything but the outputs, from the float32 copies of weight and bias that the caller holds.
CausalConv1dParams conv_params(const at::Tensor& x, const at::Tensor& weight32, const OptTensor& bias32,
                               const OptTensor& seq_idx, const OptTensor& initial_states, bool silu) {
  CausalConv1dParams p;
  p.dtype = kernel_dtype(x.scalar_type());
  p.batch = x.size(0);
  p.dim = x.size(1);
  p.seqlen = x.size(2);
  p.width = static_cast<int>(weight32.size(1));
  p.silu = silu;
  p.x = x.data_ptr();
  p.x_strides = strides(x);
  p.weight = weight32.data_ptr<float>();
  p.bias = present(bias32) ? bias32->data_ptr<float>() : nullptr;
  if (present(seq_idx)) {
    p.seq_idx = seq_idx->data_ptr<int32_t>();
    p.seq_idx_batch_stride = seq_idx->stride(0);
    p.seq_idx_time_stride = seq_idx->stride(1);
  }
  if (present(initial_states)) {
    p.initial_states = initial_states->data_ptr();
    p.initial_strides = strides(*initial_states);
  }
  return p;
}

OptTensor bias_as_float(const OptTensor& bias) { return present(bias) ? OptTensor(as_float(*bias)) : std::nullopt; }

std::tuple<at::Tensor, at::Tensor> fwd_cuda(const at::Tensor& x, const at::Tensor& weight, const OptTensor& bias,
                                            const OptTensor& seq_idx, const OptTensor& initial_states,
                                            bool return_final_states, bool silu) {
  check_conv(x, weight, bias, seq_idx, initial_states);
  if (!has_kernels(x.scalar_type())) {
    return composite::causal_conv1d_fwd(x, weight, bias, seq_idx, initial_states, return_final_states, silu);
  }
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor weight32 = as_float(weight);
  const OptTensor bias32 = bias_as_float(bias);
  CausalConv1dParams p = conv_params(x, weight32, bias32, seq_idx, initial_states, silu);
  at::Tensor y = at::empty_like(x);
  at::Tensor final_states = return_final_states ? at::empty({x.size(0), x.size(1), weight.size(1) - 1}, x.options())
                                                : x.new_empty({0});
  p.y = y.data_ptr();
  p.y_strides = strides(y);
  if (return_final_states) {
    p.final_states = final_states.data_ptr();
    p.final_strides = strides(final_states);
  }
  check_status(run_causal_conv1d_fwd(p, c10::cuda::getCurrentCUDAStream()), "causal_conv1d_fwd");
  return {y, final_states};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bwd_cuda(
    const at::Tensor& x, const at::Tensor& weight, const OptTensor& bias, const OptTensor& seq_idx,
    const OptTensor& initial_states, const at::Tensor& dy, const OptTensor& dfinal_in, bool silu,
    std::array<bool, 4> mask) {
  check_conv(x, weight, bias, seq_idx, initial_states);
  check_dy(dy, x);
  const OptTensor dfinal = final_grad(dfinal_in, x, weight.size(1));
  if (!has_kernels(x.scalar_type())) {
    return composite::causal_conv1d_bwd(x, weight, bias, seq_idx, initial_states, dy, dfinal, silu, mask);
  }
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor weight32 = as_float(weight);
  const OptTensor bias32 = bias_as_float(bias);
  const CausalConv1dParams p = conv_params(x, weight32, bias32, seq_idx, initial_states, silu);
  const auto none = [&] { return x.new_empty({0}); };  // one per output: outputs must not alias
  const bool want_dbias = mask[2] && present(bias), want_dinit = mask[3] && present(initial_states);
  at::Tensor dx = mask[0] ? at::empty_like(x) : none();
  at::Tensor dweight32 = mask[1] ? at::empty({p.dim, p.width}, weight32.options()) : none();
  at::Tensor dbias32 = want_dbias ? at::empty({p.dim}, weight32.options()) : none();
  at::Tensor dinit = want_dinit ? at::empty({p.batch, p.dim, p.width - 1}, x.options()) : none();
  at::Tensor workspace = mask[1] || want_dbias
                             ? at::empty({causal_conv1d_bwd_workspace_elements(p)}, weight32.options())
                             : none();
  CausalConv1dGrads g;
  g.dy = dy.data_ptr();
  g.dy_strides = strides(dy);
  if (dfinal) {
    g.dfinal_states = dfinal->data_ptr();
    g.dfinal_strides = strides(*dfinal);
  }
  if (mask[0]) {
    g.dx = dx.data_ptr();
    g.dx_strides = strides(dx);
  }
  if (mask[1]) g.dweight = dweight32.data_ptr<float>();
  if (want_dbias) g.dbias = dbias32.data_ptr<float>();
  if (want_dinit) {
    g.dinitial_states = dinit.data_ptr();
    g.dinitial_strides = strides(dinit);
  }
  if (workspace.numel() > 0) g.workspace = workspace.data_ptr<float>();
  check_status(run_causal_conv1d_bwd(p, g, c10::cuda::getCurrentCUDAStream()), "causal_conv1d_bwd");
  at::Tensor dweight = mask[1] ? dweight32.to(weight.scalar_type()) : none();
  at::Tensor dbias = want_dbias ? dbias32.to(bias->scalar_type()) : none();
  return {dx, dweight, dbias, dinit};
}

at::Tensor update_cuda(const at::Tensor& x, const at::Tensor& conv_state, const at::Tensor& weight,
                       const OptTensor& bias, bool silu) {
  check_update(x, conv_state, weight, bias);
  if (!has_kernels(x.scalar_type())) return composite::causal_conv1d_update(x, conv_state, weight, bias, silu);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor weight32 = as_float(weight);
  const OptTensor bias32 = bias_as_float(bias);
  at::Tensor y = at::empty_like(x);
  CausalConv1dUpdateParams p;
  p.dtype = kernel_dtype(x.scalar_type());
  p.batch = x.size(0);
  p.dim = x.size(1);
  p.tokens = x.size(2);
  p.state_len = conv_state.size(2);
  p.width = static_cast<int>(weight.size(1));
  p.silu = silu;
  p.x = x.data_ptr();
  p.x_strides = strides(x);
  p.conv_state = conv_state.data_ptr();
  p.state_strides = strides(conv_state);
  p.weight = weight32.data_ptr<float>();
  p.bias = present(bias32) ? bias32->data_ptr<float>() : nullptr;
  p.y = y.data_ptr();
  p.y_strides = strides(y);
  check_status(run_causal_conv1d_update(p, c10::cuda::getCurrentCUDAStream()), "causal_conv1d_update");
  return y;
}

#endif  // SUBQ_WITH_CUDA

}  // namespace

TORCH_LIBRARY_IMPL(subq, CPU, m) {
  m.impl("causal_conv1d_fwd", &fwd_composite);
  m.impl("causal_conv1d_bwd", &bwd_composite);
  m.impl("causal_conv1d_update", &update_composite);
}

// Without the CUDA kernels built, CUDA tensors still work through the ATen composite.
TORCH_LIBRARY_IMPL(subq, CUDA, m) {
#ifdef SUBQ_WITH_CUDA
  m.impl("causal_conv1d_fwd", &fwd_cuda);
  m.impl("causal_conv1d_bwd", &bwd_cuda);
  m.impl("causal_conv1d_update", &update_cuda);
#else
  m.impl("causal_conv1d_fwd", &fwd_composite);
  m.impl("causal_conv1d_bwd", &bwd_composite);
  m.impl("causal_conv1d_update", &update_composite);
#endif
}

}  // namespace subq::glue
