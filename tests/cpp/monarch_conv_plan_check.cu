// Host check of the fused Monarch-DFT convolution's stage plan (monarch_dft_row.cuh's make_plan), which needs no
// GPU: for every N = M/2 the kernels take (7-smooth, up to 16384), factored in descending order as
// monarch_factors gives them, and the opt-in shared memory of sm_89, sm_80 and sm_90, the plan must be a
// factorisation of N (the strides a chain of the factors it orders), give tensor-core tables only to axes that
// suit them, and stay within the shared memory. Exits 1 with the first failure.
#include <cstdio>
#include <vector>

#include "monarch_conv/monarch_dft_row.cuh"

namespace {

using subq::MonarchConvParams;
using namespace subq::monarch_dft_smem;

// N split into at most kMonarchConvMaxStages factors of at most kMonarchConvMaxFactor, largest first (any such
// split will do: the plan must take every order and size); empty where N has none.
std::vector<int> descending_factors(int N) {
  std::vector<int> primes;
  for (int p : {7, 5, 3, 2}) {
    while (N % p == 0) {
      primes.push_back(p);
      N /= p;
    }
  }
  if (N != 1) return {};
  std::vector<int> factors;
  for (int p : primes) {  // first fit, largest primes first
    bool placed = false;
    for (int& f : factors) {
      if (!placed && f * p <= subq::kMonarchConvMaxFactor) {
        f *= p;
        placed = true;
      }
    }
    if (!placed) factors.push_back(p);
  }
  if (factors.size() > static_cast<size_t>(subq::kMonarchConvMaxStages)) return {};
  for (size_t i = 0; i < factors.size(); ++i) {
    for (size_t j = i + 1; j < factors.size(); ++j) {
      if (factors[j] > factors[i]) std::swap(factors[i], factors[j]);
    }
  }
  return factors;
}

// 1: checked, 0: N has no such split (not a size the kernels take), -1: failed.
int check(int N, size_t limit) {
  const std::vector<int> factors = descending_factors(N);
  if (factors.empty() && N > 1) return 0;
  MonarchConvParams p;
  p.fft_size = 2 * int64_t{N};
  p.num_factors = static_cast<int>(factors.size());
  for (size_t a = 0; a < factors.size(); ++a) p.factors[a] = factors[a];
  const Plan plan = make_plan(p, limit);
  auto fail = [&](const char* what) {
    std::fprintf(stderr, "monarch_conv plan, N = %d, limit %zu B: %s\n", N, limit, what);
    return -1;
  };
  if (plan.N != N || plan.r != p.num_factors) return fail("N or the number of stages");
  int stride = 1;
  for (int a = plan.r - 1; a >= 0; --a) {
    if (plan.stride[a] != stride) return fail("axis stride is not the product of the later axes' sizes");
    if (a > 0 && plan.n[a - 1] > plan.n[a]) return fail("factors not in ascending order");
    stride *= plan.n[a];
  }
  if (stride != N) return fail("factors do not multiply to N");
  for (int a = 0; a < plan.r; ++a) {
    if (plan.table[a] == kNoTable) continue;
    if (!tensor_core_axis(plan, a)) return fail("tensor-core table on an axis that does not suit it");
    if (plan.table[a] % kSmemAlign != 0 || N % 256 != 0) return fail("table or planes not 32-byte aligned");
    if (plan.table[a] + 2 * plan.n[a] * plan.n[a] > plan.table_floats) return fail("table beyond table_floats");
  }
  if (smem_bytes(plan) > limit && plan.table_floats > 0) return fail("tables beyond the shared-memory limit");
  return 1;
}

}  // namespace

int main() {
  int checked = 0, tensor_core_sizes = 0;
  for (size_t limit : {size_t{99} << 10, size_t{163} << 10, size_t{227} << 10}) {
    for (int N = 1; N <= kMaxHalf; ++N) {
      const int outcome = check(N, limit - kStaticSmemReserve);
      if (outcome < 0) return 1;
      checked += outcome;
    }
  }
  // The powers of two from M = 512 as monarch_factors splits them (balanced): each takes tensor cores.
  const std::vector<std::vector<int>> powers_of_two = {{16, 16}, {32, 16}, {32, 32}, {16, 16, 8},
                                                      {16, 16, 16}, {32, 16, 16}, {32, 32, 16}};
  for (const std::vector<int>& factors : powers_of_two) {
    MonarchConvParams p;
    p.num_factors = static_cast<int>(factors.size());
    p.fft_size = 2;
    for (size_t a = 0; a < factors.size(); ++a) {
      p.factors[a] = factors[a];
      p.fft_size *= factors[a];
    }
    tensor_core_sizes += make_plan(p, (size_t{227} << 10) - kStaticSmemReserve).table_floats > 0;
  }
  if (tensor_core_sizes != 7) {
    std::fprintf(stderr, "monarch_conv plan: only %d of 7 powers of two take tensor cores\n", tensor_core_sizes);
    return 1;
  }
  std::printf("monarch_conv plan: %d (N, shared-memory limit) cases consistent\n", checked);
  return 0;
}
