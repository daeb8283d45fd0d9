// Torch glue for the Monarch long convolution: schemas, argument checks, and the implementations of
// subq::monarch_conv_fwd/bwd, subq::monarch_conv_filter and the internal subq::monarch_rfft/irfft. Both devices run
// the ATen composite (csrc/monarch_conv/monarch_conv_cpu.cpp); its transforms are ATen's FFT on CPU and the Monarch
// DFT on CUDA unless the caller picks one (algorithm). The fused Monarch-DFT CUDA forward and backward
// (csrc/monarch_conv/monarch_conv_fused.h) replace the composite's for the sizes they support when
// SUBQ_EXPERIMENTAL_CONV_KERNELS=1, until they have been verified on a GPU.
#include <algorithm>

#include <torch/library.h>

#include "monarch_conv/monarch_conv.h"
#include "monarch_conv/monarch_conv_cpu.h"
#include "monarch_conv/monarch_dft.h"
#include "torch/checks.h"
#include "torch/experimental_flags.h"

#ifdef SUBQ_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "monarch_conv/monarch_conv_fused.h"
#include "torch/cuda_status_check.h"
#include "torch/kernel_types.h"
#endif

namespace subq::glue {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;
using composite::DftAlgorithm;

// "auto" is ATen's FFT on CPU (pocketfft is the right tool there) and the Monarch DFT on CUDA (issue 4: no cuFFT).
DftAlgorithm parse_algorithm(c10::string_view algorithm, const at::Device& device) {
  if (algorithm == "fft") return DftAlgorithm::kFft;
  if (algorithm == "monarch") return DftAlgorithm::kMonarch;
  TORCH_CHECK(algorithm == "auto", "algorithm must be 'auto', 'fft' or 'monarch', got '", algorithm, "'");
  return device.is_cuda() ? DftAlgorithm::kMonarch : DftAlgorithm::kFft;
}

// A parameter may be float32 or u's dtype (fp32 filters with low-precision activations, as M2 trains them).
void check_param(const Tensor& t, const Tensor& u, const char* name, at::IntArrayRef shape) {
  check_floating(t, name);
  TORCH_CHECK(t.scalar_type() == u.scalar_type() || t.scalar_type() == at::kFloat, name, ".dtype must be u's dtype (",
              u.scalar_type(), ") or float32, got ", t.scalar_type());
  TORCH_CHECK(t.device() == u.device(), name, " is on ", t.device(), " but u is on ", u.device());
  TORCH_CHECK(t.sizes() == shape, name, " must have shape ", shape, ", got ", t.sizes());
}

void check_filter(const Tensor& k, const OptTensor& k_rev) {
  check_dim(k, 2, "k");
  check_floating(k, "k");
  TORCH_CHECK(k.size(1) >= 1, "k must have at least one tap, got shape ", k.sizes());
  if (k_rev) {
    check_same(*k_rev, k, "k_rev", "k");
    TORCH_CHECK(k_rev->sizes() == k.sizes(), "k_rev must have k's shape ", k.sizes(), ", got ", k_rev->sizes());
  }
}

composite::MonarchConvInputs check_inputs(const Tensor& u, const OptTensor& k, const OptTensor& k_rev,
                                    const OptTensor& filter_spectrum, const OptTensor& pregate,
                                    const OptTensor& postgate, const OptTensor& D, c10::string_view algorithm) {
  check_dim(u, 3, "u");
  check_floating(u, "u");
  const int64_t H = u.size(1), L = u.size(2);
  TORCH_CHECK(L >= 1 && L <= monarch_conv::kMaxSeqlen, "u's seqlen (u.shape[2]) must be in [1, ",
              monarch_conv::kMaxSeqlen, "], got shape ", u.sizes());
  TORCH_CHECK(k.has_value() != filter_spectrum.has_value(), "pass exactly one of k and filter_spectrum");
  if (k) {
    check_filter(*k, k_rev);
    check_param(*k, u, "k", {H, k->size(1)});
    TORCH_CHECK(k->size(1) <= L, "k's length (", k->size(1), ") must be at most u's seqlen (", L, ")");
  } else {
    TORCH_CHECK(!k_rev, "k_rev is part of a precomputed filter_spectrum (pass it to monarch_conv_filter)");
    const auto complex_type = u.scalar_type() == at::kDouble ? at::kComplexDouble : at::kComplexFloat;
    const int64_t bins = monarch_conv::fft_size(L) / 2 + 1;
    TORCH_CHECK(filter_spectrum->scalar_type() == complex_type, "filter_spectrum.dtype must be ", complex_type,
                " for u of dtype ", u.scalar_type(), ", got ", filter_spectrum->scalar_type());
    TORCH_CHECK(filter_spectrum->device() == u.device(), "filter_spectrum is on ", filter_spectrum->device(),
                " but u is on ", u.device());
    TORCH_CHECK(filter_spectrum->sizes() == at::IntArrayRef({H, bins}), "filter_spectrum must have shape (", H,
                ", ", bins, ") (nheads, fft_size(seqlen) / 2 + 1) for seqlen ", L, ", got ",
                filter_spectrum->sizes());
  }
  for (const auto& [gate, name] : {std::pair{&pregate, "pregate"}, std::pair{&postgate, "postgate"}}) {
    if (*gate) {
      check_same(**gate, u, name, "u");
      TORCH_CHECK((*gate)->sizes() == u.sizes(), name, " must have u's shape ", u.sizes(), ", got ",
                  (*gate)->sizes());
    }
  }
  if (D) check_param(*D, u, "D", {H});
  return {u, k, k_rev, filter_spectrum, pregate, postgate, D, parse_algorithm(algorithm, u.device())};
}

#ifdef SUBQ_WITH_CUDA
// Opt-in: the fused kernels were written and compiled without a GPU; they become the default once
// test_fused_cuda_forward, test_fused_cuda_backward and the sanitizer cases have passed on one.
bool fused_kernels_enabled() { return experimental_enabled(Experimental::kConvKernels); }

// What both fused kernels read: contiguous inputs (held here while a kernel runs) and the params pointing at them.
struct FusedInputs {
  Tensor u, pregate, postgate, D, spectrum;
  MonarchConvParams params;
};

// The fused kernels' inputs for 16- and 32-bit u on CUDA, or nullopt where they do not apply (float64,
// algorithm="fft", no rows (B = 0 or H = 0), an FFT size beyond the kernels' shared memory): the caller then runs
// the composite. The filter's spectrum is the precomputed one, or made here by the composite's Monarch DFT (H rows:
// small next to the B H rows of the op).
std::optional<FusedInputs> fused_inputs(const composite::MonarchConvInputs& in) {
  const Tensor& u_in = in.u;
  if (u_in.scalar_type() == at::kDouble || in.algorithm != DftAlgorithm::kMonarch || u_in.numel() == 0) {
    return std::nullopt;
  }
  const int64_t L = u_in.size(2), M = monarch_conv::fft_size(L);
  if (!monarch_conv_fwd_supports(M)) return std::nullopt;
  FusedInputs f;
  f.spectrum = (in.filter_spectrum ? *in.filter_spectrum
                                   : composite::monarch_conv_filter(*in.k, in.k_rev, L, DftAlgorithm::kMonarch))
                   .contiguous();
  f.u = u_in.contiguous();
  f.pregate = in.pregate ? in.pregate->contiguous() : Tensor();
  f.postgate = in.postgate ? in.postgate->contiguous() : Tensor();
  f.D = in.D ? in.D->to(at::kFloat).contiguous() : Tensor();

  MonarchConvParams& p = f.params;
  p.dtype = kernel_dtype(u_in.scalar_type());
  p.batch = u_in.size(0);
  p.heads = u_in.size(1);
  p.seqlen = L;
  p.fft_size = M;
  const std::vector<int64_t> factors = monarch_conv::monarch_factors(M / 2);
  TORCH_CHECK(factors.size() <= kMonarchConvMaxStages, "monarch_conv: ", factors.size(), " Monarch stages for M = ",
              M, ", the fused kernels take at most ", kMonarchConvMaxStages);
  p.num_factors = static_cast<int>(factors.size());
  std::copy(factors.begin(), factors.end(), p.factors);
  p.u = f.u.data_ptr();
  p.pregate = f.pregate.defined() ? f.pregate.data_ptr() : nullptr;
  p.postgate = f.postgate.defined() ? f.postgate.data_ptr() : nullptr;
  p.D = f.D.defined() ? f.D.data_ptr<float>() : nullptr;
  p.filter_spectrum = reinterpret_cast<const float*>(f.spectrum.data_ptr<c10::complex<float>>());
  return f;
}

std::optional<Tensor> fused_forward(const composite::MonarchConvInputs& in) {
  auto f = fused_inputs(in);
  if (!f) return std::nullopt;
  Tensor y = at::empty_like(f->u);
  f->params.y = y.data_ptr();
  const Status status = run_monarch_conv_fwd(f->params, c10::cuda::getCurrentCUDAStream().stream());
  if (status == Status::kUnsupported) return std::nullopt;
  check_cuda_status(status, "subq monarch_conv fused CUDA forward");
  return y;
}

// The fused backward, or nullopt where it does not apply (fused_inputs; a dy of another dtype than u, which the
// kernel would read rounded; a workspace beyond its cap): the composite's gradients, in the same dtypes.
std::optional<std::vector<Tensor>> fused_backward(const Tensor& dy_in, const composite::MonarchConvInputs& in) {
  if (dy_in.scalar_type() != in.u.scalar_type()) return std::nullopt;
  auto f = fused_inputs(in);
  if (!f) return std::nullopt;
  const MonarchConvParams& p = f->params;
  MonarchConvGrads g;
  g.filter_len = in.k ? in.k->size(1) : 0;
  if (!monarch_conv_bwd_supports(p, g)) return std::nullopt;  // the workspace's size: from filter_len and D
  const Tensor dy = dy_in.contiguous();
  const int64_t H = f->u.size(1);
  const auto fp32 = f->u.options().dtype(at::kFloat);
  Tensor du = at::empty_like(f->u);
  Tensor dpregate = f->pregate.defined() ? at::empty_like(f->pregate) : Tensor();
  Tensor dpostgate = f->postgate.defined() ? at::empty_like(f->postgate) : Tensor();
  Tensor dk = in.k ? at::empty({H, g.filter_len}, fp32) : Tensor();
  Tensor dk_rev = in.k_rev ? at::empty({H, g.filter_len}, fp32) : Tensor();
  Tensor dD = in.D ? at::empty({H}, fp32) : Tensor();
  const auto workspace_bytes = static_cast<int64_t>(monarch_conv_bwd_workspace_bytes(p, g));
  Tensor workspace = at::empty({workspace_bytes}, f->u.options().dtype(at::kByte));
  auto ptr = [](const Tensor& t) { return t.defined() && t.numel() > 0 ? t.data_ptr() : nullptr; };
  g.dy = dy.data_ptr();
  g.du = du.data_ptr();
  g.dpregate = ptr(dpregate);
  g.dpostgate = ptr(dpostgate);
  g.dk = static_cast<float*>(ptr(dk));
  g.dk_rev = static_cast<float*>(ptr(dk_rev));
  g.dD = static_cast<float*>(ptr(dD));
  g.workspace = ptr(workspace);
  const Status status = run_monarch_conv_bwd(p, g, c10::cuda::getCurrentCUDAStream().stream());
  if (status == Status::kUnsupported) return std::nullopt;
  check_cuda_status(status, "subq monarch_conv fused CUDA backward");
  // Parameter gradients in their parameter's dtype, as the composite returns them; absent ones empty.
  auto in_dtype_of = [&](const Tensor& grad, const OptTensor& param) {
    return grad.defined() ? grad.to(param->scalar_type()) : in.u.new_empty({0});
  };
  return std::vector<Tensor>{du, in_dtype_of(dk, in.k), in_dtype_of(dk_rev, in.k_rev),
                             dpregate.defined() ? dpregate : in.u.new_empty({0}),
                             dpostgate.defined() ? dpostgate : in.u.new_empty({0}), in_dtype_of(dD, in.D)};
}
#endif

Tensor monarch_conv_fwd(const Tensor& u, const OptTensor& k, const OptTensor& k_rev, const OptTensor& filter_spectrum,
                        const OptTensor& pregate, const OptTensor& postgate, const OptTensor& D,
                        c10::string_view algorithm) {
  auto in = check_inputs(u, k, k_rev, filter_spectrum, pregate, postgate, D, algorithm);
#ifdef SUBQ_WITH_CUDA
  const c10::OptionalDeviceGuard guard(u.device());
  if (u.is_cuda() && fused_kernels_enabled()) {
    if (auto y = fused_forward(in)) return *y;
  }
#endif
  return composite::monarch_conv_fwd(in);
}

std::vector<Tensor> monarch_conv_bwd(const Tensor& dy, const Tensor& u, const OptTensor& k, const OptTensor& k_rev,
                                     const OptTensor& filter_spectrum, const OptTensor& pregate,
                                     const OptTensor& postgate, const OptTensor& D, c10::string_view algorithm) {
  auto in = check_inputs(u, k, k_rev, filter_spectrum, pregate, postgate, D, algorithm);
  TORCH_CHECK(dy.sizes() == u.sizes(), "dy must have u's shape ", u.sizes(), ", got ", dy.sizes());
  TORCH_CHECK(dy.device() == u.device(), "dy is on ", dy.device(), " but u is on ", u.device());
#ifdef SUBQ_WITH_CUDA
  const c10::OptionalDeviceGuard guard(u.device());
  if (u.is_cuda() && fused_kernels_enabled()) {
    if (auto grads = fused_backward(dy, in)) return *grads;
  }
#endif
  return composite::monarch_conv_bwd(dy, in);
}

Tensor monarch_conv_filter(const Tensor& k, const OptTensor& k_rev, int64_t seqlen) {
  check_filter(k, k_rev);
  TORCH_CHECK(seqlen >= std::max<int64_t>(1, k.size(1)) && seqlen <= monarch_conv::kMaxSeqlen, "seqlen (", seqlen,
              ") must be at least k's length (", k.size(1), ") and 1, and at most ", monarch_conv::kMaxSeqlen);
#ifdef SUBQ_WITH_CUDA
  const c10::OptionalDeviceGuard guard(k.device());
#endif
  return composite::monarch_conv_filter(k, k_rev, seqlen, parse_algorithm("auto", k.device()));
}

void check_dft_size(int64_t n) {
  TORCH_CHECK(n >= 2 && n % 2 == 0 && monarch_conv::is_7_smooth(n / 2), "n must be even with n / 2 a product of 2, "
              "3, 5 and 7 (as every fft_size is), got ", n);
}

Tensor monarch_rfft(const Tensor& x, int64_t n) {
  TORCH_CHECK(x.dim() >= 1, "x must have at least one dimension");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, "x.dtype must be float32 or float64, "
              "got ", x.scalar_type());
  check_dft_size(n);
#ifdef SUBQ_WITH_CUDA
  const c10::OptionalDeviceGuard guard(x.device());
#endif
  return monarch_conv::monarch_rfft(x, n);
}

