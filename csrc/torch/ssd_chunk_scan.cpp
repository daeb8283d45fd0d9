// Torch glue for the Mamba-2 SSD chunk scan: schemas, argument checks, and the implementations of
// subq::ssd_chunk_scan_fwd/bwd. The ATen composite (csrc/ssd/ssd_chunk_scan_cpu.cpp) serves the CPU and every case
// the CUDA kernels do not take; the fused CUDA forward and backward (csrc/ssd/ssd_chunk_scan.h) run for 16-bit
// inputs only when SUBQ_EXPERIMENTAL_SSD_KERNELS=1: they were written without a GPU, and stay opt-in until their
// tests (tests/test_ssd.py, test_fused_cuda_*) and compute-sanitizer have passed on one.
#include <cmath>

#include <torch/library.h>

#include "ssd/ssd_chunk_scan_cpu.h"
#include "torch/checks.h"
#include "torch/experimental_flags.h"

#ifdef SUBQ_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "ssd/ssd_chunk_scan.h"
#include "torch/cuda_status_check.h"
#include "torch/kernel_types.h"
#endif

namespace subq::glue {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

composite::SsdOptions make_options(int64_t chunk_size, bool dt_softplus, double dt_min, double dt_max) {
  // Which sizes the op takes is subq.ops.ssd's rule (CHUNK_SIZES, an int argument); the glue only keeps the
  // composite's chunk arithmetic defined, and the fused kernels refuse sizes they were not built for.
  TORCH_CHECK(chunk_size >= 1, "chunk_size must be >= 1, got ", chunk_size);
  TORCH_CHECK(dt_min >= 0 && dt_min <= dt_max, "dt_limit must be (lo, hi) with 0 <= lo <= hi, got (", dt_min,
              ", ", dt_max, ")");
  composite::SsdOptions opt;
  opt.chunk_size = chunk_size;
  opt.dt_softplus = dt_softplus;
  opt.dt_min = dt_min;
  opt.dt_max = dt_max;
  opt.has_dt_limit = !(dt_min == 0.0 && std::isinf(dt_max));
  return opt;
}

// A check on tensor values without a host sync: on CUDA a failure is a device-side assertion (the sticky error
// ends the process's CUDA context, but loudly and at the bad call); on the CPU it raises at once.
void assert_values(const Tensor& ok, c10::string_view message) { at::_assert_async(ok, message); }

void check_optional(const OptTensor& t, const Tensor& x, const char* name, at::IntArrayRef shape) {
  if (!t) return;
  check_floating(*t, name);
  TORCH_CHECK(t->device() == x.device(), name, " is on ", t->device(), " but x is on ", x.device());
  TORCH_CHECK(t->sizes() == shape, name, " must have shape ", shape, ", got ", t->sizes());
}

composite::SsdInputs check_inputs(const Tensor& x, const Tensor& dt, const Tensor& A, const Tensor& B, const Tensor& C,
                            const OptTensor& D, const OptTensor& z, const OptTensor& dt_bias,
                            const OptTensor& initial_states, const OptTensor& seq_idx) {
  check_dim(x, 4, "x");
  check_floating(x, "x");
  const int64_t b = x.size(0), L = x.size(1), H = x.size(2), P = x.size(3);
  check_dim(B, 4, "B");
  check_same(B, x, "B", "x");
  check_same(C, x, "C", "x");
  const int64_t G = B.size(2), N = B.size(3);
  TORCH_CHECK(B.size(0) == b && B.size(1) == L, "B must have shape (batch, seqlen, ngroups, dstate) = (", b, ", ",
              L, ", G, N), got ", B.sizes());
  TORCH_CHECK(G > 0 && H % G == 0, "B's ngroups (", G, ") must divide the number of heads of x (", H, ")");
  TORCH_CHECK(C.sizes() == B.sizes(), "C must have B's shape ", B.sizes(), ", got ", C.sizes());
  check_optional(dt, x, "dt", {b, L, H});
  check_optional(A, x, "A", {H});
  if (D) check_optional(D, x, "D", D->dim() == 1 ? at::IntArrayRef{H} : at::IntArrayRef{H, P});
  check_optional(z, x, "z", x.sizes());
  check_optional(dt_bias, x, "dt_bias", {H});
  check_optional(initial_states, x, "initial_states", {b, H, P, N});
  if (seq_idx) {
    TORCH_CHECK(seq_idx->scalar_type() == at::kInt || seq_idx->scalar_type() == at::kLong,
                "seq_idx must be int32 or int64, got ", seq_idx->scalar_type());
    TORCH_CHECK(seq_idx->sizes() == at::IntArrayRef({b, L}), "seq_idx must have shape (", b, ", ", L, "), got ",
                seq_idx->sizes());
    TORCH_CHECK(seq_idx->device() == x.device(), "seq_idx is on ", seq_idx->device(), " but x is on ", x.device());
    // A sequence must be one run of positions: the chunked scan only resets where the index changes, so an index
    // that comes back (0, 1, 0) would silently continue the first sequence's state.
    if (L > 1) {
      assert_values((seq_idx->narrow(1, 1, L - 1) >= seq_idx->narrow(1, 0, L - 1)).all(),
                    "seq_idx must be non-decreasing along seqlen (each sequence one run of positions)");
    }
  }
  return {x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx};
}

std::tuple<Tensor, Tensor, Tensor> ssd_chunk_scan_fwd(const Tensor& x, const Tensor& dt, const Tensor& A,
                                                      const Tensor& B, const Tensor& C, const OptTensor& D,
                                                      const OptTensor& z, const OptTensor& dt_bias,
                                                      const OptTensor& initial_states, const OptTensor& seq_idx,
                                                      const OptTensor& cu_seqlens, int64_t chunk_size,
                                                      bool dt_softplus, double dt_min, double dt_max) {
  auto in = check_inputs(x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx);
  if (cu_seqlens) {
    TORCH_CHECK(cu_seqlens->dim() == 1 && cu_seqlens->size(0) >= 2, "cu_seqlens must be 1-D with at least 2 "
                "entries (0, len_1, len_1+len_2, ...), got shape ", cu_seqlens->sizes());
    TORCH_CHECK(x.size(0) == 1, "cu_seqlens needs the packed sequences in one batch row, got batch ", x.size(0));
    TORCH_CHECK(cu_seqlens->scalar_type() == at::kInt || cu_seqlens->scalar_type() == at::kLong,
                "cu_seqlens must be int32 or int64, got ", cu_seqlens->scalar_type());
    TORCH_CHECK(cu_seqlens->device() == x.device(), "cu_seqlens is on ", cu_seqlens->device(), " but x is on ",
                x.device());
    const int64_t S = cu_seqlens->size(0) - 1;
    const Tensor& cu = *cu_seqlens;
    // Ending before seqlen is allowed: the padded tail is one more sequence, whose state is not returned.
    assert_values((cu[0] == 0).logical_and(cu[S] <= x.size(1))
                      .logical_and((cu.narrow(0, 1, S) >= cu.narrow(0, 0, S)).all()),
                  "cu_seqlens must start at 0, never decrease, and end at most at x's seqlen");
  }
  auto opt = make_options(chunk_size, dt_softplus, dt_min, dt_max);
#ifdef SUBQ_WITH_CUDA
  const c10::OptionalDeviceGuard guard(x.device());
#endif
  return composite::ssd_chunk_scan_fwd(in, cu_seqlens, opt);
}

#ifdef SUBQ_WITH_CUDA
bool fused_kernels_enabled() { return experimental_enabled(Experimental::kSsdKernels); }

// The kernels' operand layouts: dense 16-bit x, B, C, z; float32 dt and parameters; int32 seq_idx.
struct DenseInputs {
  Tensor x, dt, A, B, C, D, z, dt_bias, init, seq;
};

DenseInputs dense_inputs(const composite::SsdInputs& in) {
  auto f32 = [](const Tensor& t) { return t.to(at::kFloat).contiguous(); };
  DenseInputs t;
  t.x = in.x.contiguous(), t.B = in.B.contiguous(), t.C = in.C.contiguous();
  t.dt = f32(in.dt), t.A = f32(in.A);
  t.D = in.D ? f32(*in.D) : Tensor(), t.dt_bias = in.dt_bias ? f32(*in.dt_bias) : Tensor();
  t.z = in.z ? in.z->contiguous() : Tensor();
  t.init = in.initial_states ? f32(*in.initial_states) : Tensor();
  t.seq = in.seq_idx ? in.seq_idx->to(at::kInt).contiguous() : Tensor();
  return t;
}

// The forward's params (the backward's too, with an SsdChunkScanGrads); outputs and workspace are left to the
// forward.
SsdChunkScanParams params_of(const DenseInputs& t, const composite::SsdOptions& opt) {
  SsdChunkScanParams p;
  p.dtype = kernel_dtype(t.x.scalar_type());
  p.shape = {t.x.size(0), t.x.size(1), t.x.size(2), t.x.size(3), t.B.size(2), t.B.size(3), opt.chunk_size};
  p.dt_softplus = opt.dt_softplus;
  p.has_dt_limit = opt.has_dt_limit;
  p.dt_lo = static_cast<float>(opt.dt_min);
  p.dt_hi = static_cast<float>(opt.dt_max);
  p.x = t.x.data_ptr();
  p.dt = t.dt.data_ptr<float>();
  p.A = t.A.data_ptr<float>();
  p.B = t.B.data_ptr();
  p.C = t.C.data_ptr();
  p.D = t.D.defined() ? t.D.data_ptr<float>() : nullptr;
  p.D_per_channel = t.D.defined() && t.D.dim() == 2;
  p.z = t.z.defined() ? t.z.data_ptr() : nullptr;
  p.dt_bias = t.dt_bias.defined() ? t.dt_bias.data_ptr<float>() : nullptr;
  p.initial_states = t.init.defined() ? t.init.data_ptr<float>() : nullptr;
  p.seq_idx = t.seq.defined() ? t.seq.data_ptr<int32_t>() : nullptr;
  return p;
}

// The tensor-core forward.
std::tuple<Tensor, Tensor, Tensor> fused_forward(const composite::SsdInputs& in, const composite::SsdOptions& opt) {
  const c10::cuda::CUDAGuard guard(in.x.device());
  const DenseInputs t = dense_inputs(in);
  const Tensor &x = t.x, &B = t.B;
  SsdChunkScanParams p = params_of(t, opt);
  Tensor y = at::empty_like(x);
  Tensor final_states = at::empty({x.size(0), x.size(2), x.size(3), B.size(3)}, x.options().dtype(at::kFloat));
  Tensor workspace = at::empty({static_cast<int64_t>(ssd_chunk_scan_fwd_workspace_bytes(p.shape))},
                               x.options().dtype(at::kByte));
  p.y = y.data_ptr();
  p.final_states = final_states.data_ptr<float>();
  p.workspace = workspace.data_ptr();
  const Status status = run_ssd_chunk_scan_fwd(p, c10::cuda::getCurrentCUDAStream().stream());
  check_cuda_status(status, "subq ssd_chunk_scan CUDA forward");
  return {y, final_states, at::empty({0, x.size(2), x.size(3), B.size(3)}, final_states.options())};
}

std::tuple<Tensor, Tensor, Tensor> ssd_chunk_scan_fwd_cuda(const Tensor& x, const Tensor& dt, const Tensor& A,
                                                           const Tensor& B, const Tensor& C, const OptTensor& D,
                                                           const OptTensor& z, const OptTensor& dt_bias,
                                                           const OptTensor& initial_states, const OptTensor& seq_idx,
                                                           const OptTensor& cu_seqlens, int64_t chunk_size,
                                                           bool dt_softplus, double dt_min, double dt_max) {
  const bool half = x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16;
  if (fused_kernels_enabled() && half && !cu_seqlens && x.numel() > 0) {
    auto in = check_inputs(x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx);
    return fused_forward(in, make_options(chunk_size, dt_softplus, dt_min, dt_max));
  }
  return ssd_chunk_scan_fwd(x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, cu_seqlens, chunk_size,
                            dt_softplus, dt_min, dt_max);
}
#endif

void check_backward_inputs(const Tensor& dy, const OptTensor& dfinal_states, const Tensor& x, const Tensor& B) {
  TORCH_CHECK(dy.sizes() == x.sizes(), "dy must have x's shape ", x.sizes(), ", got ", dy.sizes());
  if (dfinal_states) {
    TORCH_CHECK(dfinal_states->sizes() == at::IntArrayRef({x.size(0), x.size(2), x.size(3), B.size(3)}),
                "dfinal_states must have shape (batch, nheads, headdim, dstate), got ", dfinal_states->sizes());
  }
}

std::vector<Tensor> ssd_chunk_scan_bwd(const Tensor& dy, const OptTensor& dfinal_states, const Tensor& x,
                                       const Tensor& dt, const Tensor& A, const Tensor& B, const Tensor& C,
                                       const OptTensor& D, const OptTensor& z, const OptTensor& dt_bias,
                                       const OptTensor& initial_states, const OptTensor& seq_idx, int64_t chunk_size,
                                       bool dt_softplus, double dt_min, double dt_max) {
  auto in = check_inputs(x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx);
  check_backward_inputs(dy, dfinal_states, x, B);
  auto opt = make_options(chunk_size, dt_softplus, dt_min, dt_max);
#ifdef SUBQ_WITH_CUDA
  const c10::OptionalDeviceGuard guard(x.device());
#endif
  return composite::ssd_chunk_scan_bwd(dy, dfinal_states, in, opt);
}


#ifdef SUBQ_WITH_CUDA
// The tensor-core backward: the forward's operand layouts (see fused_forward), dy in x's dtype, float32 dfinal_states.
// Gradients come back in their inputs' dtypes, as the composite returns them.
std::vector<Tensor> fused_backward(const Tensor& dy, const OptTensor& dfinal_states, const composite::SsdInputs& in,
                                   const composite::SsdOptions& opt) {
  const c10::cuda::CUDAGuard guard(in.x.device());
  const DenseInputs t = dense_inputs(in);
  const Tensor &x = t.x, &B = t.B, &C = t.C, &dt = t.dt, &A = t.A, &D = t.D, &z = t.z, &dt_bias = t.dt_bias,
               &init = t.init;
  const Tensor g_out = dy.to(x.scalar_type()).contiguous();
  const Tensor dfinal = dfinal_states ? dfinal_states->to(at::kFloat).contiguous() : Tensor();

  const SsdChunkScanParams p = params_of(t, opt);
  auto f32_like = [](const Tensor& t) { return at::empty(t.sizes(), t.options().dtype(at::kFloat)); };
  Tensor dx = at::empty_like(x), dB = at::empty_like(B), dC = at::empty_like(C);
  Tensor ddt = f32_like(dt), dA = f32_like(A);
  Tensor dD = D.defined() ? f32_like(D) : Tensor(), dz = z.defined() ? at::empty_like(z) : Tensor();
  Tensor ddt_bias = dt_bias.defined() ? f32_like(dt_bias) : Tensor();
  Tensor dinit = init.defined() ? f32_like(init) : Tensor();
  Tensor workspace = at::empty({static_cast<int64_t>(ssd_chunk_scan_bwd_workspace_bytes(p.shape))},
                               x.options().dtype(at::kByte));
  SsdChunkScanGrads g;
  g.dy = g_out.data_ptr();
  g.dfinal_states = dfinal.defined() ? dfinal.data_ptr<float>() : nullptr;
  g.dx = dx.data_ptr();
  g.ddt = ddt.data_ptr<float>();
  g.dA = dA.data_ptr<float>();
  g.dB = dB.data_ptr();
  g.dC = dC.data_ptr();
  g.dD = dD.defined() ? dD.data_ptr<float>() : nullptr;
  g.dz = dz.defined() ? dz.data_ptr() : nullptr;
  g.ddt_bias = ddt_bias.defined() ? ddt_bias.data_ptr<float>() : nullptr;
  g.dinitial_states = dinit.defined() ? dinit.data_ptr<float>() : nullptr;
  g.workspace = workspace.data_ptr();
  const Status status = run_ssd_chunk_scan_bwd(p, g, c10::cuda::getCurrentCUDAStream().stream());
  check_cuda_status(status, "subq ssd_chunk_scan CUDA backward");

  auto like = [&](const std::optional<Tensor>& input, const Tensor& grad) {
    return input ? grad.to(input->scalar_type()) : x.new_empty({0});
  };
  return {dx, ddt.to(in.dt.scalar_type()), dA.to(in.A.scalar_type()), dB, dC, like(in.D, dD), like(in.z, dz),
          like(in.dt_bias, ddt_bias), like(in.initial_states, dinit)};
}

std::vector<Tensor> ssd_chunk_scan_bwd_cuda(const Tensor& dy, const OptTensor& dfinal_states, const Tensor& x,
                                            const Tensor& dt, const Tensor& A, const Tensor& B, const Tensor& C,
                                            const OptTensor& D, const OptTensor& z, const OptTensor& dt_bias,
                                            const OptTensor& initial_states, const OptTensor& seq_idx,
                                            int64_t chunk_size, bool dt_softplus, double dt_min, double dt_max) {
  const bool half = x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16;
  if (fused_kernels_enabled() && half && x.numel() > 0) {
    auto in = check_inputs(x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx);
    check_backward_inputs(dy, dfinal_states, x, B);
    return fused_backward(dy, dfinal_states, in, make_options(chunk_size, dt_softplus, dt_min, dt_max));
  }
  return ssd_chunk_scan_bwd(dy, dfinal_states, x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, chunk_size,
                            dt_softplus, dt_min, dt_max);
}
#endif
}  // namespace

