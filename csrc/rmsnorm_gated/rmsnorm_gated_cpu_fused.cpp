// Gated RMSNorm on the CPU as one fused pass per group: the ATen composite (rmsnorm_gated_cpu.cpp) reads and writes
// every element five to eight times through float32 temporaries, which makes a memory-bound op 1.2-2.5x slower than
// the plain-PyTorch formulation it replaces. Here each group's values stay in an L1-sized buffer between its two
// passes (the statistic, then the output), and rows are split in static blocks so results are deterministic.
#include "rmsnorm_gated/rmsnorm_gated_cpu.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

namespace subq::composite {
namespace {

// About 32K elements per task: enough to amortise a task, few enough to split 4K-token batches across cores.
int64_t row_grain(int64_t dim) { return std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(dim, 1)); }

// Static row blocks, one per task, so the per-block dweight partials (and their sum) do not depend on scheduling.
template <typename F>
void for_row_blocks(int64_t rows, int64_t nblocks, const F& body) {
  at::parallel_for(0, nblocks, 1, [&](int64_t first, int64_t last) {
    for (int64_t b = first; b < last; ++b) body(b, rows * b / nblocks, rows * (b + 1) / nblocks);
  });
}

int64_t row_blocks(int64_t rows, int64_t dim) {
  const int64_t by_grain = (rows + row_grain(dim) - 1) / row_grain(dim);
  return std::max<int64_t>(1, std::min<int64_t>(by_grain, at::get_num_threads()));
}

// exp in float as straight-line arithmetic, so the gate loops vectorise (a libm call per element made the fused
// forward slower than ATen's vectorised silu at small sizes): exp(x) = 2^n exp(r), r = x - n ln2, with Cephes'
// degree-6 polynomial for exp(r) on |r| <= ln2 / 2 (about 1 ulp). Saturates like expf: +inf above 88, 0 below -87.
inline float exp_poly(float x) {
  float xc = x < -87.0f ? -87.0f : x;  // value selects, not std::min/max, so the loop stays branch-free;
  xc = xc > 88.0f ? 88.0f : xc;        // NaN passes through both
  // floor(x log2 e + 1/2) by truncation of a positive number (the conversion vectorises; floorf needs SSE4.1).
  const int32_t n = int32_t(xc * 1.44269504088896341f + 128.5f) - 128;
  const float r = (xc - float(n) * 0.693359375f) - float(n) * -2.12194440e-4f;  // ln 2 in two parts, exactly
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (n + 127) << 23;  // 2^n, n in [-126, 127]
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  float result = p * scale;
  result = x > 88.0f ? std::numeric_limits<float>::infinity() : result;
  return x < -87.0f ? 0.0f : result;
}

// silu(z) = z * sigmoid(z): -inf gives NaN and +inf gives +inf, as ATen's silu does.
inline float sigmoid(float z) { return 1.0f / (1.0f + exp_poly(-z)); }
inline double sigmoid(double z) { return 1.0 / (1.0 + std::exp(-z)); }

// sum a[i] * b[i] in eight interleaved partial sums: a single running sum cannot vectorise (float addition does not
// reassociate) and would serialise on the add's latency.
template <typename acc_t>
acc_t dot(const acc_t* a, const acc_t* b, int64_t n) {
  acc_t lanes[8] = {};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int k = 0; k < 8; ++k) lanes[k] += a[i + k] * b[i + k];
  }
  acc_t total = 0;
  for (; i < n; ++i) total += a[i] * b[i];
  for (int k = 0; k < 8; ++k) total += lanes[k];
  return total;
}

// The row loops are compiled three times (AVX-512, AVX2, baseline x86-64) and one is picked at load time by the CPU's
// features, as ATen picks its own kernels: baseline code alone vectorises only four floats wide.
#if defined(__x86_64__) && defined(__GNUC__)
#define SUBQ_CPU_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define SUBQ_CPU_CLONES
#endif

template <typename scalar_t, typename acc_t>
struct Rows {
  int64_t dim, G;
  const scalar_t* x;
  const scalar_t* z;  // null without a gate
  const acc_t* w;
  const acc_t* rstd;  // the backward's saved statistic
  bool gate_in, gate_out;
};

