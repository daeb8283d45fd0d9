// Torch glue for the grouped matmul: schemas of subq::grouped_matmul_{fwd,bwd}, argument checks, Params filling, and
// the CPU / CUDA implementations. On CUDA the group sizes never leave the device (no host synchronisation): the
// CUTLASS grouped GEMM for float16, bfloat16 and float32 (opt-in, SUBQ_EXPERIMENTAL_GROUPED_GEMM=1), the sync-free
// expanded composite otherwise.
#include <algorithm>
#include <optional>
#include <vector>

#include <torch/library.h>

#include "grouped_matmul/grouped_matmul_cpu.h"
#include "torch/checks.h"

#ifdef SUBQ_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "grouped_matmul/grouped_matmul.h"
#include "torch/cuda_status_check.h"
#include "torch/kernel_types.h"
#include "torch/experimental_flags.h"
#endif

TORCH_LIBRARY_FRAGMENT(subq, m) {
  m.def("grouped_matmul_fwd(Tensor x, Tensor w, Tensor group_sizes, Tensor? bias) -> Tensor");
  m.def("grouped_matmul_bwd(Tensor dy, Tensor x, Tensor w, Tensor group_sizes, bool[3] output_mask)"
        " -> (Tensor, Tensor, Tensor)");
}

namespace subq::glue {
namespace {

using OptTensor = std::optional<at::Tensor>;

OptTensor present(const OptTensor& t) { return t.has_value() && t->defined() ? t : std::nullopt; }

void check_grouped(const at::Tensor& x, const at::Tensor& w, const at::Tensor& group_sizes, const OptTensor& bias) {
  check_dim(x, 2, "x");
  check_floating(x, "x");
  check_dim(w, 3, "w");
  check_same(w, x, "w", "x");
  check_size(x, 1, w.size(1), "x", "in_features of w (groups, in_features, out_features)");
  check_dim(group_sizes, 1, "group_sizes");
  TORCH_CHECK(at::isIntegralType(group_sizes.scalar_type(), /*includeBool=*/false),
              "group_sizes must be an integer tensor, got ", group_sizes.scalar_type());
  TORCH_CHECK(group_sizes.device() == x.device(), "group_sizes is on ", group_sizes.device(), " but x is on ",
              x.device());
  check_size(group_sizes, 0, w.size(0), "group_sizes", "groups of w (groups, in_features, out_features)");
  if (bias) {
    check_dim(*bias, 2, "bias");
    check_same(*bias, x, "bias", "x");
    check_size(*bias, 0, w.size(0), "bias", "groups of w");
    check_size(*bias, 1, w.size(2), "bias", "out_features of w");
  }
}

void check_dy(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& w) {
  check_dim(dy, 2, "dy");
  check_same(dy, x, "dy", "x");
  check_size(dy, 0, x.size(0), "dy", "rows of x");
  check_size(dy, 1, w.size(2), "dy", "out_features of w");
}

// ---- CPU, and CUDA without a kernel for the dtype ---------------------------------------------------------------

at::Tensor fwd_cpu(const at::Tensor& x, const at::Tensor& w, const at::Tensor& group_sizes, const OptTensor& bias) {
  check_grouped(x, w, group_sizes, present(bias));
  return composite::grouped_matmul_fwd(x, w, group_sizes, present(bias));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bwd_cpu(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& w,
                                                       const at::Tensor& group_sizes, std::array<bool, 3> mask) {
  check_grouped(x, w, group_sizes, std::nullopt);
  check_dy(dy, x, w);
  return composite::grouped_matmul_bwd(dy, x, w, group_sizes, mask);
}

at::Tensor fwd_expanded(const at::Tensor& x, const at::Tensor& w, const at::Tensor& group_sizes,
                        const OptTensor& bias) {
  check_grouped(x, w, group_sizes, present(bias));
  return composite::grouped_matmul_fwd_expanded(x, w, group_sizes, present(bias));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bwd_expanded(const at::Tensor& dy, const at::Tensor& x,
                                                            const at::Tensor& w, const at::Tensor& group_sizes,
                                                            std::array<bool, 3> mask) {
  check_grouped(x, w, group_sizes, std::nullopt);
  check_dy(dy, x, w);
  return composite::grouped_matmul_bwd_expanded(dy, x, w, group_sizes, mask);
}

// ---- CUDA -------------------------------------------------------------------------------------------------------

#ifdef SUBQ_WITH_CUDA

// The CUTLASS grouped GEMM is opt-in until its GPU tests have passed on a GPU (it was written without one).
bool has_kernels(at::ScalarType t) {
  return has_kernel_dtype(t) && experimental_enabled(Experimental::kGroupedGemm);
}

struct Shape {
  int64_t tokens = 0, groups = 0, k = 0, n = 0;
};

// The dense operands a product reads (undefined where it reads none) and its output.
struct Operands {
  at::Tensor x, w, bias, dy;
};

std::vector<int64_t> out_shape(GroupedProduct product, const Shape& s) {
  switch (product) {
    case GroupedProduct::kForward: return {s.tokens, s.n};
    case GroupedProduct::kInputGrad: return {s.tokens, s.k};
    case GroupedProduct::kWeightGrad: return {s.groups, s.k, s.n};
    case GroupedProduct::kBiasGrad: return {s.groups, s.n};
  }
  return {};
}

const void* ptr(const at::Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }

// Runs one product into `out` (dense, out_shape). The operands are dense, so their row strides are k and n.
Status try_product(GroupedProduct product, const Shape& s, const Operands& in, const at::Tensor& sizes,
                   const at::Tensor& out) {
  GroupedMatmulParams p;
  p.product = product;
  p.dtype = kernel_dtype(out.scalar_type());
  p.math = kernel_math_mode(out.scalar_type());
  p.tokens = s.tokens;
  p.groups = s.groups;
  p.k = s.k;
  p.n = s.n;
  p.group_sizes = sizes.data_ptr<int64_t>();
  p.x = ptr(in.x);
  p.x_row_stride = s.k;
  p.w = ptr(in.w);
  p.bias = ptr(in.bias);
  p.dy = ptr(in.dy);
  p.dy_row_stride = s.n;
  p.out = out.data_ptr();
  const at::Tensor workspace = at::empty({grouped_matmul_workspace_bytes(p)}, out.options().dtype(at::kByte));
  p.workspace = workspace.data_ptr();
  return run_grouped_matmul(p, c10::cuda::getCurrentCUDAStream());
}

void check_status(Status status) {
  check_cuda_status(status, "subq::grouped_matmul");
}

int64_t round_up(int64_t value, int64_t multiple) { return (value + multiple - 1) / multiple * multiple; }

// t with its trailing dims zero-padded to `trailing`, in a fresh (so fully aligned) allocation.
at::Tensor zero_padded(const at::Tensor& t, std::vector<int64_t> trailing) {
  if (!t.defined()) return t;
  std::vector<int64_t> shape(t.sizes().begin(), t.sizes().end());
  std::copy(trailing.begin(), trailing.end(), shape.end() - trailing.size());
  at::Tensor padded = at::zeros(shape, t.options());
  at::Tensor inner = padded;
  for (int64_t d = 0; d < t.dim(); ++d) inner = inner.narrow(d, 0, t.size(d));
  inner.copy_(t);
  return padded;
}

// The CUTLASS kernels need k and n to be multiples of their vector width and aligned operands. Otherwise k and n
// are zero-padded up to it (the padding only adds zero products) and the result is cut back: always correct,
// at the cost of the copies.
at::Tensor run_product(GroupedProduct product, const Shape& s, const Operands& in, const at::Tensor& sizes,
                       const at::TensorOptions& options) {
  at::Tensor out = at::empty(out_shape(product, s), options);
  const Status status = try_product(product, s, in, sizes, out);
  if (status != Status::kMisaligned) {
    check_status(status);
    return out;
  }
  const int64_t vector = grouped_matmul_alignment(kernel_dtype(out.scalar_type()), kernel_math_mode(out.scalar_type()));
  Shape padded = s;
  padded.k = round_up(s.k, vector);
  padded.n = round_up(s.n, vector);
  Operands in_padded;
  in_padded.x = zero_padded(in.x, {padded.k});
  in_padded.w = zero_padded(in.w, {padded.k, padded.n});
  in_padded.bias = zero_padded(in.bias, {padded.n});
  in_padded.dy = zero_padded(in.dy, {padded.n});
  at::Tensor out_padded = at::empty(out_shape(product, padded), options);
  check_status(try_product(product, padded, in_padded, sizes, out_padded));
  at::Tensor cut = out_padded;
  const std::vector<int64_t> shape = out_shape(product, s);
  for (size_t d = 0; d < shape.size(); ++d) cut = cut.narrow(static_cast<int64_t>(d), 0, shape[d]);
  return cut.contiguous();
}

Shape shape_of(const at::Tensor& x, const at::Tensor& w) { return Shape{x.size(0), w.size(0), w.size(1), w.size(2)}; }

// Any integer dtype; the kernels read int64. A device-side conversion: nothing waits for the host.
at::Tensor device_sizes(const at::Tensor& group_sizes) { return group_sizes.to(at::kLong).contiguous(); }

at::Tensor fwd_cuda(const at::Tensor& x, const at::Tensor& w, const at::Tensor& group_sizes, const OptTensor& bias) {
  if (!has_kernels(x.scalar_type())) return fwd_expanded(x, w, group_sizes, bias);
  check_grouped(x, w, group_sizes, present(bias));
  const c10::cuda::CUDAGuard guard(x.device());
  Operands in;
  in.x = x.contiguous();
  in.w = w.contiguous();
  if (present(bias)) in.bias = bias->contiguous();
  return run_product(GroupedProduct::kForward, shape_of(x, w), in, device_sizes(group_sizes), x.options());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bwd_cuda(const at::Tensor& dy, const at::Tensor& x,
                                                        const at::Tensor& w, const at::Tensor& group_sizes,
                                                        std::array<bool, 3> mask) {
  if (!has_kernels(x.scalar_type())) return bwd_expanded(dy, x, w, group_sizes, mask);
  check_grouped(x, w, group_sizes, std::nullopt);
  check_dy(dy, x, w);
  const c10::cuda::CUDAGuard guard(x.device());
  const Shape s = shape_of(x, w);
  const at::Tensor sizes = device_sizes(group_sizes);
  Operands in;
  in.dy = dy.contiguous();
  auto product = [&](GroupedProduct kind, bool wanted, bool reads_x, bool reads_w) {
    if (!wanted) return x.new_empty({0});
    Operands operands = in;
    if (reads_x) operands.x = x.contiguous();
    if (reads_w) operands.w = w.contiguous();
    return run_product(kind, s, operands, sizes, x.options());
  };
  return {product(GroupedProduct::kInputGrad, mask[0], false, true),
          product(GroupedProduct::kWeightGrad, mask[1], true, false),
          product(GroupedProduct::kBiasGrad, mask[2], false, false)};
}

#endif  // SUBQ_WITH_CUDA

}  // namespace

TORCH_LIBRARY_IMPL(subq, CPU, m) {
  m.impl("grouped_matmul_fwd", &fwd_cpu);
  m.impl("grouped_matmul_bwd", &bwd_cpu);
}

// Without the CUDA kernels built, CUDA tensors take the expanded composite: still no host synchronisation.
TORCH_LIBRARY_IMPL(subq, CUDA, m) {
#ifdef SUBQ_WITH_CUDA
  m.impl("grouped_matmul_fwd", &fwd_cuda);
  m.impl("grouped_matmul_bwd", &bwd_cuda);
#else
  m.impl("grouped_matmul_fwd", &fwd_expanded);
  m.impl("grouped_matmul_bwd", &bwd_expanded);
#endif
}

}  // namespace subq::glue