TORCH_LIBRARY_FRAGMENT(subq, m) {
  m.def("ssd_chunk_scan_fwd(Tensor x, Tensor dt, Tensor A, Tensor B, Tensor C, Tensor? D, Tensor? z, "
        "Tensor? dt_bias, Tensor? initial_states, Tensor? seq_idx, Tensor? cu_seqlens, int chunk_size, "
        "bool dt_softplus, float dt_min, float dt_max) -> (Tensor, Tensor, Tensor)");
  m.def("ssd_chunk_scan_bwd(Tensor dy, Tensor? dfinal_states, Tensor x, Tensor dt, Tensor A, Tensor B, Tensor C, "
        "Tensor? D, Tensor? z, Tensor? dt_bias, Tensor? initial_states, Tensor? seq_idx, int chunk_size, "
        "bool dt_softplus, float dt_min, float dt_max) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(subq, CPU, m) {
  m.impl("ssd_chunk_scan_fwd", &ssd_chunk_scan_fwd);
  m.impl("ssd_chunk_scan_bwd", &ssd_chunk_scan_bwd);
}

TORCH_LIBRARY_IMPL(subq, CUDA, m) {
#ifdef SUBQ_WITH_CUDA
  m.impl("ssd_chunk_scan_fwd", &ssd_chunk_scan_fwd_cuda);
  m.impl("ssd_chunk_scan_bwd", &ssd_chunk_scan_bwd_cuda);
#else
  m.impl("ssd_chunk_scan_fwd", &ssd_chunk_scan_fwd);
  m.impl("ssd_chunk_scan_bwd", &ssd_chunk_scan_bwd);
#endif
}

}  // namespace subq::glue
