// Torch glue for the Monarch products: argument checks, Params filling, and the CPU / CUDA implementations of
// the subq::blockdiag_* and subq::monarch_* ops (schemas in registration.cpp).
#include <torch/library.h>

#include "monarch/monarch_cpu.h"
#include "torch/checks.h"
#include "torch/experimental_flags.h"

#ifdef SUBQ_WITH_CUDA
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include "monarch/monarch.h"
#include "torch/cuda_status_check.h"
#include "torch/kernel_types.h"
#endif

namespace subq::glue {
namespace {

void check_blockdiag(const at::Tensor& x, const at::Tensor& w) {
  check_dim(x, 2, "x");
  check_dim(w, 3, "w");
  check_nonempty_dims(w, "w", "(nblocks, out_block, in_block)");
  check_floating(x, "x");
  check_same(w, x, "w", "x");
  check_size(x, 1, w.size(0) * w.size(2), "x", "nblocks * in_block of w (nblocks, out_block, in_block)");
}

void check_monarch(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& w2) {
  check_dim(x, 2, "x");
  check_dim(w1, 3, "w1");
  check_dim(w2, 3, "w2");
  check_nonempty_dims(w1, "w1", "(k, q, p)");
  check_nonempty_dims(w2, "w2", "(l, s, r)");
  check_floating(x, "x");
  check_same(w1, x, "w1", "x");
  check_same(w2, x, "w2", "x");
  check_size(x, 1, w1.size(0) * w1.size(2), "x", "k * p of w1 (k, q, p)");
  TORCH_CHECK(w2.size(0) * w2.size(2) == w1.size(0) * w1.size(1), "w2 (l, s, r) must have l * r == k * q = ",
              w1.size(0) * w1.size(1), " of w1 (k, q, p), got w2 shape ", w2.sizes(), " and w1 shape ", w1.sizes());
}

void check_grad(const at::Tensor& dy, const at::Tensor& x, int64_t n_out) {
  check_dim(dy, 2, "dy");
  check_same(dy, x, "dy", "x");
  check_size(dy, 0, x.size(0), "dy", "tokens of x");
  check_size(dy, 1, n_out, "dy", "output features");
}

at::Tensor empty_grad(const at::Tensor& like) { return like.new_empty({0}); }

// ---- CPU (and any device without CUTLASS kernels) ---------------------------------------------------------------

at::Tensor blockdiag_fwd_composite(const at::Tensor& x, const at::Tensor& w) {
  check_blockdiag(x, w);
  return composite::blockdiag_fwd(x, w);
}

std::tuple<at::Tensor, at::Tensor> blockdiag_bwd_composite(const at::Tensor& dy, const at::Tensor& x,
                                                           const at::Tensor& w, std::array<bool, 2> mask) {
  check_blockdiag(x, w);
  check_grad(dy, x, w.size(0) * w.size(1));
  return composite::blockdiag_bwd(dy, x, w, mask);
}

std::tuple<at::Tensor, at::Tensor> monarch_fwd_composite(const at::Tensor& x, const at::Tensor& w1,
                                                         const at::Tensor& w2) {
  check_monarch(x, w1, w2);
  return composite::monarch_fwd(x, w1, w2);
}

void check_intermediate(const at::Tensor& intermediate, const at::Tensor& x, const at::Tensor& w1) {
  const int64_t padded = (x.size(0) + 7) / 8 * 8;
  TORCH_CHECK(intermediate.dim() == 2 && intermediate.size(0) == w1.size(0) * w1.size(1) &&
                  intermediate.size(1) == padded,
              "intermediate must be the (k*q, padded tokens) = (", w1.size(0) * w1.size(1), ", ", padded,
              ") tensor returned by monarch_fwd, got shape ", intermediate.sizes());
  check_same(intermediate, x, "intermediate", "x");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> monarch_bwd_composite(const at::Tensor& dy, const at::Tensor& x,
                                                                     const at::Tensor& intermediate,
                                                                     const at::Tensor& w1, const at::Tensor& w2,
                                                                     std::array<bool, 3> mask) {
  check_monarch(x, w1, w2);
  check_grad(dy, x, w2.size(0) * w2.size(1));
  check_intermediate(intermediate, x, w1);
  return composite::monarch_bwd(dy, x, intermediate, w1, w2, mask);
}

// ---- CUDA -------------------------------------------------------------------------------------------------------

#ifdef SUBQ_WITH_CUDA

// The kernels take a row stride but need unit stride within a row, and rows that do not overlap backwards.
at::Tensor rows_unit_stride(const at::Tensor& m) {
  const bool ok = m.stride(1) == 1 && (m.size(0) <= 1 || m.stride(0) >= m.size(1));
  return ok ? m : m.contiguous();
}

int64_t row_stride(const at::Tensor& m) { return m.size(0) <= 1 ? m.size(1) : m.stride(0); }

// kMisaligned means the shapes or pointers do not fit the vector width: the composite path takes those.
bool ran(Status status, const char* op) {
  if (status == Status::kMisaligned) return false;
  check_cuda_status(status, std::string("subq::") + op);
  return true;
}

// Opt-in until tests/test_monarch.py::test_hopper_gemm_path has passed on an H100: the wgmma GEMMs for 16-bit inputs.
GemmPath gemm_path() {
  return experimental_enabled(Experimental::kSm90Gemm) ? GemmPath::kHopperWhenAvailable : GemmPath::kPortable;
}

BlockdiagParams blockdiag_params(const at::Tensor& x, const at::Tensor& w) {
  BlockdiagParams p;
  p.gemm_path = gemm_path();
  p.dtype = kernel_dtype(x.scalar_type());
  p.math = kernel_math_mode(x.scalar_type());
  p.tokens = x.size(0);
  p.nblocks = w.size(0);
  p.out_block = w.size(1);
  p.in_block = w.size(2);
  p.x = x.data_ptr();
  p.x_row_stride = row_stride(x);
  p.w = w.data_ptr();
  return p;
}

at::Tensor blockdiag_fwd_cuda(const at::Tensor& x_in, const at::Tensor& w_in) {
  check_blockdiag(x_in, w_in);
  if (!has_kernel_dtype(x_in.scalar_type())) return composite::blockdiag_fwd(x_in, w_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = rows_unit_stride(x_in), w = w_in.contiguous();
  at::Tensor y = at::empty({x.size(0), w.size(0) * w.size(1)}, x.options());
  BlockdiagParams p = blockdiag_params(x, w);
  p.y = y.data_ptr();
  if (!ran(run_blockdiag_fwd(p, c10::cuda::getCurrentCUDAStream()), "blockdiag_fwd")) {
    return composite::blockdiag_fwd(x, w);
  }
  return y;
}

std::tuple<at::Tensor, at::Tensor> blockdiag_bwd_cuda(const at::Tensor& dy_in, const at::Tensor& x_in,
                                                      const at::Tensor& w_in, std::array<bool, 2> mask) {
  check_blockdiag(x_in, w_in);
  check_grad(dy_in, x_in, w_in.size(0) * w_in.size(1));
  if (!has_kernel_dtype(x_in.scalar_type())) return composite::blockdiag_bwd(dy_in, x_in, w_in, mask);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = rows_unit_stride(x_in), w = w_in.contiguous(), dy = dy_in.contiguous();
  at::Tensor dx = mask[0] ? at::empty_like(x, at::MemoryFormat::Contiguous) : empty_grad(x);
  at::Tensor dw = mask[1] ? at::empty_like(w) : empty_grad(x);
  BlockdiagGrads g;
  g.dy = dy.data_ptr();
  g.dx = mask[0] ? dx.data_ptr() : nullptr;
  g.dw = mask[1] ? dw.data_ptr() : nullptr;
  if (!ran(run_blockdiag_bwd(blockdiag_params(x, w), g, c10::cuda::getCurrentCUDAStream()), "blockdiag_bwd")) {
    return composite::blockdiag_bwd(dy, x, w, mask);
  }
  return {dx, dw};
}

MonarchParams monarch_params(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& w2) {
  MonarchParams p;
  p.gemm_path = gemm_path();
  p.dtype = kernel_dtype(x.scalar_type());
  p.math = kernel_math_mode(x.scalar_type());
  p.shape.tokens = x.size(0);
  p.shape.k = w1.size(0);
  p.shape.q = w1.size(1);
  p.shape.p = w1.size(2);
  p.shape.l = w2.size(0);
  p.shape.s = w2.size(1);
  p.shape.r = w2.size(2);
  p.x = x.data_ptr();
  p.x_row_stride = row_stride(x);
  p.w1 = w1.data_ptr();
  p.w2 = w2.data_ptr();
  return p;
}

std::tuple<at::Tensor, at::Tensor> monarch_fwd_cuda(const at::Tensor& x_in, const at::Tensor& w1_in,
                                                    const at::Tensor& w2_in) {
  check_monarch(x_in, w1_in, w2_in);
  if (!has_kernel_dtype(x_in.scalar_type())) return composite::monarch_fwd(x_in, w1_in, w2_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = rows_unit_stride(x_in), w1 = w1_in.contiguous(), w2 = w2_in.contiguous();
  MonarchParams p = monarch_params(x, w1, w2);
  at::Tensor y = at::empty({x.size(0), w2.size(0) * w2.size(1)}, x.options());
  at::Tensor intermediate = at::empty({w1.size(0) * w1.size(1), monarch_padded_tokens(x.size(0))}, x.options());
  at::Tensor workspace = at::empty({monarch_fwd_workspace_elements(p.shape)}, x.options());
  p.y = y.data_ptr();
  p.intermediate = intermediate.data_ptr();
  p.workspace = workspace.numel() > 0 ? workspace.data_ptr() : nullptr;
  if (!ran(run_monarch_fwd(p, c10::cuda::getCurrentCUDAStream()), "monarch_fwd")) {
    return composite::monarch_fwd(x, w1, w2);
  }
  return {y, intermediate};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> monarch_bwd_cuda(const at::Tensor& dy_in, const at::Tensor& x_in,
                                                                const at::Tensor& inter_in, const at::Tensor& w1_in,
                                                                const at::Tensor& w2_in, std::array<bool, 3> mask) {
  check_monarch(x_in, w1_in, w2_in);
  check_grad(dy_in, x_in, w2_in.size(0) * w2_in.size(1));
  check_intermediate(inter_in, x_in, w1_in);
  if (!has_kernel_dtype(x_in.scalar_type())) return composite::monarch_bwd(dy_in, x_in, inter_in, w1_in, w2_in, mask);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = rows_unit_stride(x_in), w1 = w1_in.contiguous(), w2 = w2_in.contiguous();
  const at::Tensor dy = dy_in.contiguous(), intermediate = inter_in.contiguous();
  MonarchParams p = monarch_params(x, w1, w2);
  p.intermediate = intermediate.data_ptr();
  at::Tensor dx = mask[0] ? at::empty_like(x, at::MemoryFormat::Contiguous) : empty_grad(x);
  at::Tensor dw1 = mask[1] ? at::empty_like(w1) : empty_grad(x);
  at::Tensor dw2 = mask[2] ? at::empty_like(w2) : empty_grad(x);
  at::Tensor workspace = at::empty({monarch_bwd_workspace_elements(p.shape)}, x.options());
  MonarchGrads g;
  g.dy = dy.data_ptr();
  g.dx = mask[0] ? dx.data_ptr() : nullptr;
  g.dw1 = mask[1] ? dw1.data_ptr() : nullptr;
  g.dw2 = mask[2] ? dw2.data_ptr() : nullptr;
  g.workspace = workspace.data_ptr();
  if (!ran(run_monarch_bwd(p, g, c10::cuda::getCurrentCUDAStream()), "monarch_bwd")) {
    return composite::monarch_bwd(dy, x, intermediate, w1, w2, mask);
  }
  return {dx, dw1, dw2};
}

#endif  // SUBQ_WITH_CUDA

}  // namespace

TORCH_LIBRARY_IMPL(subq, CPU, m) {
  m.impl("blockdiag_fwd", &blockdiag_fwd_composite);
  m.impl("blockdiag_bwd", &blockdiag_bwd_composite);
  m.impl("monarch_fwd", &monarch_fwd_composite);
  m.impl("monarch_bwd", &monarch_bwd_composite);
}

// Without the CUDA kernels built, CUDA tensors still work through the ATen composite (subq.cuda_built() says so).
TORCH_LIBRARY_IMPL(subq, CUDA, m) {
#ifdef SUBQ_WITH_CUDA
  m.impl("blockdiag_fwd", &blockdiag_fwd_cuda);
  m.impl("blockdiag_bwd", &blockdiag_bwd_cuda);
  m.impl("monarch_fwd", &monarch_fwd_cuda);
  m.impl("monarch_bwd", &monarch_bwd_cuda);
#else
  m.impl("blockdiag_fwd", &blockdiag_fwd_composite);
  m.impl("blockdiag_bwd", &blockdiag_bwd_composite);
  m.impl("monarch_fwd", &monarch_fwd_composite);
  m.impl("monarch_bwd", &monarch_bwd_composite);
#endif
}

}  // namespace subq::glue
