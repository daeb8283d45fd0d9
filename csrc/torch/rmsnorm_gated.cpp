// Torch glue for gated RMSNorm: schemas, argument checks, Params filling, and the CPU / CUDA implementations of
// subq::rmsnorm_gated_fwd and subq::rmsnorm_gated_bwd.
#include <cmath>

#include <torch/library.h>

#include "rmsnorm_gated/rmsnorm_gated_cpu.h"
#include "torch/checks.h"

#ifdef SUBQ_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "rmsnorm_gated/rmsnorm_gated.h"
#include "torch/cuda_status_check.h"
#include "torch/kernel_types.h"
#include "torch/experimental_flags.h"
#endif

TORCH_LIBRARY_FRAGMENT(subq, m) {
  m.def("rmsnorm_gated_fwd(Tensor x, Tensor weight, Tensor? z, float eps, int group_size, bool norm_before_gate)"
        " -> (Tensor, Tensor)");
  m.def("rmsnorm_gated_bwd(Tensor dy, Tensor x, Tensor weight, Tensor? z, Tensor rstd, int group_size,"
        " bool norm_before_gate, bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
}

namespace subq::glue {
namespace {

using OptTensor = std::optional<at::Tensor>;

at::ScalarType stat_type(const at::Tensor& x) { return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

void check_rmsnorm(const at::Tensor& x, const at::Tensor& weight, const OptTensor& z, int64_t group_size) {
  check_dim(x, 2, "x");
  check_floating(x, "x");
  check_dim(weight, 1, "weight");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type() || weight.scalar_type() == at::kFloat,
              "weight.dtype must be x.dtype (", x.scalar_type(), ") or float32, got ", weight.scalar_type());
  TORCH_CHECK(weight.device() == x.device(), "weight is on ", weight.device(), " but x is on ", x.device());
  check_size(weight, 0, x.size(1), "weight", "features of x");
  // A Python bool arrives here as the int 1, indistinguishable from it; the wrapper rejects bools.
  TORCH_CHECK(group_size > 0 && x.size(1) % group_size == 0, "group_size must be positive and divide the ",
              x.size(1), " features of x, got ", group_size);
  if (z) {
    check_same(*z, x, "z", "x");
    TORCH_CHECK(z->sizes() == x.sizes(), "z must have the shape of x ", x.sizes(), ", got ", z->sizes());
  }
}

// As the Python wrapper: a NaN, infinite or negative eps fails nowhere downstream but turns the outputs NaN.
void check_eps(double eps) {
  TORCH_CHECK(std::isfinite(eps) && eps >= 0, "eps must be finite and >= 0, got ", eps);
}

void check_grad(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& rstd, int64_t group_size) {
  check_same(dy, x, "dy", "x");
  TORCH_CHECK(dy.sizes() == x.sizes(), "dy must have the shape of x ", x.sizes(), ", got ", dy.sizes());
  TORCH_CHECK(rstd.dim() == 2 && rstd.size(0) == x.size(0) && rstd.size(1) == x.size(1) / group_size &&
                  rstd.scalar_type() == stat_type(x) && rstd.device() == x.device(),
              "rstd must be the (rows, groups) = (", x.size(0), ", ", x.size(1) / group_size, ") ",
              stat_type(x), " tensor returned by rmsnorm_gated_fwd, got ", rstd.scalar_type(), " shape ",
              rstd.sizes());
}

// The checked entry points around an implementation: on the CPU the fused loops, and the ATen composite for CUDA
// tensors in a build without the kernels.
using FwdImpl = std::tuple<at::Tensor, at::Tensor> (*)(const at::Tensor&, const at::Tensor&, const OptTensor&, double,
                                                       int64_t, bool);
using BwdImpl = std::tuple<at::Tensor, at::Tensor, at::Tensor> (*)(const at::Tensor&, const at::Tensor&,
                                                                   const at::Tensor&, const OptTensor&,
                                                                   const at::Tensor&, int64_t, bool,
                                                                   std::array<bool, 3>);

template <FwdImpl impl>
std::tuple<at::Tensor, at::Tensor> fwd_checked(const at::Tensor& x, const at::Tensor& weight, const OptTensor& z,
                                               double eps, int64_t group_size, bool norm_before_gate) {
  check_rmsnorm(x, weight, z, group_size);
  check_eps(eps);
  return impl(x, weight, z, eps, group_size, norm_before_gate);
}

template <BwdImpl impl>
std::tuple<at::Tensor, at::Tensor, at::Tensor> bwd_checked(const at::Tensor& dy, const at::Tensor& x,
                                                           const at::Tensor& weight, const OptTensor& z,
                                                           const at::Tensor& rstd, int64_t group_size,
                                                           bool norm_before_gate, std::array<bool, 3> mask) {
  check_rmsnorm(x, weight, z, group_size);
  check_grad(dy, x, rstd, group_size);
  return impl(dy, x, weight, z, rstd, group_size, norm_before_gate, mask);
}

#ifdef SUBQ_WITH_CUDA

// The kernels are opt-in until their GPU tests have passed on a GPU (they were written without one).
bool has_kernels(at::ScalarType t) { return has_kernel_dtype(t) && experimental_enabled(Experimental::kMamba2Kernels); }

// The kernels take a row stride but need unit stride along features.
at::Tensor rows_unit_stride(const at::Tensor& m) {
  const bool ok = m.stride(1) == 1 && (m.size(0) <= 1 || m.stride(0) >= m.size(1));
  return ok ? m : m.contiguous();
}

int64_t row_stride(const at::Tensor& m) { return m.size(0) <= 1 ? m.size(1) : m.stride(0); }

void check_status(Status status, const char* op) {
  check_cuda_status(status, std::string("subq::") + op);
}

RMSNormGatedParams params(const at::Tensor& x, const at::Tensor& weight, const OptTensor& z, double eps,
                          int64_t group_size, bool norm_before_gate) {
  RMSNormGatedParams p;
  p.dtype = kernel_dtype(x.scalar_type());
  p.weight_dtype = kernel_dtype(weight.scalar_type());
  p.rows = x.size(0);
  p.dim = x.size(1);
  p.group_size = group_size;
  p.eps = float(eps);
  p.norm_before_gate = norm_before_gate;
  p.x = x.data_ptr();
  p.x_row_stride = row_stride(x);
  if (z) {
    p.z = z->data_ptr();
    p.z_row_stride = row_stride(*z);
  }
  p.weight = weight.data_ptr();
  return p;
}

std::tuple<at::Tensor, at::Tensor> fwd_cuda(const at::Tensor& x_in, const at::Tensor& weight_in, const OptTensor& z_in,
                                            double eps, int64_t group_size, bool norm_before_gate) {
  check_rmsnorm(x_in, weight_in, z_in, group_size);
  check_eps(eps);
  if (!has_kernels(x_in.scalar_type())) {
    return composite::rmsnorm_gated_fwd(x_in, weight_in, z_in, eps, group_size, norm_before_gate);
  }
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = rows_unit_stride(x_in), weight = weight_in.contiguous();
  const OptTensor z = z_in ? OptTensor(rows_unit_stride(*z_in)) : std::nullopt;
  at::Tensor y = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor rstd = at::empty({x.size(0), x.size(1) / group_size}, x.options().dtype(at::kFloat));
  RMSNormGatedParams p = params(x, weight, z, eps, group_size, norm_before_gate);
  p.y = y.data_ptr();
  p.rstd = rstd.data_ptr<float>();
  check_status(run_rmsnorm_gated_fwd(p, c10::cuda::getCurrentCUDAStream()), "rmsnorm_gated_fwd");
  return {y, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bwd_cuda(const at::Tensor& dy_in, const at::Tensor& x_in,
                                                        const at::Tensor& weight_in, const OptTensor& z_in,
                                                        const at::Tensor& rstd_in, int64_t group_size,
                                                        bool norm_before_gate, std::array<bool, 3> mask) {
  check_rmsnorm(x_in, weight_in, z_in, group_size);
  check_grad(dy_in, x_in, rstd_in, group_size);
  if (!has_kernels(x_in.scalar_type())) {
    return composite::rmsnorm_gated_bwd(dy_in, x_in, weight_in, z_in, rstd_in, group_size, norm_before_gate, mask);
  }
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = rows_unit_stride(x_in), weight = weight_in.contiguous(), dy = rows_unit_stride(dy_in);
  const at::Tensor rstd = rstd_in.contiguous();
  const OptTensor z = z_in ? OptTensor(rows_unit_stride(*z_in)) : std::nullopt;
  const bool want_dz = mask[2] && z.has_value();
  const auto dense = x.options().memory_format(at::MemoryFormat::Contiguous);
  at::Tensor dx = mask[0] ? at::empty(x.sizes(), dense) : x.new_empty({0});
  at::Tensor dweight = mask[1] ? at::empty_like(weight) : x.new_empty({0});
  at::Tensor dz = want_dz ? at::empty(x.sizes(), dense) : x.new_empty({0});
  RMSNormGatedParams p = params(x, weight, z, 0.0, group_size, norm_before_gate);
  p.rstd = const_cast<float*>(rstd.data_ptr<float>());
  at::Tensor workspace;
  RMSNormGatedGrads g;
  g.dy = dy.data_ptr();
  g.dy_row_stride = row_stride(dy);
  g.dx = mask[0] ? dx.data_ptr() : nullptr;
  g.dz = want_dz ? dz.data_ptr() : nullptr;
  if (mask[1]) {
    workspace = at::empty({rmsnorm_gated_bwd_workspace_elements(p)}, x.options().dtype(at::kFloat));
    g.dweight = dweight.data_ptr();
    g.workspace = workspace.data_ptr<float>();
  }
  check_status(run_rmsnorm_gated_bwd(p, g, c10::cuda::getCurrentCUDAStream()), "rmsnorm_gated_bwd");
  return {dx, dweight, dz};
}

#endif  // SUBQ_WITH_CUDA

}  // namespace

TORCH_LIBRARY_IMPL(subq, CPU, m) {
  m.impl("rmsnorm_gated_fwd", &fwd_checked<composite::rmsnorm_gated_fwd_fused>);
  m.impl("rmsnorm_gated_bwd", &bwd_checked<composite::rmsnorm_gated_bwd_fused>);
}

// Without the CUDA kernels built, CUDA tensors still work through the ATen composite.
TORCH_LIBRARY_IMPL(subq, CUDA, m) {
#ifdef SUBQ_WITH_CUDA
  m.impl("rmsnorm_gated_fwd", &fwd_cuda);
  m.impl("rmsnorm_gated_bwd", &bwd_cuda);
#else
  m.impl("rmsnorm_gated_fwd", &fwd_checked<composite::rmsnorm_gated_fwd>);
  m.impl("rmsnorm_gated_bwd", &bwd_checked<composite::rmsnorm_gated_bwd>);
#endif
}

}  // namespace subq::glue
