#include "ssd/ssd_step_cpu.h"

namespace subq::composite {

at::Tensor ssd_step(const at::Tensor& state, const at::Tensor& x, const at::Tensor& dt, const at::Tensor& A,
                    const at::Tensor& B, const at::Tensor& C, const std::optional<at::Tensor>& D,
                    const std::optional<at::Tensor>& z, const std::optional<at::Tensor>& dt_bias, bool dt_softplus,
                    double dt_lo, double dt_hi) {
  const at::ScalarType ct = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t heads_per_group = x.size(1) / B.size(1);
  const at::Tensor xf = x.to(ct);
  at::Tensor step = dt.to(ct);
  if (dt_bias) step = step + dt_bias->to(ct);
  if (dt_softplus) step = at::softplus(step);
  step = at::clamp(step, dt_lo, dt_hi);                                   // (Bt, H)
  const at::Tensor dA = at::exp(step * A.to(ct));
  const at::Tensor B_h = B.to(ct).repeat_interleave(heads_per_group, 1);  // (Bt, H, N): head h reads group h / (H/G)
  const at::Tensor C_h = C.to(ct).repeat_interleave(heads_per_group, 1);
  const at::Tensor new_state = state.to(ct) * dA.unsqueeze(-1).unsqueeze(-1) +
                               (step.unsqueeze(-1) * xf).unsqueeze(-1) * B_h.unsqueeze(2);
  at::Tensor y = (new_state * C_h.unsqueeze(2)).sum(-1);                  // (Bt, H, P), from the unrounded state
  if (D) y = y + (D->dim() == 2 ? D->to(ct) : D->to(ct).unsqueeze(-1)) * xf;
  if (z) y = y * at::silu(z->to(ct));
  state.copy_(new_state);
  return y.to(x.scalar_type()).contiguous();
}

}  // namespace subq::composite
