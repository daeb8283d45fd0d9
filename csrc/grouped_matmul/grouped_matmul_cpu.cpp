#include "grouped_matmul/grouped_matmul_cpu.h"

#include <algorithm>
#include <vector>

#include <c10/util/Exception.h>

namespace subq::composite {
namespace {

// The first row of each group, then the total. On the host the sizes can be checked, so they are.
std::vector<int64_t> group_starts(const at::Tensor& group_sizes, int64_t tokens) {
  const at::Tensor sizes = group_sizes.to(at::kCPU, at::kLong).contiguous();
  const int64_t* size = sizes.data_ptr<int64_t>();
  std::vector<int64_t> starts(sizes.numel() + 1, 0);
  for (int64_t g = 0; g < sizes.numel(); ++g) {
    TORCH_CHECK_VALUE(size[g] >= 0, "group_sizes must be non-negative, got group_sizes[", g, "] = ", size[g]);
    // Saturating at tokens + 1 (compared before adding) keeps absurd sizes from overflowing the running sum.
    starts[g + 1] = size[g] > tokens - starts[g] ? tokens + 1 : starts[g] + size[g];
    TORCH_CHECK_VALUE(starts[g + 1] <= tokens, "group_sizes must sum to at most x.shape[0] = ", tokens,
                      " (the rows of x), but group_sizes[:", g + 1, "] already sums past it (group_sizes[", g,
                      "] = ", size[g], ")");
  }
  return starts;
}

at::Tensor rows(const at::Tensor& t, const std::vector<int64_t>& starts, size_t g) {
  return t.narrow(0, starts[g], starts[g + 1] - starts[g]);
}

bool empty_group(const std::vector<int64_t>& starts, size_t g) { return starts[g + 1] == starts[g]; }

// one_hot[t, g] = 1 where row t lies in group g, with the sizes clamped as the CUDA kernels clamp them.
at::Tensor group_one_hot(const at::Tensor& group_sizes, int64_t tokens, at::ScalarType dtype) {
  const at::Tensor sizes = group_sizes.to(at::kLong).clamp(0, tokens);
  const at::Tensor ends = sizes.cumsum(0);
  const at::Tensor row = at::arange(tokens, sizes.options()).unsqueeze(1);
  return ((row >= ends - sizes) & (row < ends)).to(dtype);
}

// x spread over G blocks of columns by its rows' groups: spread[t, g*K + k] = one_hot[t, g] * x[t, k].
at::Tensor spread(const at::Tensor& one_hot, const at::Tensor& x) {
  return (one_hot.unsqueeze(2) * x.unsqueeze(1)).reshape({x.size(0), one_hot.size(1) * x.size(1)});
}

// w (G, K, N) stacked as the (G*K, N) matrix that multiplies a spread x.
at::Tensor stacked(const at::Tensor& w) { return w.reshape({w.size(0) * w.size(1), w.size(2)}); }

}  // namespace

at::Tensor grouped_matmul_fwd(const at::Tensor& x, const at::Tensor& w, const at::Tensor& group_sizes,
                              const std::optional<at::Tensor>& bias) {
  const std::vector<int64_t> starts = group_starts(group_sizes, x.size(0));
  at::Tensor y = at::zeros({x.size(0), w.size(2)}, x.options());
  for (size_t g = 0; g + 1 < starts.size(); ++g) {
    if (empty_group(starts, g)) continue;
    at::Tensor y_g = rows(y, starts, g);
    if (bias) {
      at::addmm_out(y_g, (*bias)[g], rows(x, starts, g), w[g]);
    } else {
      at::mm_out(y_g, rows(x, starts, g), w[g]);
    }
  }
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> grouped_matmul_bwd(const at::Tensor& dy, const at::Tensor& x,
                                                                  const at::Tensor& w, const at::Tensor& group_sizes,
                                                                  std::array<bool, 3> output_mask) {
  const std::vector<int64_t> starts = group_starts(group_sizes, x.size(0));
  at::Tensor dx = output_mask[0] ? at::zeros(x.sizes(), x.options()) : x.new_empty({0});
  at::Tensor dw = output_mask[1] ? at::zeros(w.sizes(), w.options()) : x.new_empty({0});
  at::Tensor dbias = output_mask[2] ? at::zeros({w.size(0), w.size(2)}, w.options()) : x.new_empty({0});
  for (size_t g = 0; g + 1 < starts.size(); ++g) {
    if (empty_group(starts, g)) continue;
    const at::Tensor dy_g = rows(dy, starts, g);
    if (output_mask[0]) {
      at::Tensor dx_g = rows(dx, starts, g);
      at::mm_out(dx_g, dy_g, w[g].t());
    }
    if (output_mask[1]) {
      at::Tensor dw_g = dw[g];
      at::mm_out(dw_g, rows(x, starts, g).t(), dy_g);
    }
    if (output_mask[2]) {
      at::Tensor dbias_g = dbias[g];
      at::sum_out(dbias_g, dy_g, {0});
    }
  }
  return {dx, dw, dbias};
}

at::Tensor grouped_matmul_fwd_expanded(const at::Tensor& x, const at::Tensor& w, const at::Tensor& group_sizes,
                                       const std::optional<at::Tensor>& bias) {
  const at::Tensor one_hot = group_one_hot(group_sizes, x.size(0), x.scalar_type());
  at::Tensor y = spread(one_hot, x).mm(stacked(w));
  return bias ? y.addmm_(one_hot, *bias) : y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> grouped_matmul_bwd_expanded(const at::Tensor& dy, const at::Tensor& x,
                                                                           const at::Tensor& w,
                                                                           const at::Tensor& group_sizes,
                                                                           std::array<bool, 3> output_mask) {
  const int64_t tokens = x.size(0), groups = w.size(0);
  const at::Tensor one_hot = group_one_hot(group_sizes, tokens, x.scalar_type());
  at::Tensor dx = x.new_empty({0}), dw = x.new_empty({0}), dbias = x.new_empty({0});
  if (output_mask[0]) {  // every group's dy · w_g^T, then each row keeps its own group's
    const at::Tensor all = dy.mm(stacked(w).t()).view({tokens, groups, w.size(1)});
    dx = (all * one_hot.unsqueeze(2)).sum(1);
  }
  if (output_mask[1]) dw = spread(one_hot, x).t().mm(dy).view(w.sizes());
  if (output_mask[2]) dbias = one_hot.t().mm(dy);
  return {dx, dw, dbias};
}

}  // namespace subq::composite
