#include "monarch_conv/monarch_conv_cpu.h"

#include <algorithm>

#include "monarch_conv/monarch_conv.h"
#include "monarch_conv/monarch_dft.h"

namespace subq::composite {
namespace {

using at::Tensor;

at::ScalarType compute_type(const Tensor& t) { return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

// The combined length-M filter c of monarch_conv_cpu.h, in k's compute dtype. Every tap of k_rev is placed, also
// k_rev[L-1], which length L never reaches: a spectrum serves every length with the same M, and a longer one does.
Tensor combined_filter(const Tensor& k, const std::optional<Tensor>& k_rev, int64_t M, at::ScalarType ct) {
  const int64_t H = k.size(0), Lk = k.size(1);
  Tensor c = at::zeros({H, M}, k.options().dtype(ct));
  c.narrow(1, 0, Lk).copy_(k);
  if (k_rev) c.narrow(1, M - Lk, Lk).copy_(k_rev->flip(1));  // Lk <= L <= M/2: the halves never meet
  return c;
}

// The real transforms of length M along the last dim, by the chosen algorithm: the one place the two differ.
struct RealDft {
  int64_t M;
  DftAlgorithm algorithm;

  Tensor rfft(const Tensor& x) const {
    return algorithm == DftAlgorithm::kMonarch ? monarch_conv::monarch_rfft(x, M) : at::fft_rfft(x, M, -1);
  }
  Tensor irfft(const Tensor& X) const {
    return algorithm == DftAlgorithm::kMonarch ? monarch_conv::monarch_irfft(X, M) : at::fft_irfft(X, M, -1);
  }
};

// The filter's spectrum at the compute dtype of u (a float32 filter with float64 u is promoted).
Tensor spectrum(const MonarchConvInputs& in, const RealDft& dft, at::ScalarType ct) {
  if (in.filter_spectrum) return *in.filter_spectrum;
  std::optional<Tensor> k_rev = in.k_rev ? std::optional<Tensor>(in.k_rev->to(ct)) : std::nullopt;
  return dft.rfft(combined_filter(in.k->to(ct), k_rev, dft.M, ct));
}

// The first L outputs of the length-M circular convolution with the spectrum K of v (B, H, L).
Tensor circular_conv(const Tensor& V, const Tensor& K, const RealDft& dft, int64_t L) {
  return dft.irfft(V * K).narrow(-1, 0, L);
}

Tensor empty_grad(const Tensor& like) { return like.new_empty({0}); }

// a * b (or a) in compute dtype, written into the first L columns of a (B, H, M) buffer whose other columns are zero:
// the transform's input. Handing the transform v itself makes it pad (zero all M columns, then copy v in); this way
// the zeros are written once and the product (or the layout copy of a strided a) lands in place.
Tensor padded_product(const Tensor& a, const std::optional<Tensor>& b, int64_t M, at::ScalarType ct) {
  const int64_t L = a.size(2);
  Tensor padded = at::empty({a.size(0), a.size(1), M}, a.options().dtype(ct));
  padded.narrow(2, L, M - L).zero_();
  Tensor head = padded.narrow(2, 0, L);
  if (b) {
    at::mul_out(head, a.to(ct), b->to(ct));
  } else {
    head.copy_(a);
  }
  return padded;
}

}  // namespace

Tensor monarch_conv_filter(const Tensor& k, const std::optional<Tensor>& k_rev, int64_t seqlen,
                           DftAlgorithm algorithm) {
  const RealDft dft{monarch_conv::fft_size(seqlen), algorithm};
  const auto ct = compute_type(k);
  if (k.size(0) == 0) {  // no heads: nothing to transform (the FFT libraries reject an empty batch)
    return at::empty({0, dft.M / 2 + 1}, k.options().dtype(ct == at::kDouble ? at::kComplexDouble : at::kComplexFloat));
  }
  return dft.rfft(combined_filter(k.to(ct), k_rev, dft.M, ct));
}

Tensor monarch_conv_fwd(const MonarchConvInputs& in) {
  const int64_t B = in.u.size(0), H = in.u.size(1), L = in.u.size(2);
  if (B == 0 || H == 0) return at::empty_like(in.u);  // the FFT libraries reject an empty batch
  const RealDft dft{monarch_conv::fft_size(L), in.algorithm};
  const auto ct = compute_type(in.u);
  const Tensor v_padded = padded_product(in.u, in.pregate, dft.M, ct);
  const Tensor v = v_padded.narrow(2, 0, L);
  Tensor y = circular_conv(dft.rfft(v_padded), spectrum(in, dft, ct), dft, L);
  if (in.D) y = y + v * in.D->to(ct).view({H, 1});
  if (in.postgate) y = y * in.postgate->to(ct);
  return y.to(in.u.scalar_type());
}

std::vector<Tensor> monarch_conv_bwd(const Tensor& dy, const MonarchConvInputs& in) {
  const int64_t B = in.u.size(0), H = in.u.size(1), L = in.u.size(2);
  auto zeros_or_empty = [&](const std::optional<Tensor>& t) { return t ? at::zeros_like(*t) : empty_grad(in.u); };
  if (B == 0 || H == 0) {
    return {at::zeros_like(in.u), zeros_or_empty(in.k), zeros_or_empty(in.k_rev), zeros_or_empty(in.pregate),
            zeros_or_empty(in.postgate), zeros_or_empty(in.D)};
  }
  const RealDft dft{monarch_conv::fft_size(L), in.algorithm};
  const int64_t M = dft.M;
  const auto ct = compute_type(in.u);
  Tensor u = in.u.to(ct);
  const Tensor v_padded = padded_product(u, in.pregate, M, ct);
  const Tensor v = v_padded.narrow(2, 0, L);
  Tensor K = spectrum(in, dft, ct);
  Tensor V = dft.rfft(v_padded);
  Tensor Dw = in.D ? in.D->to(ct).view({H, 1}) : Tensor();

  // Through the postgate: g is the gradient of the pre-gate output z = conv(v) + D v.
  Tensor dpostgate;
  if (in.postgate) {
    Tensor z = circular_conv(V, K, dft, L);
    if (in.D) z = z + v * Dw;
    dpostgate = (dy.to(ct) * z).to(in.postgate->scalar_type());
  }
  const Tensor g_padded = padded_product(dy, in.postgate, M, ct);
  const Tensor g = g_padded.narrow(2, 0, L);
  Tensor dD = in.D ? (g * v).sum(at::IntArrayRef{0, 2}).to(in.D->scalar_type()) : Tensor();

  // Adjoint of the convolution: the correlation with the same filter, conj(K) in the frequency domain. conj_physical,
  // not the lazy conj view: under torch.compile's AOT tracing the view's conj bit was dropped (wrong gradients).
  Tensor G = dft.rfft(g_padded);
  Tensor dv = circular_conv(G, at::conj_physical(K), dft, L);
  if (in.D) dv = dv + g * Dw;

  // Filter gradient: dc[j] = sum_{b,t} g[b,t] v[b,(t-j) mod M], read back at the filter's taps.
  Tensor dk, dk_rev;
  if (in.k) {
    Tensor dc = dft.irfft((G * at::conj_physical(V)).sum(0));  // (H, M)
    const int64_t Lk = in.k->size(1);
    dk = dc.narrow(1, 0, Lk).to(in.k->scalar_type());
    if (in.k_rev) {
      const int64_t n = std::min(Lk, L - 1);
      dk_rev = at::zeros({H, Lk}, dc.options());
      dk_rev.narrow(1, 0, n).copy_(dc.narrow(1, M - n, n).flip(1));
      dk_rev = dk_rev.to(in.k_rev->scalar_type());
    }
  }

  Tensor du = in.pregate ? dv * in.pregate->to(ct) : dv;
  Tensor dpregate = in.pregate ? (dv * u).to(in.pregate->scalar_type()) : Tensor();
  std::vector<Tensor> out = {du.to(in.u.scalar_type()), dk, dk_rev, dpregate, dpostgate, dD};
  for (auto& t : out) {
    if (!t.defined()) t = empty_grad(in.u);
  }
  return out;
}

}  // namespace subq::composite
