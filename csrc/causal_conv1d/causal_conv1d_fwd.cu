// Forward causal conv1d: one block per (batch, 32-channel, 64-step) tile, x staged in shared memory with its
// W-1 step causal halo, fp32 accumulation.
#include "causal_conv1d/causal_conv1d_common.cuh"

namespace subq {
namespace conv1d {
namespace {

template <typename T, int W>
__global__ void __launch_bounds__(kThreads) causal_conv1d_fwd_kernel(CausalConv1dParams p, int64_t n_time_tiles) {
  constexpr int kHalo = W - 1;
  constexpr int kLen = kTileTime + kHalo;  // times [t0 - kHalo, t0 + kTileTime)
  __shared__ float xs[kTileChannels * kLen];
  __shared__ float ws[kTileChannels * W];
  __shared__ float bs[kTileChannels];
  __shared__ int seq[kLen];

  const TileIndex tile = tile_index(p.dim, n_time_tiles);
  const int64_t t_begin = tile.t0 - kHalo;
  load_input_tile<T, W>(p, tile.b, tile.c0, t_begin, kLen, xs);
  load_seq_tile(p, tile.b, t_begin, kLen, seq);
  load_weight_tile<W>(p, tile.c0, ws, bs);
  __syncthreads();

  T* y = static_cast<T*>(p.y);
  const bool along_time = time_fastest(p.y_strides);
  for (int i = threadIdx.x; i < kTileChannels * kTileTime; i += kThreads) {
    int c, t;
    tile_coords(i, kTileTime, along_time, c, t);
    const int64_t d = tile.c0 + c, time = tile.t0 + t;
    if (d >= p.dim || time >= p.seqlen) continue;
    // Output time t sits at tile index t + kHalo; tap k reads index t + k.
    float acc = bs[c];
#pragma unroll
    for (int k = 0; k < W; ++k) {
      const bool same_sequence = p.seq_idx == nullptr || seq[t + k] == seq[t + kHalo];
      acc += same_sequence ? ws[c * W + k] * xs[c * kLen + t + k] : 0.f;
    }
    y[at(p.y_strides, tile.b, d, time)] = from_float<T>(p.silu ? silu(acc) : acc);
  }

  // The last time tile holds times [seqlen - kHalo, seqlen) in its staged window (initial states or zeros where
  // they are negative), which are exactly the final states.
  if (p.final_states != nullptr && tile.time_tile == n_time_tiles - 1) {
    T* fin = static_cast<T*>(p.final_states);
    for (int i = threadIdx.x; i < kTileChannels * kHalo; i += kThreads) {
      const int c = i / kHalo, j = i % kHalo;
      const int64_t d = tile.c0 + c;
      if (d >= p.dim) continue;
      const int64_t index = p.seqlen - kHalo + j - t_begin;  // seqlen - t0 + j: in [0, kLen)
      fin[at(p.final_strides, tile.b, d, j)] = from_float<T>(xs[c * kLen + index]);
    }
  }
}

}  // namespace
}  // namespace conv1d

Status run_causal_conv1d_fwd(const CausalConv1dParams& p, cudaStream_t stream) {
  using namespace conv1d;
  if (!valid(p)) return Status::kInvalidArgument;
  const int64_t blocks = tile_blocks(p);
  if (blocks < 0) return Status::kInvalidArgument;
  if (blocks == 0) return Status::kSuccess;
  const int64_t n_time_tiles = time_tiles(p.seqlen);
  return dispatch(p.dtype, p.width, [&](auto t, auto w) {
    using T = decltype(t);
    causal_conv1d_fwd_kernel<T, decltype(w)::value><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        p, n_time_tiles);
    return launch_status();
  });
}

}  // namespace subq
