// Backward causal conv1d. With dp = dy * act'(pre-activation), recomputed from x rather than saved:
//   dx[t]     = sum_k w[k] dp[t + (W-1) - k]        (the transposed convolution: x[t] feeds outputs t .. t+W-1)
//   dw[k]     = sum_{b,t} dp[t] x[t - (W-1) + k]
//   dbias     = sum_{b,t} dp[t]
// and the initial states get dx at negative times; final-state gradients add to the inputs they copied.
// One block per (batch, 32-channel, 64-step) tile, as in the forward; the weight and bias gradients are written as
// per-tile partial sums and reduced by a second kernel in a fixed order (deterministic, no atomics).
#include "causal_conv1d/causal_conv1d_common.cuh"

namespace subq {
namespace conv1d {
namespace {

template <typename T, int W>
__global__ void __launch_bounds__(kThreads)
    causal_conv1d_bwd_kernel(CausalConv1dParams p, CausalConv1dGrads g, int64_t n_time_tiles) {
  constexpr int kHalo = W - 1;
  // Times [t0 - kHalo, t0 + kTileTime + kHalo): dx of the tile's steps needs dp up to kHalo steps ahead, and
  // recomputing the pre-activation there needs x kHalo steps behind each of them.
  constexpr int kLen = kTileTime + 2 * kHalo;
  __shared__ float xs[kTileChannels * kLen];
  __shared__ float dps[kTileChannels * kLen];
  __shared__ float ws[kTileChannels * W];
  __shared__ float bs[kTileChannels];
  __shared__ int seq[kLen];

  const TileIndex tile = tile_index(p.dim, n_time_tiles);
  const int64_t b = tile.b, c0 = tile.c0, t0 = tile.t0;
  const int64_t t_begin = t0 - kHalo;
  load_input_tile<T, W>(p, b, c0, t_begin, kLen, xs);
  load_seq_tile(p, b, t_begin, kLen, seq);
  load_weight_tile<W>(p, c0, ws, bs);

  // dy at times [t0, t0 + kTileTime + kHalo) inside [0, seqlen); zero before t0 (not needed, or negative times).
  const T* dy = static_cast<const T*>(g.dy);
  const bool dy_along_time = time_fastest(g.dy_strides);
  for (int i = threadIdx.x; i < kTileChannels * kLen; i += kThreads) {
    int c, j;
    tile_coords(i, kLen, dy_along_time, c, j);
    const int64_t d = c0 + c, t = t_begin + j;
    dps[c * kLen + j] = j >= kHalo && t < p.seqlen && d < p.dim ? to_float(dy[at(g.dy_strides, b, d, t)]) : 0.f;
  }
  __syncthreads();

  if (p.silu) {
    for (int i = threadIdx.x; i < kTileChannels * kLen; i += kThreads) {
      const int c = i / kLen, j = i % kLen;
      if (j < kHalo || t_begin + j >= p.seqlen || c0 + c >= p.dim) continue;
      float pre = bs[c];
#pragma unroll
      for (int k = 0; k < W; ++k) {
        const bool same_sequence = p.seq_idx == nullptr || seq[j - kHalo + k] == seq[j];
        pre += same_sequence ? ws[c * W + k] * xs[c * kLen + j - kHalo + k] : 0.f;
      }
      dps[c * kLen + j] *= silu_grad(pre);
    }
    __syncthreads();
  }

  const T* dfinal = static_cast<const T*>(g.dfinal_states);
  // Gradient of the staged input at tile index j (time t_begin + j): the outputs j .. j + kHalo that read it.
  auto input_grad = [&](int c, int j, int64_t d) {
    float acc = 0.f;
#pragma unroll
    for (int k = 0; k < W; ++k) {
      const int out = j + kHalo - k;
      const bool same_sequence = p.seq_idx == nullptr || seq[out] == seq[j];
      acc += same_sequence ? ws[c * W + k] * dps[c * kLen + out] : 0.f;
    }
    const int64_t t = t_begin + j, first_final = p.seqlen - kHalo;
    if (dfinal != nullptr && t >= first_final) acc += to_float(dfinal[at(g.dfinal_strides, b, d, t - first_final)]);
    return acc;
  };

  if (g.dx != nullptr) {
    T* dx = static_cast<T*>(g.dx);
    const bool along_time = time_fastest(g.dx_strides);
    for (int i = threadIdx.x; i < kTileChannels * kTileTime; i += kThreads) {
      int c, t;
      tile_coords(i, kTileTime, along_time, c, t);
      const int64_t d = c0 + c, time = t0 + t;
      if (d >= p.dim || time >= p.seqlen) continue;
      dx[at(g.dx_strides, b, d, time)] = from_float<T>(input_grad(c, t + kHalo, d));
    }
  }

  // The first tile's window starts at time -kHalo: its first kHalo entries are the initial states.
  if (g.dinitial_states != nullptr && tile.time_tile == 0) {
    T* dinit = static_cast<T*>(g.dinitial_states);
    for (int i = threadIdx.x; i < kTileChannels * kHalo; i += kThreads) {
      const int c = i / kHalo, j = i % kHalo;
      const int64_t d = c0 + c;
      if (d < p.dim) dinit[at(g.dinitial_strides, b, d, j)] = from_float<T>(input_grad(c, j, d));
    }
  }

  if (g.dweight != nullptr || g.dbias != nullptr) {
    // Partial sums of this tile's output steps: column k < W is dw[d, k], column W is dbias[d].
    const int steps = p.seqlen - t0 < kTileTime ? static_cast<int>(p.seqlen - t0) : kTileTime;
    float* partial = g.workspace + (b * n_time_tiles + tile.time_tile) * p.dim * (W + 1);
    for (int i = threadIdx.x; i < kTileChannels * (W + 1); i += kThreads) {
      const int c = i / (W + 1), k = i % (W + 1);
      const int64_t d = c0 + c;
      if (d >= p.dim) continue;
      float acc = 0.f;
      for (int t = 0; t < steps; ++t) {
        const int j = t + kHalo;
        const float dp = dps[c * kLen + j];
        if (k == W) {
          acc += dp;
        } else if (p.seq_idx == nullptr || seq[t + k] == seq[j]) {
          acc += dp * xs[c * kLen + t + k];
        }
      }
      partial[d * (W + 1) + k] = acc;
    }
  }
}

// dweight[d, k] and dbias[d] = the sum over all (batch, time tile) partials, one thread per column, in order.
template <int W>
__global__ void reduce_weight_grads_kernel(const float* partials, int64_t n_partials, int64_t dim, float* dweight,
                                           float* dbias) {
  const int64_t col = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t cols = dim * (W + 1);
  if (col >= cols) return;
  float acc = 0.f;
  for (int64_t i = 0; i < n_partials; ++i) acc += partials[i * cols + col];
  const int64_t d = col / (W + 1);
  const int k = static_cast<int>(col % (W + 1));
  if (k < W) {
    if (dweight != nullptr) dweight[d * W + k] = acc;
  } else if (dbias != nullptr) {
    dbias[d] = acc;
  }
}

}  // namespace
}  // namespace conv1d

int64_t causal_conv1d_bwd_workspace_elements(const CausalConv1dParams& p) {
  return p.batch * conv1d::time_tiles(p.seqlen) * p.dim * (p.width + 1);
}

Status run_causal_conv1d_bwd(const CausalConv1dParams& p, const CausalConv1dGrads& g, cudaStream_t stream) {
  using namespace conv1d;
  if (!valid(p) || (g.dinitial_states != nullptr && p.initial_states == nullptr)) return Status::kInvalidArgument;
  const bool want_weight_grads = g.dweight != nullptr || g.dbias != nullptr;
  if (want_weight_grads && g.workspace == nullptr && causal_conv1d_bwd_workspace_elements(p) > 0) {
    return Status::kInvalidArgument;
  }
  const int64_t blocks = tile_blocks(p);
  if (blocks < 0) return Status::kInvalidArgument;
  const int64_t n_time_tiles = time_tiles(p.seqlen);
  return dispatch(p.dtype, p.width, [&](auto t, auto w) {
    using T = decltype(t);
    constexpr int W = decltype(w)::value;
    if (blocks > 0) {
      causal_conv1d_bwd_kernel<T, W><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(p, g, n_time_tiles);
      SUBQ_RETURN_IF_ERROR(launch_status());
    }
    // Runs for an empty batch too: the gradients are then zero.
    const int64_t cols = p.dim * (W + 1);
    if (want_weight_grads && cols > 0) {
      constexpr int kReduceThreads = 256;
      reduce_weight_grads_kernel<W><<<static_cast<unsigned>((cols + kReduceThreads - 1) / kReduceThreads),
                                      kReduceThreads, 0, stream>>>(g.workspace, p.batch * n_time_tiles, p.dim,
                                                                   g.dweight, g.dbias);
    }
    return launch_status();
  });
}

}  // namespace subq