template <typename scalar_t, typename acc_t>
SUBQ_CPU_CLONES void fwd_rows(const Rows<scalar_t, acc_t>& a, acc_t eps, scalar_t* y, acc_t* rstd, int64_t first,
                              int64_t last) {
  const int64_t dim = a.dim, G = a.G, ngroups = dim / G;
  std::vector<acc_t> v(G), gate(a.z ? G : 0);
  for (int64_t r = first; r < last; ++r) {
    for (int64_t g = 0; g < ngroups; ++g) {
      const int64_t off = r * dim + g * G;
      if (a.z) {
        for (int64_t i = 0; i < G; ++i) {
          const acc_t zi = acc_t(a.z[off + i]);
          gate[i] = zi * sigmoid(zi);
        }
      }
      for (int64_t i = 0; i < G; ++i) v[i] = a.gate_in ? acc_t(a.x[off + i]) * gate[i] : acc_t(a.x[off + i]);
      const acc_t rs = acc_t(1) / std::sqrt(dot(v.data(), v.data(), G) / acc_t(G) + eps);
      rstd[r * ngroups + g] = rs;
      const acc_t* wg = a.w + g * G;
      for (int64_t i = 0; i < G; ++i) {
        const acc_t out = v[i] * rs * wg[i];
        y[off + i] = scalar_t(a.gate_out ? out * gate[i] : out);
      }
    }
  }
}

// dx, dz: null when not asked for; dw: this row block's partial sum of dweight, or null.
template <typename scalar_t, typename acc_t>
SUBQ_CPU_CLONES void bwd_rows(const Rows<scalar_t, acc_t>& a, const scalar_t* dy, scalar_t* dx, scalar_t* dz,
                              acc_t* dw, int64_t first, int64_t last) {
  const int64_t dim = a.dim, G = a.G, ngroups = dim / G;
  std::vector<acc_t> vhat(G), dn(G), gw(G), gate(a.z ? G : 0), dgate(a.z ? G : 0);
  for (int64_t r = first; r < last; ++r) {
    for (int64_t g = 0; g < ngroups; ++g) {
      const int64_t off = r * dim + g * G;
      const acc_t rs = a.rstd[r * ngroups + g];
      const acc_t* wg = a.w + g * G;
      if (a.z) {
        for (int64_t i = 0; i < G; ++i) {
          const acc_t zi = acc_t(a.z[off + i]), s = sigmoid(zi);
          gate[i] = zi * s;
          dgate[i] = s * (acc_t(1) + zi * (acc_t(1) - s));  // d silu / dz
        }
      }
      // dn: the gradient at n = vhat * w; c: mean(dn * w * vhat), the statistic's share of dv.
      for (int64_t i = 0; i < G; ++i) {
        const acc_t xi = acc_t(a.x[off + i]), dyi = acc_t(dy[off + i]);
        vhat[i] = (a.gate_in ? xi * gate[i] : xi) * rs;
        dn[i] = a.gate_out ? dyi * gate[i] : dyi;
        gw[i] = dn[i] * wg[i];
      }
      const acc_t c = dot(gw.data(), vhat.data(), G) / acc_t(G);
      if (dw) {
        for (int64_t i = 0; i < G; ++i) dw[g * G + i] += dn[i] * vhat[i];
      }
      for (int64_t i = 0; i < G; ++i) {
        const acc_t dv = rs * (gw[i] - vhat[i] * c);
        if (dx) dx[off + i] = scalar_t(a.gate_in ? dv * gate[i] : dv);
        if (dz) {
          const acc_t dzi = a.gate_out ? acc_t(dy[off + i]) * vhat[i] * wg[i] * dgate[i]
                                       : dv * acc_t(a.x[off + i]) * dgate[i];
          dz[off + i] = scalar_t(dzi);
        }
      }
    }
  }
}

template <typename scalar_t, typename acc_t>
Rows<scalar_t, acc_t> rows_of(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& z,
                              const acc_t* rstd, int64_t G, bool norm_before_gate) {
  const scalar_t* zp = z ? z->data_ptr<scalar_t>() : nullptr;
  return {x.size(1), G, x.data_ptr<scalar_t>(), zp, w.data_ptr<acc_t>(), rstd,
          zp && !norm_before_gate, zp && norm_before_gate};
}