Tensor monarch_irfft(const Tensor& X, int64_t n) {
  TORCH_CHECK(X.dim() >= 1, "X must have at least one dimension");
  TORCH_CHECK(X.scalar_type() == at::kComplexFloat || X.scalar_type() == at::kComplexDouble, "X.dtype must be "
              "complex64 or complex128, got ", X.scalar_type());
  check_dft_size(n);
#ifdef SUBQ_WITH_CUDA
  const c10::OptionalDeviceGuard guard(X.device());
#endif
  return monarch_conv::monarch_irfft(X, n);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(subq, m) {
  m.def("monarch_conv_fwd(Tensor u, Tensor? k, Tensor? k_rev, Tensor? filter_spectrum, Tensor? pregate, "
        "Tensor? postgate, Tensor? D, str algorithm=\"auto\") -> Tensor");
  m.def("monarch_conv_bwd(Tensor dy, Tensor u, Tensor? k, Tensor? k_rev, Tensor? filter_spectrum, Tensor? pregate, "
        "Tensor? postgate, Tensor? D, str algorithm=\"auto\") -> Tensor[]");
  m.def("monarch_conv_filter(Tensor k, Tensor? k_rev, int seqlen) -> Tensor");
  m.def("monarch_rfft(Tensor x, int n) -> Tensor");
  m.def("monarch_irfft(Tensor X, int n) -> Tensor");
}

TORCH_LIBRARY_IMPL(subq, CPU, m) {
  m.impl("monarch_conv_fwd", &monarch_conv_fwd);
  m.impl("monarch_conv_bwd", &monarch_conv_bwd);
  m.impl("monarch_conv_filter", &monarch_conv_filter);
  m.impl("monarch_rfft", &monarch_rfft);
  m.impl("monarch_irfft", &monarch_irfft);
}

TORCH_LIBRARY_IMPL(subq, CUDA, m) {
  m.impl("monarch_conv_fwd", &monarch_conv_fwd);
  m.impl("monarch_conv_bwd", &monarch_conv_bwd);
  m.impl("monarch_conv_filter", &monarch_conv_filter);
  m.impl("monarch_rfft", &monarch_rfft);
  m.impl("monarch_irfft", &monarch_irfft);
}

}  // namespace subq::glue
