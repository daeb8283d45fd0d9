#include "rmsnorm_gated/rmsnorm_gated_cpu.h"

namespace subq::composite {
namespace {

at::ScalarType compute_type(const at::Tensor& x) { return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

// (rows, ngroups, group_size) view of a (rows, dim) matrix.
at::Tensor grouped(const at::Tensor& m, int64_t group_size) {
  return m.reshape({m.size(0), m.size(1) / group_size, group_size});
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> rmsnorm_gated_fwd(const at::Tensor& x, const at::Tensor& weight,
                                                     const std::optional<at::Tensor>& z, double eps,
                                                     int64_t group_size, bool norm_before_gate) {
  const at::ScalarType ct = compute_type(x);
  at::Tensor v = x.to(ct);
  at::Tensor gate;
  if (z) {
    gate = at::silu(z->to(ct));
    if (!norm_before_gate) v = v * gate;
  }
  const at::Tensor vg = grouped(v, group_size);
  const at::Tensor rstd = at::rsqrt(vg.square().mean(-1) + eps);  // (rows, ngroups)
  at::Tensor y = (vg * rstd.unsqueeze(-1)).reshape(v.sizes()) * weight.to(ct);
  if (z && norm_before_gate) y = y * gate;
  return {y.to(x.scalar_type()).contiguous(), rstd};  // contiguous, as the fake kernel (and CUDA) promise
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> rmsnorm_gated_bwd(const at::Tensor& dy, const at::Tensor& x,
                                                                 const at::Tensor& weight,
                                                                 const std::optional<at::Tensor>& z,
                                                                 const at::Tensor& rstd, int64_t group_size,
                                                                 bool norm_before_gate, std::array<bool, 3> output_mask) {
  const at::ScalarType ct = compute_type(x);
  const at::Tensor xf = x.to(ct), w = weight.to(ct), r = rstd.to(ct).unsqueeze(-1);
  at::Tensor gate, dgate;
  if (z) {
    const at::Tensor zf = z->to(ct), s = at::sigmoid(zf);
    gate = zf * s;
    dgate = s * (1 + zf * (1 - s));  // d silu / dz
  }
  const bool gate_in = z && !norm_before_gate, gate_out = z && norm_before_gate;
  const at::Tensor v = gate_in ? xf * gate : xf;
  const at::Tensor vhat = grouped(v, group_size) * r;                  // (rows, ngroups, group_size)
  const at::Tensor dn = gate_out ? dy.to(ct) * gate : dy.to(ct);       // gradient at n = vhat * weight
  const at::Tensor gw = grouped(dn * w, group_size);
  const at::Tensor dv = (r * (gw - vhat * (gw * vhat).mean(-1, true))).reshape(x.sizes());
  const at::Tensor vhat2d = vhat.reshape(x.sizes());

  at::Tensor dx = x.new_empty({0}), dweight = x.new_empty({0}), dz = x.new_empty({0});
  if (output_mask[0]) dx = (gate_in ? dv * gate : dv).to(x.scalar_type()).contiguous();
  if (output_mask[1]) dweight = (dn * vhat2d).sum(0).to(weight.scalar_type());
  if (output_mask[2] && z) {
    dz = (gate_out ? dy.to(ct) * vhat2d * w * dgate : dv * xf * dgate).to(z->scalar_type()).contiguous();
  }
  return {dx, dweight, dz};
}

}  // namespace subq::composite