template <typename scalar_t, typename acc_t>
void fwd_kernel(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& z, at::Tensor& y,
                at::Tensor& rstd, acc_t eps, int64_t G, bool norm_before_gate) {
  const Rows<scalar_t, acc_t> a = rows_of<scalar_t, acc_t>(x, w, z, nullptr, G, norm_before_gate);
  scalar_t* yp = y.data_ptr<scalar_t>();
  acc_t* rp = rstd.data_ptr<acc_t>();
  at::parallel_for(0, x.size(0), row_grain(x.size(1)),
                   [&](int64_t first, int64_t last) { fwd_rows(a, eps, yp, rp, first, last); });
}

template <typename scalar_t, typename acc_t>
void bwd_kernel(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& z,
                const at::Tensor& rstd, int64_t G, bool norm_before_gate, at::Tensor& dx, at::Tensor& dw_blocks,
                at::Tensor& dz, std::array<bool, 3> mask) {
  const Rows<scalar_t, acc_t> a = rows_of<scalar_t, acc_t>(x, w, z, rstd.data_ptr<acc_t>(), G, norm_before_gate);
  const scalar_t* dyp = dy.data_ptr<scalar_t>();
  scalar_t* dxp = mask[0] ? dx.data_ptr<scalar_t>() : nullptr;
  acc_t* dwp = mask[1] ? dw_blocks.data_ptr<acc_t>() : nullptr;
  scalar_t* dzp = mask[2] && a.z ? dz.data_ptr<scalar_t>() : nullptr;
  const int64_t dim = x.size(1);
  for_row_blocks(x.size(0), dw_blocks.size(0), [&](int64_t block, int64_t first, int64_t last) {
    bwd_rows(a, dyp, dxp, dzp, dwp ? dwp + block * dim : nullptr, first, last);
  });
}

at::ScalarType acc_type(const at::Tensor& x) { return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

}  // namespace

std::tuple<at::Tensor, at::Tensor> rmsnorm_gated_fwd_fused(const at::Tensor& x_in, const at::Tensor& weight,
                                                           const std::optional<at::Tensor>& z_in, double eps,
                                                           int64_t group_size, bool norm_before_gate) {
  const at::Tensor x = x_in.contiguous(), w = weight.to(acc_type(x)).contiguous();
  const std::optional<at::Tensor> z = z_in ? std::optional<at::Tensor>(z_in->contiguous()) : std::nullopt;
  at::Tensor y = at::empty(x.sizes(), x.options());
  at::Tensor rstd = at::empty({x.size(0), x.size(1) / group_size}, x.options().dtype(acc_type(x)));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "rmsnorm_gated_fwd_fused", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    fwd_kernel<scalar_t, acc_t>(x, w, z, y, rstd, acc_t(eps), group_size, norm_before_gate);
  });
  return {y, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> rmsnorm_gated_bwd_fused(const at::Tensor& dy_in, const at::Tensor& x_in,
                                                                       const at::Tensor& weight,
                                                                       const std::optional<at::Tensor>& z_in,
                                                                       const at::Tensor& rstd_in, int64_t group_size,
                                                                       bool norm_before_gate,
                                                                       std::array<bool, 3> output_mask) {
  const at::Tensor x = x_in.contiguous(), dy = dy_in.contiguous(), w = weight.to(acc_type(x)).contiguous();
  const at::Tensor rstd = rstd_in.contiguous();
  const std::optional<at::Tensor> z = z_in ? std::optional<at::Tensor>(z_in->contiguous()) : std::nullopt;
  const int64_t rows = x.size(0), dim = x.size(1);
  at::Tensor dx = output_mask[0] ? at::empty(x.sizes(), x.options()) : x.new_empty({0});
  at::Tensor dz = output_mask[2] && z ? at::empty(x.sizes(), x.options()) : x.new_empty({0});
  at::Tensor dw_blocks = at::zeros({row_blocks(rows, dim), dim}, x.options().dtype(acc_type(x)));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "rmsnorm_gated_bwd_fused", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    bwd_kernel<scalar_t, acc_t>(dy, x, w, z, rstd, group_size, norm_before_gate, dx, dw_blocks, dz, output_mask);
  });
  at::Tensor dweight = output_mask[1] ? dw_blocks.sum(0).to(weight.scalar_type()) : x.new_empty({0});
  return {dx, dweight, dz};
}

}  // namespace subq::composite
