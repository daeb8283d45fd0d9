// The emulator's own ops, next to the emulated subq ops (registered under torch.ops.subq_emu by the rewritten
// glue): the reports of its checks, the kernels launched since the last call, and direct calls of the helper kernels whose ops also run CUTLASS GEMMs,
// which the emulator cannot execute (the Monarch permutation).
#include <string>
#include <vector>

#include <ATen/ATen.h>
#include <torch/library.h>

#include "monarch/monarch_permute.cuh"

namespace subq_emu {
std::vector<std::string> take_reports();
std::vector<std::string> take_launches();
}

namespace {

std::vector<std::string> take_reports() { return subq_emu::take_reports(); }
std::vector<std::string> take_launches() { return subq_emu::take_launches(); }

// Each row of `input` viewed as (cols, blocks) is written transposed: out[t, j*cols + c] = in[t, c*blocks + j].
at::Tensor transpose_within_rows(const at::Tensor& input, int64_t blocks, int64_t cols) {
  TORCH_CHECK(input.dim() == 2 && input.is_contiguous() && input.size(1) == blocks * cols,
              "input must be a contiguous (rows, blocks * cols) tensor");
  TORCH_CHECK(input.element_size() == 2 || input.element_size() == 4, "input must have 2- or 4-byte elements");
  at::Tensor out = at::empty_like(input).fill_(-1);
  const cudaError_t error = subq::transpose_within_rows(input.data_ptr(), out.data_ptr(), input.size(0), blocks, cols,
                                                        static_cast<int>(input.element_size()), nullptr);
  TORCH_CHECK(error == cudaSuccess, "transpose_within_rows failed: ", cudaGetErrorString(error));
  return out;
}

}  // namespace

TORCH_LIBRARY(subq_emu, m) {
  m.def("take_reports() -> str[]", &take_reports);
  m.def("take_launches() -> str[]", &take_launches);
  m.def("transpose_within_rows(Tensor input, int blocks, int cols) -> Tensor", &transpose_within_rows);
}
