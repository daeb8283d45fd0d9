// The plain C++ API without torch: a Monarch product y = Pᵀ L P R x on the GPU through subq_core, checked
// against a host loop. Built by CMake (SUBQ_BUILD_EXAMPLES); exits 0 and says so when no CUDA device is present.
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include <cuda_runtime.h>

#include "monarch/monarch.h"

namespace {

// The Monarch product written out (the four steps), float32 on the host.
std::vector<float> monarch_host(const std::vector<float>& x, const std::vector<float>& w1,
                                const std::vector<float>& w2, const subq::MonarchShape& sh) {
  const int64_t n_in = sh.k * sh.p, n_mid = sh.k * sh.q, n_out = sh.l * sh.s;
  std::vector<float> y(sh.tokens * n_out);
  std::vector<float> t(n_mid);
  for (int64_t b = 0; b < sh.tokens; ++b) {
    for (int64_t i = 0; i < sh.k; ++i)
      for (int64_t q = 0; q < sh.q; ++q) {
        float acc = 0;
        for (int64_t p = 0; p < sh.p; ++p) acc += w1[(i * sh.q + q) * sh.p + p] * x[b * n_in + i * sh.p + p];
        t[i * sh.q + q] = acc;
      }
    // t viewed as (r, l) and transposed: block j of the second factor reads t[rr * l + j].
    for (int64_t j = 0; j < sh.l; ++j)
      for (int64_t s = 0; s < sh.s; ++s) {
        float acc = 0;
        for (int64_t rr = 0; rr < sh.r; ++rr) acc += w2[(j * sh.s + s) * sh.r + rr] * t[rr * sh.l + j];
        y[b * n_out + s * sh.l + j] = acc;  // (s, l) flattened
      }
  }
  return y;
}

template <typename T>
T* to_device(const std::vector<T>& host) {
  T* ptr = nullptr;
  cudaMalloc(&ptr, host.size() * sizeof(T));
  cudaMemcpy(ptr, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice);
  return ptr;
}

}  // namespace

int main() {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::printf("monarch_api_example: no CUDA device, nothing run (the build and link are the check here)\n");
    return 0;
  }
  subq::MonarchShape shape;
  shape.tokens = 100;
  shape.k = 4, shape.p = 16, shape.q = 24;   // w1 (k, q, p): 64 -> 96 features
  shape.l = 8, shape.r = 12, shape.s = 8;    // w2 (l, s, r): l * r = k * q = 96 -> 64 features
  std::mt19937 gen(0);
  std::normal_distribution<float> normal;
  auto randn = [&](int64_t count) {
    std::vector<float> v(count);
    for (auto& e : v) e = normal(gen);
    return v;
  };
  const auto x = randn(shape.tokens * shape.k * shape.p);
  const auto w1 = randn(shape.k * shape.q * shape.p);
  const auto w2 = randn(shape.l * shape.s * shape.r);

  subq::MonarchParams params;
  params.dtype = subq::DType::kFloat32;
  params.math = subq::MathMode::kExact;
  params.shape = shape;
  params.x = to_device(x);
  params.x_row_stride = shape.k * shape.p;
  params.w1 = to_device(w1);
  params.w2 = to_device(w2);
  float* y = nullptr;
  float* intermediate = nullptr;
  cudaMalloc(&y, shape.tokens * shape.l * shape.s * sizeof(float));
  cudaMalloc(&intermediate, subq::monarch_intermediate_elements(shape) * sizeof(float));
  params.y = y;
  params.intermediate = intermediate;

  const subq::Status status = subq::run_monarch_fwd(params, /*stream=*/nullptr);
  if (status != subq::Status::kSuccess) {
    std::printf("run_monarch_fwd failed: %s\n", subq::status_string(status));
    return 1;
  }
  std::vector<float> got(shape.tokens * shape.l * shape.s);
  cudaMemcpy(got.data(), y, got.size() * sizeof(float), cudaMemcpyDeviceToHost);
  const auto want = monarch_host(x, w1, w2, shape);
  double worst = 0;
  for (size_t i = 0; i < got.size(); ++i) worst = std::fmax(worst, std::fabs(got[i] - want[i]));
  std::printf("monarch_api_example: max abs error %.3g over %zu outputs\n", worst, got.size());
  return worst < 1e-3 ? 0 : 1;
}
