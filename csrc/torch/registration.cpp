// Op schemas of the subq library and the subq._C Python module. Implementations register per op file
// (csrc/torch/<op>.cpp); fake kernels and autograd are registered in Python (python/subq/ops/).
#include <torch/extension.h>
#include <torch/library.h>

#include "monarch_conv/monarch_conv.h"
#include "torch/experimental_flags.h"

TORCH_LIBRARY(subq, m) {
  m.def("blockdiag_fwd(Tensor x, Tensor w) -> Tensor");
  m.def("blockdiag_bwd(Tensor dy, Tensor x, Tensor w, bool[2] output_mask) -> (Tensor, Tensor)");
  m.def("monarch_fwd(Tensor x, Tensor w1, Tensor w2) -> (Tensor, Tensor)");
  m.def("monarch_bwd(Tensor dy, Tensor x, Tensor intermediate, Tensor w1, Tensor w2, bool[3] output_mask)"
        " -> (Tensor, Tensor, Tensor)");
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "subq compiled ops (registered under torch.ops.subq)";
  m.def("cuda_built", [] {
#ifdef SUBQ_WITH_CUDA
    return true;
#else
    return false;
#endif
  }, "True when the CUTLASS CUDA kernels were compiled into this build.");
  m.def("cuda_archs", [] { return std::string(SUBQ_CUDA_ARCHS_STRING); },
        "The SUBQ_CUDA_ARCHS this build compiled for ('' for a CPU-only build).");
  m.def("monarch_conv_fft_size", [](int64_t seqlen) {
    TORCH_CHECK(seqlen >= 1 && seqlen <= subq::monarch_conv::kMaxSeqlen, "seqlen must be in [1, ",
                subq::monarch_conv::kMaxSeqlen, "], got ", seqlen);
    return subq::monarch_conv::fft_size(seqlen);
  }, "The FFT size subq.ops.monarch_conv uses for a sequence length: the smallest even 2^a 3^b 5^c 7^d >= 2 * seqlen.");
  m.attr("monarch_conv_max_seqlen") = subq::monarch_conv::kMaxSeqlen;
  m.def("experimental_kernels", [] {
    pybind11::list rows;
    for (const auto& k : subq::glue::kExperimentalKernels) {
      pybind11::dict row;
      row["env"] = k.env;
      row["ops"] = k.ops;
      row["kernels"] = k.kernels;
      row["needs_arch"] = k.needs_arch;
      row["whole_op"] = k.whole_op;
      row["why"] = k.why;
      rows.append(row);
    }
    return rows;
  }, "The opt-in CUDA kernels (csrc/torch/experimental_flags.h), one dict per flag; read through subq.experimental.");
}
