// Torch glue for the Monarch long convolution: schemas, argument checks, and the implementations of
// subq::monarch_conv_fwd/bwd and subq::monarch_conv_filter. Both devices run the ATen composite
// (csrc/monarch_conv/monarch_conv_cpu.cpp) until the fused Monarch-DFT CUDA kernels land.
#include <torch/library.h>

#include "monarch_conv/monarch_conv.h"
#include "monarch_conv/monarch_conv_cpu.h"
#include "torch/checks.h"

#ifdef SUBQ_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#endif

namespace subq::glue {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

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

cpu::MonarchConvInputs check_inputs(const Tensor& u, const OptTensor& k, const OptTensor& k_rev,
                                    const OptTensor& filter_spectrum, const OptTensor& pregate,
                                    const OptTensor& postgate, const OptTensor& D) {
  check_dim(u, 3, "u");
  check_floating(u, "u");
  const int64_t H = u.size(1), L = u.size(2);
  TORCH_CHECK(L >= 1, "u's seqlen (u.shape[2]) must be at least 1, got shape ", u.sizes());
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
  return {u, k, k_rev, filter_spectrum, pregate, postgate, D};
}

Tensor monarch_conv_fwd(const Tensor& u, const OptTensor& k, const OptTensor& k_rev, const OptTensor& filter_spectrum,
                        const OptTensor& pregate, const OptTensor& postgate, const OptTensor& D) {
  auto in = check_inputs(u, k, k_rev, filter_spectrum, pregate, postgate, D);
#ifdef SUBQ_WITH_CUDA
  const c10::OptionalDeviceGuard guard(u.device());
#endif
  return cpu::monarch_conv_fwd(in);
}

std::vector<Tensor> monarch_conv_bwd(const Tensor& dy, const Tensor& u, const OptTensor& k, const OptTensor& k_rev,
                                     const OptTensor& filter_spectrum, const OptTensor& pregate,
                                     const OptTensor& postgate, const OptTensor& D) {
  auto in = check_inputs(u, k, k_rev, filter_spectrum, pregate, postgate, D);
  TORCH_CHECK(dy.sizes() == u.sizes(), "dy must have u's shape ", u.sizes(), ", got ", dy.sizes());
  TORCH_CHECK(dy.device() == u.device(), "dy is on ", dy.device(), " but u is on ", u.device());
#ifdef SUBQ_WITH_CUDA
  const c10::OptionalDeviceGuard guard(u.device());
#endif
  return cpu::monarch_conv_bwd(dy, in);
}

Tensor monarch_conv_filter(const Tensor& k, const OptTensor& k_rev, int64_t seqlen) {
  check_filter(k, k_rev);
  TORCH_CHECK(seqlen >= k.size(1), "seqlen (", seqlen, ") must be at least k's length (", k.size(1), ")");
#ifdef SUBQ_WITH_CUDA
  const c10::OptionalDeviceGuard guard(k.device());
#endif
  return cpu::monarch_conv_filter(k, k_rev, seqlen);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(subq, m) {
  m.def("monarch_conv_fwd(Tensor u, Tensor? k, Tensor? k_rev, Tensor? filter_spectrum, Tensor? pregate, "
        "Tensor? postgate, Tensor? D) -> Tensor");
  m.def("monarch_conv_bwd(Tensor dy, Tensor u, Tensor? k, Tensor? k_rev, Tensor? filter_spectrum, Tensor? pregate, "
        "Tensor? postgate, Tensor? D) -> Tensor[]");
  m.def("monarch_conv_filter(Tensor k, Tensor? k_rev, int seqlen) -> Tensor");
}

TORCH_LIBRARY_IMPL(subq, CPU, m) {
  m.impl("monarch_conv_fwd", &monarch_conv_fwd);
  m.impl("monarch_conv_bwd", &monarch_conv_bwd);
  m.impl("monarch_conv_filter", &monarch_conv_filter);
}

TORCH_LIBRARY_IMPL(subq, CUDA, m) {
  m.impl("monarch_conv_fwd", &monarch_conv_fwd);
  m.impl("monarch_conv_bwd", &monarch_conv_bwd);
  m.impl("monarch_conv_filter", &monarch_conv_filter);
}

}  // namespace subq::glue
