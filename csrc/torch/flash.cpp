// Torch glue for FLASH: schemas, argument checks, and the implementations of subq::flash_chunk_attention_fwd/bwd,
// subq::gau_attention_fwd/bwd and subq::flash_step. The ATen composites (csrc/flash/flash_cpu.cpp) serve
// both devices; the fused CUDA forward and backward of flash_chunk_attention (csrc/flash/flash_chunk_attention.h) run
// for 16-bit inputs when SUBQ_EXPERIMENTAL_FLASH_KERNELS=1.
#include <algorithm>
#include <array>
#include <utility>

#include <torch/library.h>

#include "flash/flash_cpu.h"
#include "torch/checks.h"
#include "torch/experimental_flags.h"

#ifdef SUBQ_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "flash/flash_chunk_attention.h"
#include "torch/cuda_status_check.h"
#include "torch/kernel_types.h"
#endif

namespace subq::glue {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

void check_features(const Tensor& t, const Tensor& v, const Tensor& ref, const char* name, const char* ref_name) {
  check_dim(t, 3, name);
  check_same(t, v, name, "v");
  TORCH_CHECK(t.sizes() == ref.sizes(), name, " must have ", ref_name, "'s shape ", ref.sizes(), ", got ",
              t.sizes());
}

void check_values(const Tensor& v, const Tensor& q, const OptTensor& u) {
  check_dim(v, 3, "v");
  check_floating(v, "v");
  TORCH_CHECK(v.size(0) == q.size(0) && v.size(1) == q.size(1), "v must have shape (batch, seqlen, E) = (",
              q.size(0), ", ", q.size(1), ", E), got ", v.sizes());
  if (u) {
    check_same(*u, v, "u", "v");
    TORCH_CHECK(u->sizes() == v.sizes(), "u must have v's shape ", v.sizes(), ", got ", u->sizes());
  }
}

void check_rel_bias(const OptTensor& rel_bias, const Tensor& v, int64_t length, const char* what) {
  if (!rel_bias) return;
  check_floating(*rel_bias, "rel_bias");
  TORCH_CHECK(rel_bias->scalar_type() == v.scalar_type() || rel_bias->scalar_type() == at::kFloat,
              "rel_bias.dtype must be v's dtype or float32, got ", rel_bias->scalar_type());
  TORCH_CHECK(rel_bias->device() == v.device(), "rel_bias is on ", rel_bias->device(), " but v is on ", v.device());
  TORCH_CHECK(rel_bias->dim() == 1 && rel_bias->size(0) == length, "rel_bias must have shape (", length, ",) (",
              what, "), got ", rel_bias->sizes());
}

composite::FlashChunkInputs check_chunk_inputs(const Tensor& q_quad, const Tensor& k_quad, const Tensor& q_lin,
                                         const Tensor& k_lin, const Tensor& v, const OptTensor& u,
                                         const OptTensor& rel_bias, int64_t chunk_size) {
  // Which sizes the op takes is subq.ops.flash's rule (CHUNK_SIZES, an int argument); the glue only keeps the
  // composite's chunk arithmetic defined, and the fused kernels refuse sizes they were not built for.
  TORCH_CHECK(chunk_size >= 1, "chunk_size must be >= 1, got ", chunk_size);
  check_dim(q_quad, 3, "q_quad");
  check_values(v, q_quad, u);
  check_features(q_quad, v, q_quad, "q_quad", "q_quad");
  check_features(k_quad, v, q_quad, "k_quad", "q_quad");
  check_features(q_lin, v, q_quad, "q_lin", "q_quad");
  check_features(k_lin, v, q_quad, "k_lin", "q_quad");
  check_rel_bias(rel_bias, v, 2 * chunk_size - 1, "2 * chunk_size - 1");
  return {q_quad, k_quad, q_lin, k_lin, v, u, rel_bias};
}

composite::FlashChunkOptions chunk_options(int64_t chunk_size, bool causal, double quad_scale, double lin_scale) {
  return {chunk_size, causal, quad_scale, lin_scale};
}

composite::GauInputs check_gau_inputs(const Tensor& q, const Tensor& k, const Tensor& v, const OptTensor& u,
                                const OptTensor& rel_bias) {
  check_dim(q, 3, "q");
  check_values(v, q, u);
  check_features(q, v, q, "q", "q");
  check_features(k, v, q, "k", "q");
  check_rel_bias(rel_bias, v, std::max<int64_t>(2 * q.size(1) - 1, 0), "2 * seqlen - 1");
  return {q, k, v, u, rel_bias};
}

Tensor flash_chunk_attention_fwd(const Tensor& q_quad, const Tensor& k_quad, const Tensor& q_lin,
                                 const Tensor& k_lin, const Tensor& v, const OptTensor& u, const OptTensor& rel_bias,
                                 int64_t chunk_size, bool causal, double quad_scale, double lin_scale) {
  auto in = check_chunk_inputs(q_quad, k_quad, q_lin, k_lin, v, u, rel_bias, chunk_size);
#ifdef SUBQ_WITH_CUDA
  const c10::OptionalDeviceGuard guard(v.device());
#endif
  return composite::flash_chunk_attention_fwd(in, chunk_options(chunk_size, causal, quad_scale, lin_scale));
}

#ifdef SUBQ_WITH_CUDA
// Opt-in: the fused kernels were written and compiled without a GPU, so the composite stays the default until the
// GPU tests (tests/test_flash.py::test_fused_cuda_forward and test_fused_cuda_backward) have passed on one.
bool fused_kernels_enabled() { return experimental_enabled(Experimental::kFlashKernels); }

// The shapes and dtypes the kernels take (csrc/flash/flash_chunk_attention.h); the composite serves the rest.
bool fused_kernels_take(const composite::FlashChunkInputs& in) {
  const auto dtype = in.v.scalar_type();
  const int64_t S = in.q_quad.size(2), E = in.v.size(2);
  return (dtype == at::kHalf || dtype == at::kBFloat16) && in.v.numel() > 0 && S >= 1 && S <= 256 && E <= 4096 &&
         in.v.size(0) <= 65535;
}

// The inputs as the kernels read them: dense 16-bit features, values and gate; the bias as float32.
struct DenseInputs {
  Tensor q_quad, k_quad, q_lin, k_lin, v, u, rel_bias;  // u, rel_bias undefined when absent
};

DenseInputs dense_inputs(const composite::FlashChunkInputs& in) {
  return {in.q_quad.contiguous(), in.k_quad.contiguous(), in.q_lin.contiguous(), in.k_lin.contiguous(),
          in.v.contiguous(), in.u ? in.u->contiguous() : Tensor(),
          in.rel_bias ? in.rel_bias->to(at::kFloat).contiguous() : Tensor()};
}

// The forward's params (the backward's too, with a FlashChunkGrads); out and workspace are left to the forward.
FlashChunkParams params_of(const DenseInputs& in, const composite::FlashChunkOptions& opt) {
  FlashChunkParams p;
  p.dtype = kernel_dtype(in.v.scalar_type());
  p.shape = {in.v.size(0), in.v.size(1), in.q_quad.size(2), in.v.size(2), opt.chunk_size};
  p.causal = opt.causal;
  p.quad_scale = static_cast<float>(opt.quad_scale);
  p.lin_scale = static_cast<float>(opt.lin_scale);
  p.q_quad = in.q_quad.data_ptr();
  p.k_quad = in.k_quad.data_ptr();
  p.q_lin = in.q_lin.data_ptr();
  p.k_lin = in.k_lin.data_ptr();
  p.v = in.v.data_ptr();
  p.u = in.u.defined() ? in.u.data_ptr() : nullptr;
  p.rel_bias = in.rel_bias.defined() ? in.rel_bias.data_ptr<float>() : nullptr;
  return p;
}

Tensor workspace(size_t bytes, const Tensor& like) {
  return at::empty({static_cast<int64_t>(bytes)}, like.options().dtype(at::kByte));
}

Tensor fused_forward(const composite::FlashChunkInputs& inputs, const composite::FlashChunkOptions& opt) {
  const c10::cuda::CUDAGuard guard(inputs.v.device());
  const DenseInputs in = dense_inputs(inputs);
  FlashChunkParams p = params_of(in, opt);
  Tensor out = at::empty(in.v.sizes(), in.v.options());
  Tensor ws = workspace(flash_chunk_attention_fwd_workspace_bytes(p.shape), in.v);
  p.out = out.data_ptr();
  p.workspace = ws.data_ptr();
  const Status status = run_flash_chunk_attention_fwd(p, c10::cuda::getCurrentCUDAStream().stream());
  check_cuda_status(status, "subq flash_chunk_attention CUDA forward");
  return out;
}

// The composite's gradients (same order, dtypes and empty tensors for absent inputs) from the fused backward.
std::vector<Tensor> fused_backward(const Tensor& dout, const composite::FlashChunkInputs& inputs,
                                   const composite::FlashChunkOptions& opt) {
  const c10::cuda::CUDAGuard guard(inputs.v.device());
  TORCH_CHECK(dout.device() == inputs.v.device(), "dout is on ", dout.device(), " but v is on ", inputs.v.device());
  const DenseInputs in = dense_inputs(inputs);
  const Tensor d_out = dout.to(in.v.scalar_type()).contiguous();
  const FlashChunkParams p = params_of(in, opt);
  Tensor dq_quad = at::empty_like(in.q_quad), dk_quad = at::empty_like(in.k_quad);
  Tensor dq_lin = at::empty_like(in.q_lin), dk_lin = at::empty_like(in.k_lin), dv = at::empty_like(in.v);
  Tensor du = in.u.defined() ? at::empty_like(in.u) : in.v.new_empty({0});
  Tensor drel_bias = in.rel_bias.defined() ? at::empty_like(in.rel_bias) : in.v.new_empty({0});
  Tensor ws = workspace(flash_chunk_attention_bwd_workspace_bytes(p.shape), in.v);
  FlashChunkGrads g;
  g.dout = d_out.data_ptr();
  g.dq_quad = dq_quad.data_ptr();
  g.dk_quad = dk_quad.data_ptr();
  g.dq_lin = dq_lin.data_ptr();
  g.dk_lin = dk_lin.data_ptr();
  g.dv = dv.data_ptr();
  g.du = in.u.defined() ? du.data_ptr() : nullptr;
  g.drel_bias = in.rel_bias.defined() ? drel_bias.data_ptr<float>() : nullptr;
  g.workspace = ws.data_ptr();
  const Status status = run_flash_chunk_attention_bwd(p, g, c10::cuda::getCurrentCUDAStream().stream());
  check_cuda_status(status, "subq flash_chunk_attention CUDA backward");
  if (inputs.rel_bias) drel_bias = drel_bias.to(inputs.rel_bias->scalar_type());
  return {dq_quad, dk_quad, dq_lin, dk_lin, dv, du, drel_bias};
}

Tensor flash_chunk_attention_fwd_cuda(const Tensor& q_quad, const Tensor& k_quad, const Tensor& q_lin,
                                      const Tensor& k_lin, const Tensor& v, const OptTensor& u,
                                      const OptTensor& rel_bias, int64_t chunk_size, bool causal, double quad_scale,
                                      double lin_scale) {
  if (fused_kernels_enabled()) {
    auto in = check_chunk_inputs(q_quad, k_quad, q_lin, k_lin, v, u, rel_bias, chunk_size);
    if (fused_kernels_take(in)) return fused_forward(in, chunk_options(chunk_size, causal, quad_scale, lin_scale));
  }
  return flash_chunk_attention_fwd(q_quad, k_quad, q_lin, k_lin, v, u, rel_bias, chunk_size, causal, quad_scale,
                                   lin_scale);
}
#endif

std::vector<Tensor> flash_chunk_attention_bwd(const Tensor& dout, const Tensor& q_quad, const Tensor& k_quad,
                                              const Tensor& q_lin, const Tensor& k_lin, const Tensor& v,
                                              const OptTensor& u, const OptTensor& rel_bias, int64_t chunk_size,
                                              bool causal, double quad_scale, double lin_scale) {
  auto in = check_chunk_inputs(q_quad, k_quad, q_lin, k_lin, v, u, rel_bias, chunk_size);
  TORCH_CHECK(dout.sizes() == v.sizes(), "dout must have v's shape ", v.sizes(), ", got ", dout.sizes());
#ifdef SUBQ_WITH_CUDA
  const c10::OptionalDeviceGuard guard(v.device());
#endif
  return composite::flash_chunk_attention_bwd(dout, in, chunk_options(chunk_size, causal, quad_scale, lin_scale));
}

#ifdef SUBQ_WITH_CUDA
std::vector<Tensor> flash_chunk_attention_bwd_cuda(const Tensor& dout, const Tensor& q_quad, const Tensor& k_quad,
                                                   const Tensor& q_lin, const Tensor& k_lin, const Tensor& v,
                                                   const OptTensor& u, const OptTensor& rel_bias, int64_t chunk_size,
                                                   bool causal, double quad_scale, double lin_scale) {
  if (fused_kernels_enabled()) {
    auto in = check_chunk_inputs(q_quad, k_quad, q_lin, k_lin, v, u, rel_bias, chunk_size);
    TORCH_CHECK(dout.sizes() == v.sizes(), "dout must have v's shape ", v.sizes(), ", got ", dout.sizes());
    if (fused_kernels_take(in)) {
      return fused_backward(dout, in, chunk_options(chunk_size, causal, quad_scale, lin_scale));
    }
  }
  return flash_chunk_attention_bwd(dout, q_quad, k_quad, q_lin, k_lin, v, u, rel_bias, chunk_size, causal,
                                   quad_scale, lin_scale);
}
#endif

Tensor gau_attention_fwd(const Tensor& q, const Tensor& k, const Tensor& v, const OptTensor& u,
                         const OptTensor& rel_bias, bool causal, double scale) {
  auto in = check_gau_inputs(q, k, v, u, rel_bias);
#ifdef SUBQ_WITH_CUDA
  const c10::OptionalDeviceGuard guard(v.device());
#endif
  return composite::gau_attention_fwd(in, {causal, scale});
}

std::vector<Tensor> gau_attention_bwd(const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v,
                                      const OptTensor& u, const OptTensor& rel_bias, bool causal, double scale) {
  auto in = check_gau_inputs(q, k, v, u, rel_bias);
  TORCH_CHECK(dout.sizes() == v.sizes(), "dout must have v's shape ", v.sizes(), ", got ", dout.sizes());
#ifdef SUBQ_WITH_CUDA
  const c10::OptionalDeviceGuard guard(v.device());
#endif
  return composite::gau_attention_bwd(dout, in, {causal, scale});
}

void check_state(const Tensor& t, const Tensor& v, const char* name, at::IntArrayRef shape) {
  const auto ct = v.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(t.scalar_type() == ct, name, ".dtype must be ", ct, " (the compute dtype of v), got ",
              t.scalar_type());
  TORCH_CHECK(t.device() == v.device(), name, " is on ", t.device(), " but v is on ", v.device());
  TORCH_CHECK(t.sizes() == shape, name, " must have shape ", shape, ", got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

Tensor flash_step(const Tensor& q_quad, const Tensor& k_quad, const Tensor& q_lin, const Tensor& k_lin,
                  const Tensor& v, const OptTensor& u, const OptTensor& rel_bias, const Tensor& lin_state,
                  const Tensor& chunk_kv, const Tensor& k_quad_cache, const Tensor& v_cache, int64_t position, double quad_scale, double lin_scale) {
  check_dim(q_quad, 2, "q_quad");
  check_dim(v, 2, "v");
  check_floating(v, "v");
  const int64_t b = q_quad.size(0), S = q_quad.size(1), E = v.size(1);
  TORCH_CHECK(v.size(0) == b, "v must have shape (batch, E) with batch ", b, ", got ", v.sizes());
  const std::array<std::pair<const Tensor*, const char*>, 4> features{
      {{&q_quad, "q_quad"}, {&k_quad, "k_quad"}, {&q_lin, "q_lin"}, {&k_lin, "k_lin"}}};
  for (const auto& [t, name] : features) {
    check_same(*t, v, name, "v");
    TORCH_CHECK(t->sizes() == q_quad.sizes(), name, " must have q_quad's shape ", q_quad.sizes(), ", got ",
                t->sizes());
  }
  if (u) {
    check_same(*u, v, "u", "v");
    TORCH_CHECK(u->sizes() == v.sizes(), "u must have v's shape ", v.sizes(), ", got ", u->sizes());
  }
  // The cache's own rank comes before its chunk size is read from it.
  check_dim(k_quad_cache, 3, "k_quad_cache");
  const int64_t C = k_quad_cache.size(1);
  TORCH_CHECK(C >= 1, "k_quad_cache.shape[1] (the chunk size) must be >= 1, got ", C);  // as for chunk_size above
  check_state(lin_state, v, "lin_state", {b, S, E});
  check_state(chunk_kv, v, "chunk_kv", {b, S, E});
  check_state(k_quad_cache, v, "k_quad_cache", {b, C, S});
  check_state(v_cache, v, "v_cache", {b, C, E});
  // The four states are written in place: each against the inputs and the other states.
  const std::array<NamedTensor, 11> arguments{{{&q_quad, "q_quad"}, {&k_quad, "k_quad"}, {&q_lin, "q_lin"},
                                               {&k_lin, "k_lin"}, {&v, "v"}, named(u, "u"), named(rel_bias, "rel_bias"),
                                               {&lin_state, "lin_state"}, {&chunk_kv, "chunk_kv"},
                                               {&k_quad_cache, "k_quad_cache"}, {&v_cache, "v_cache"}}};
  for (size_t i = 7; i < arguments.size(); ++i) {
    check_written_in_place(*arguments[i].first, arguments[i].second, arguments);
  }
  check_rel_bias(rel_bias, v, 2 * C - 1, "2 * chunk_size - 1");
  TORCH_CHECK(position >= 0, "position must be >= 0, got ", position);
#ifdef SUBQ_WITH_CUDA
  const c10::OptionalDeviceGuard guard(v.device());
#endif
  composite::FlashDecodeState state{lin_state, chunk_kv, k_quad_cache, v_cache, position};
  return composite::flash_step(q_quad, k_quad, q_lin, k_lin, v, u, rel_bias, state, quad_scale, lin_scale);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(subq, m) {
  m.def("flash_chunk_attention_fwd(Tensor q_quad, Tensor k_quad, Tensor q_lin, Tensor k_lin, Tensor v, Tensor? u, "
        "Tensor? rel_bias, int chunk_size, bool causal, float quad_scale, float lin_scale) -> Tensor");
  m.def("flash_chunk_attention_bwd(Tensor dout, Tensor q_quad, Tensor k_quad, Tensor q_lin, Tensor k_lin, "
        "Tensor v, Tensor? u, Tensor? rel_bias, int chunk_size, bool causal, float quad_scale, float lin_scale) "
        "-> Tensor[]");
  m.def("gau_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? u, Tensor? rel_bias, bool causal, float scale) "
        "-> Tensor");
  m.def("gau_attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor? u, Tensor? rel_bias, bool causal, "
        "float scale) -> Tensor[]");
  m.def("flash_step(Tensor q_quad, Tensor k_quad, Tensor q_lin, Tensor k_lin, Tensor v, Tensor? u, "
        "Tensor? rel_bias, Tensor(a!) lin_state, Tensor(b!) chunk_kv, Tensor(c!) k_quad_cache, Tensor(d!) v_cache, "
        "int position, float quad_scale, float lin_scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(subq, CPU, m) {
  m.impl("flash_chunk_attention_fwd", &flash_chunk_attention_fwd);
  m.impl("flash_chunk_attention_bwd", &flash_chunk_attention_bwd);
  m.impl("gau_attention_fwd", &gau_attention_fwd);
  m.impl("gau_attention_bwd", &gau_attention_bwd);
  m.impl("flash_step", &flash_step);
}

TORCH_LIBRARY_IMPL(subq, CUDA, m) {
#ifdef SUBQ_WITH_CUDA
  m.impl("flash_chunk_attention_fwd", &flash_chunk_attention_fwd_cuda);
  m.impl("flash_chunk_attention_bwd", &flash_chunk_attention_bwd_cuda);
#else
  m.impl("flash_chunk_attention_fwd", &flash_chunk_attention_fwd);
  m.impl("flash_chunk_attention_bwd", &flash_chunk_attention_bwd);
#endif
  m.impl("gau_attention_fwd", &gau_attention_fwd);
  m.impl("gau_attention_bwd", &gau_attention_bwd);
  m.impl("flash_step", &flash_step);
}

}  // namespace subq::glue
