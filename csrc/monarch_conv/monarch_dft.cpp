#include "monarch_conv/monarch_dft.h"

#include <c10/core/InferenceMode.h>
#include <c10/util/MathConstants.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <mutex>
#include <optional>
#include <tuple>

namespace subq::monarch_conv {
namespace {

using at::Tensor;

constexpr int64_t kMaxFactor = 64;  // the largest small DFT: a 64 x 64 tile, issue 4's largest Monarch block

// Issue 4's tiers: order 2 for N <= 1K, 3 up to 32K, 4 beyond.
int64_t order_for(int64_t N) { return N <= 1024 ? 2 : N <= 32768 ? 3 : 4; }

// The most balanced split of N into `order` non-increasing divisors, each <= cap. The first factor is the largest,
// so trying it in increasing order from N^(1/order) up finds the smallest largest factor first.
std::optional<std::vector<int64_t>> balanced_split(int64_t N, int64_t order, int64_t cap) {
  if (order == 1) return N <= cap ? std::optional(std::vector<int64_t>{N}) : std::nullopt;
  for (int64_t d = 1; d <= std::min(cap, N); ++d) {
    if (N % d != 0 || std::pow(static_cast<double>(d), static_cast<double>(order)) < static_cast<double>(N)) continue;
    if (auto rest = balanced_split(N / d, order - 1, d)) {
      rest->insert(rest->begin(), d);
      return rest;
    }
  }
  return std::nullopt;
}

// W_n^e = exp(sign 2πi e / n) for an int64 tensor of exponents, in float64: e is reduced mod n in integers first,
// so the angle is exact to float64 rounding however large e gets.
Tensor roots_of_unity(const Tensor& exponent, int64_t n, double sign) {
  const Tensor angle = exponent.remainder(n).to(at::kDouble) * (sign * 2 * c10::pi<double> / static_cast<double>(n));
  return at::polar(at::ones_like(angle), angle);
}

// Everything a transform of one size, direction, dtype and device needs, precomputed in float64 and cast once.
struct Plan {
  std::vector<int64_t> factors;
  std::vector<Tensor> dft;      // F_{n_i}, (n_i, n_i): symmetric
  std::vector<Tensor> twiddle;  // T_i, (n_i, N_i / n_i), for every stage but the last
  Tensor split_a, split_b;      // the half-complex step, per bin: out = split_a * in[k] + split_b * conj(in[N - k])
};

// sign -1: the forward DFT and the rfft step (N + 1 bins out); sign +1: the unnormalised inverse DFT and the irfft
// step (N values out) with irfft's 1/M normalisation, which for the half-size sequence is 1/N, folded in.
Plan make_plan(int64_t N, bool inverse, const at::TensorOptions& options) {
  const double sign = inverse ? 1.0 : -1.0;
  const auto index = at::TensorOptions(at::kLong);
  Plan plan;
  plan.factors = monarch_factors(N);
  int64_t remaining = N;  // N_i
  for (const int64_t n : plan.factors) {
    const Tensor k = at::arange(n, index);
    plan.dft.push_back(roots_of_unity(k.outer(k), n, sign).to(options));
    if (remaining > n) plan.twiddle.push_back(roots_of_unity(k.outer(at::arange(remaining / n, index)), remaining,
                                                             sign).to(options));
    remaining /= n;
  }
  // From the forward step X[k] = E[k] + W_M^k O[k], E = (Z[k] + conj Z[N-k]) / 2, O = (Z[k] - conj Z[N-k]) / 2i:
  // X = (1 - i w) / 2 Z[k] + (1 + i w) / 2 conj Z[N-k] with w = W_M^k. Its inverse, Z = E + i O with
  // E = (X[k] + conj X[N-k]) / 2 and O = conj(w) (X[k] - conj X[N-k]) / 2, has the conjugate coefficients.
  const Tensor w = roots_of_unity(at::arange(inverse ? N : N + 1, index), 2 * N, sign);
  const Tensor i_w = w * c10::complex<double>(0, sign);
  const double scale = (inverse ? 1.0 / static_cast<double>(N) : 1.0) / 2;
  plan.split_a = ((1 + i_w) * scale).to(options);
  plan.split_b = ((1 - i_w) * scale).to(options);
  return plan;
}

// The plans made so far, one per (N, direction, dtype, device): small (O(N) elements each), built once under a lock.
Plan plan_for(int64_t N, bool inverse, const Tensor& like) {
  using Key = std::tuple<int64_t, bool, at::ScalarType, at::DeviceType, at::DeviceIndex>;
  static std::mutex mutex;
  // Never destroyed: freeing CUDA tensors after the CUDA runtime has shut down at exit would fail.
  static auto* plans = new std::map<Key, Plan>();
  const Key key{N, inverse, like.scalar_type(), like.device().type(), like.device().index()};
  const std::lock_guard<std::mutex> lock(mutex);
  auto it = plans->find(key);
  if (it == plans->end()) {
    // Ordinary tensors even when the first caller runs under torch.inference_mode(): the plan outlives it.
    const c10::InferenceMode normal_tensors(false);
    it = plans->emplace(key, make_plan(N, inverse, like.options())).first;
  }
  return it->second;
}

// The plan's stages on the rows of z (P, N), contiguous complex: DFT_N(z), or the unnormalised inverse, in natural
// bin order.
Tensor monarch_dft(const Tensor& z, const Plan& plan) {
  const int64_t P = z.size(0), N = z.size(1);
  const auto r = static_cast<int64_t>(plan.factors.size());
  Tensor y = z;
  int64_t before = P, after = N;  // the batch and the axes already transformed; the axes still to come
  for (int64_t i = 0; i < r; ++i) {
    const int64_t n = plan.factors[i];
    after /= n;
    if (after == 1) {
      // The last axis is the innermost: one (P N / n, n) x (n, n) GEMM, F_n being symmetric.
      y = at::matmul(y.view({before, n}), plan.dft[i]);
    } else {
      y = at::matmul(plan.dft[i], y.view({before, n, after}));
      y.mul_(plan.twiddle[i]);
    }
    before *= n;
  }
  // y[p, k1, ..., kr] holds bin k1 + n1 (k2 + n2 (... + n_{r-1} kr)): reversing the digit axes sorts the bins.
  std::vector<int64_t> digits{P}, reversed{0};
  for (int64_t i = 0; i < r; ++i) {
    digits.push_back(plan.factors[i]);
    reversed.push_back(r - i);
  }
  return y.view(digits).permute(reversed).reshape({P, N});
}

std::vector<int64_t> with_last(at::IntArrayRef sizes, int64_t last) {
  std::vector<int64_t> out(sizes.begin(), sizes.end() - 1);
  out.push_back(last);
  return out;
}

}  // namespace

std::vector<int64_t> monarch_factors(int64_t N) {
  std::vector<int64_t> factors;
  for (int64_t order = order_for(N);; ++order) {
    if (auto split = balanced_split(N, order, kMaxFactor)) {
      factors = std::move(*split);
      break;
    }
  }
  factors.erase(std::remove(factors.begin(), factors.end(), int64_t{1}), factors.end());
  return factors;
}

Tensor monarch_rfft(const Tensor& x, int64_t n) {
  const int64_t N = n / 2, L = x.size(-1);
  // Zero-padded or cut to n, contiguous at an even offset: the layout view_as_complex reads as the N values z[n].
  Tensor xn = L >= n ? x.narrow(-1, 0, n).contiguous() : at::constant_pad_nd(x, {0, n - L});
  if (xn.storage_offset() % 2 != 0) xn = xn.clone();
  const int64_t P = xn.numel() / n;
  const Tensor z = at::view_as_complex(xn.view({P, N, 2}));
  const Plan plan = plan_for(N, /*inverse=*/false, z);
  const Tensor Z = monarch_dft(z, plan);
  const Tensor Z_ext = at::cat({Z, Z.narrow(1, 0, 1)}, 1);  // Z[N] = Z[0]: the DFT is N-periodic
  const Tensor X = Z_ext * plan.split_a + at::conj_physical(Z_ext.flip(1)) * plan.split_b;
  return X.view(with_last(x.sizes(), N + 1));
}

Tensor monarch_irfft(const Tensor& X, int64_t n) {
  const int64_t N = n / 2, bins = X.size(-1);
  Tensor Xn = bins >= N + 1 ? X.narrow(-1, 0, N + 1) : at::constant_pad_nd(X, {0, N + 1 - bins});
  const int64_t P = Xn.numel() / (N + 1);
  Xn = Xn.reshape({P, N + 1});
  const Plan plan = plan_for(N, /*inverse=*/true, Xn);
  Tensor Z = Xn.narrow(1, 0, N) * plan.split_a + at::conj_physical(Xn.narrow(1, 1, N).flip(1)) * plan.split_b;
  // A Hermitian spectrum's bins 0 and N are real: their imaginary parts are ignored, as torch.fft.irfft does.
  Z.select(1, 0).copy_(at::real(Xn.select(1, 0)) * plan.split_a[0] + at::real(Xn.select(1, N)) * plan.split_b[0]);
  const Tensor z = monarch_dft(Z, plan);
  return at::view_as_real(z).view(with_last(X.sizes(), n));
}

}  // namespace subq::monarch_conv
