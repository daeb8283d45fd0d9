// Torch glue for the Mamba-2 decoding step: schema, argument checks, Params filling, and the CPU / CUDA
// implementations of subq::ssd_step (state updated in place, y returned).
#include <cmath>

#include <torch/library.h>

#include "ssd/ssd_step_cpu.h"
#include "torch/checks.h"

#ifdef SUBQ_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "ssd/ssd_step.h"
#include "torch/cuda_status_check.h"
#include "torch/kernel_types.h"
#include "torch/experimental_flags.h"
#endif

TORCH_LIBRARY_FRAGMENT(subq, m) {
  m.def("ssd_step(Tensor(a!) state, Tensor x, Tensor dt, Tensor A, Tensor B, Tensor C, Tensor? D, Tensor? z,"
        " Tensor? dt_bias, bool dt_softplus, float dt_lo, float dt_hi) -> Tensor");
}

namespace subq::glue {
namespace {

using OptTensor = std::optional<at::Tensor>;

// Parameters of a head (A, D, dt_bias) and the state may be float32 or x's dtype.
void check_fp32_or_like(const at::Tensor& t, const at::Tensor& x, const char* name) {
  TORCH_CHECK(t.scalar_type() == x.scalar_type() || t.scalar_type() == at::kFloat, name, ".dtype must be x.dtype (",
              x.scalar_type(), ") or float32, got ", t.scalar_type());
  TORCH_CHECK(t.device() == x.device(), name, " is on ", t.device(), " but x is on ", x.device());
}

void check_shape(const at::Tensor& t, at::IntArrayRef shape, const char* name, const char* layout) {
  TORCH_CHECK(t.sizes() == shape, name, " must have shape ", layout, " = ", shape, ", got ", t.sizes());
}

void check_ssd_step(const at::Tensor& state, const at::Tensor& x, const at::Tensor& dt, const at::Tensor& A,
                    const at::Tensor& B, const at::Tensor& C, const OptTensor& D, const OptTensor& z,
                    const OptTensor& dt_bias, double dt_lo, double dt_hi) {
  check_dim(x, 3, "x");
  check_floating(x, "x");
  check_dim(state, 4, "state");
  check_dim(B, 3, "B");
  const int64_t batch = x.size(0), heads = x.size(1), head_dim = x.size(2);
  const int64_t groups = B.size(1), state_dim = B.size(2);
  check_fp32_or_like(state, x, "state");
  check_shape(state, {batch, heads, head_dim, state_dim}, "state", "(Bt, H, P, N)");
  check_same(dt, x, "dt", "x");
  check_shape(dt, {batch, heads}, "dt", "(Bt, H)");
  check_fp32_or_like(A, x, "A");
  check_shape(A, {heads}, "A", "(H,)");
  check_same(B, x, "B", "x");
  TORCH_CHECK(B.size(0) == batch && groups >= 1 && heads % groups == 0, "B must be (Bt, G, N) with G dividing H = ",
              heads, ", got shape ", B.sizes());
  check_same(C, x, "C", "x");
  check_shape(C, B.sizes(), "C", "B.shape");
  if (D) {
    check_fp32_or_like(*D, x, "D");
    TORCH_CHECK(D->sizes() == at::IntArrayRef({heads}) || D->sizes() == at::IntArrayRef({heads, head_dim}),
                "D must have shape (H,) or (H, P) = (", heads, ", ", head_dim, "), got ", D->sizes());
  }
  if (z) {
    check_same(*z, x, "z", "x");
    check_shape(*z, x.sizes(), "z", "x.shape");
  }
  if (dt_bias) {
    check_fp32_or_like(*dt_bias, x, "dt_bias");
    check_shape(*dt_bias, {heads}, "dt_bias", "(H,)");
  }
  TORCH_CHECK(!std::isnan(dt_lo) && !std::isnan(dt_hi) && dt_lo <= dt_hi,
              "dt_limit must be (lo, hi) with lo <= hi, got (", dt_lo, ", ", dt_hi, ")");
  check_written_in_place(state, "state", {{&x, "x"}, {&dt, "dt"}, {&A, "A"}, {&B, "B"}, {&C, "C"}, named(D, "D"),
                                          named(z, "z"), named(dt_bias, "dt_bias")});
}

at::Tensor ssd_step_composite(const at::Tensor& state, const at::Tensor& x, const at::Tensor& dt, const at::Tensor& A,
                              const at::Tensor& B, const at::Tensor& C, const OptTensor& D, const OptTensor& z,
                              const OptTensor& dt_bias, bool dt_softplus, double dt_lo, double dt_hi) {
  check_ssd_step(state, x, dt, A, B, C, D, z, dt_bias, dt_lo, dt_hi);
  return composite::ssd_step(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, dt_lo, dt_hi);
}

#ifdef SUBQ_WITH_CUDA

const float* fp32_data(const OptTensor& t, at::Tensor& keep) {
  if (!t) return nullptr;
  keep = t->to(at::kFloat).contiguous();
  return keep.data_ptr<float>();
}

at::Tensor ssd_step_cuda(const at::Tensor& state, const at::Tensor& x, const at::Tensor& dt, const at::Tensor& A,
                         const at::Tensor& B_in, const at::Tensor& C_in, const OptTensor& D, const OptTensor& z,
                         const OptTensor& dt_bias, bool dt_softplus, double dt_lo, double dt_hi) {
  check_ssd_step(state, x, dt, A, B_in, C_in, D, z, dt_bias, dt_lo, dt_hi);
  // The kernel is opt-in until its GPU tests have passed on a GPU (it was written without one).
  if (!has_kernel_dtype(x.scalar_type()) || !experimental_enabled(Experimental::kMamba2Kernels)) {
    return composite::ssd_step(state, x, dt, A, B_in, C_in, D, z, dt_bias, dt_softplus, dt_lo, dt_hi);
  }
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor A_f, D_f, bias_f;
  SsdStepParams p;
  p.dtype = kernel_dtype(x.scalar_type());
  p.state_dtype = kernel_dtype(state.scalar_type());
  p.batch = x.size(0);
  p.heads = x.size(1);
  p.head_dim = x.size(2);
  p.groups = B_in.size(1);
  p.state_dim = B_in.size(2);
  p.dt_softplus = dt_softplus;
  p.dt_lo = float(dt_lo);
  p.dt_hi = float(dt_hi);
  p.state = state.data_ptr();
  p.state_batch_stride = state.stride(0);
  p.state_head_stride = state.stride(1);
  p.state_p_stride = state.stride(2);
  p.state_n_stride = state.stride(3);
  p.x = x.data_ptr();
  p.x_batch_stride = x.stride(0);
  p.x_head_stride = x.stride(1);
  p.x_p_stride = x.stride(2);
  p.dt = dt.data_ptr();
  p.dt_batch_stride = dt.stride(0);
  p.dt_head_stride = dt.stride(1);
  p.A = fp32_data(A, A_f);
  p.B = B_in.data_ptr();
  p.B_batch_stride = B_in.stride(0);
  p.B_group_stride = B_in.stride(1);
  p.B_n_stride = B_in.stride(2);
  p.C = C_in.data_ptr();
  p.C_batch_stride = C_in.stride(0);
  p.C_group_stride = C_in.stride(1);
  p.C_n_stride = C_in.stride(2);
  p.D = fp32_data(D, D_f);
  p.D_per_channel = D && D->dim() == 2;
  if (z) {
    p.z = z->data_ptr();
    p.z_batch_stride = z->stride(0);
    p.z_head_stride = z->stride(1);
    p.z_p_stride = z->stride(2);
  }
  p.dt_bias = fp32_data(dt_bias, bias_f);
  p.y = y.data_ptr();
  const Status status = run_ssd_step(p, c10::cuda::getCurrentCUDAStream());
  check_cuda_status(status, "subq::ssd_step");
  return y;
}

#endif  // SUBQ_WITH_CUDA

}  // namespace

TORCH_LIBRARY_IMPL(subq, CPU, m) { m.impl("ssd_step", &ssd_step_composite); }

// Without the CUDA kernels built, CUDA tensors still work through the ATen composite.
TORCH_LIBRARY_IMPL(subq, CUDA, m) {
#ifdef SUBQ_WITH_CUDA
  m.impl("ssd_step", &ssd_step_cuda);
#else
  m.impl("ssd_step", &ssd_step_composite);
#endif
}

}  // namespace subq::glue
