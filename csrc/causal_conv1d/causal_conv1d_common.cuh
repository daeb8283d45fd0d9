// Pieces shared by the causal conv1d kernels: the tile shape, element conversions, strided addressing, the
// dtype x width switch, and the loaders that stage a (channels, time) tile of x with its causal halo in shared
// memory as float32.
#pragma once

#include <climits>
#include <cstdint>
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "common/convert.cuh"
#include "common/cuda_status.h"
#include "common/dispatch.h"
#include "causal_conv1d/causal_conv1d.h"

namespace subq::conv1d {

// One block computes a (32 channels, 64 time steps) tile of the output. x arrives channels-first (time has unit
// stride) or channels-last (channels have unit stride); the tile's loops run along whichever axis has the unit
// stride, and both 32 and 64 are whole warps of consecutive addresses, so either layout loads coalesced. The
// halo of W-1 <= 3 extra time steps costs at most 3/64 of re-read traffic.
constexpr int kTileChannels = 32;
constexpr int kTileTime = 64;
constexpr int kThreads = 256;

__host__ __device__ inline int64_t at(const Strides3& s, int64_t b, int64_t d, int64_t t) {
  return b * s.batch + d * s.dim + t * s.time;
}

// Walk a tile along the axis that is contiguous in memory: time-major rows when time has the smaller stride.
__device__ inline bool time_fastest(const Strides3& s) {
  const int64_t st = s.time < 0 ? -s.time : s.time, sd = s.dim < 0 ? -s.dim : s.dim;
  return st <= sd;
}

// Element i of a (kTileChannels, len) tile walked in memory order: channel c, time offset j.
__device__ inline void tile_coords(int i, int len, bool along_time, int& c, int& j) {
  if (along_time) {
    c = i / len;
    j = i % len;
  } else {
    j = i / kTileChannels;
    c = i % kTileChannels;
  }
}

__device__ inline float silu(float v) { return v / (1.f + expf(-v)); }

// d silu(v) / dv = sigmoid(v) (1 + v (1 - sigmoid(v)))
__device__ inline float silu_grad(float v) {
  const float s = 1.f / (1.f + expf(-v));
  return s * (1.f + v * (1.f - s));
}

struct TileIndex {
  int64_t b, c0, t0, time_tile;
};

// At least one time tile even for seqlen 0: that tile still owns the final states and the initial-state gradients.
inline int64_t time_tiles(int64_t seqlen) { return seqlen == 0 ? 1 : (seqlen + kTileTime - 1) / kTileTime; }
inline int64_t channel_tiles(int64_t dim) { return (dim + kTileChannels - 1) / kTileChannels; }

// Blocks are numbered time tile fastest, then channel tile, then batch, in a 1-D grid (grid.x allows 2^31 - 1
// blocks, y and z only 65535).
__device__ inline TileIndex tile_index(int64_t dim, int64_t n_time_tiles) {
  const int64_t id = blockIdx.x;
  const int64_t n_channel_tiles = (dim + kTileChannels - 1) / kTileChannels;
  TileIndex tile;
  tile.time_tile = id % n_time_tiles;
  tile.c0 = (id / n_time_tiles) % n_channel_tiles * kTileChannels;
  tile.b = id / n_time_tiles / n_channel_tiles;
  tile.t0 = tile.time_tile * kTileTime;
  return tile;
}

// xs[c * len + j] = xs(b, c0 + c, t_begin + j): x inside [0, seqlen), initial_states (or zero) at negative times,
// zero past the end and past the last channel.
template <typename T, int W>
__device__ void load_input_tile(const CausalConv1dParams& p, int64_t b, int64_t c0, int64_t t_begin, int len,
                                float* xs) {
  const T* x = static_cast<const T*>(p.x);
  const T* init = static_cast<const T*>(p.initial_states);
  const bool along_time = time_fastest(p.x_strides);
  for (int i = threadIdx.x; i < kTileChannels * len; i += kThreads) {
    int c, j;
    tile_coords(i, len, along_time, c, j);
    const int64_t d = c0 + c, t = t_begin + j;
    float v = 0.f;
    if (d < p.dim) {
      if (t >= 0 && t < p.seqlen) {
        v = to_float(x[at(p.x_strides, b, d, t)]);
      } else if (t < 0 && t >= -(W - 1) && init != nullptr) {
        v = to_float(init[at(p.initial_strides, b, d, t + (W - 1))]);
      }
    }
    xs[c * len + j] = v;
  }
}

// seq[j] = seq_idx(b, t_begin + j) inside [0, seqlen), -1 elsewhere (x is zero there, so any value would do).
__device__ inline void load_seq_tile(const CausalConv1dParams& p, int64_t b, int64_t t_begin, int len, int* seq) {
  if (p.seq_idx == nullptr) return;
  for (int j = threadIdx.x; j < len; j += kThreads) {
    const int64_t t = t_begin + j;
    seq[j] = t >= 0 && t < p.seqlen ? p.seq_idx[b * p.seq_idx_batch_stride + t * p.seq_idx_time_stride] : -1;
  }
}

template <int W>
__device__ void load_weight_tile(const CausalConv1dParams& p, int64_t c0, float* ws, float* bs) {
  for (int i = threadIdx.x; i < kTileChannels * W; i += kThreads) {
    const int64_t d = c0 + i / W;
    ws[i] = d < p.dim ? p.weight[d * W + i % W] : 0.f;
  }
  for (int c = threadIdx.x; c < kTileChannels; c += kThreads) {
    bs[c] = p.bias != nullptr && c0 + c < p.dim ? p.bias[c0 + c] : 0.f;
  }
}

// Calls f(T{}, std::integral_constant<int, W>{}) for the element type of `dtype` and the compile-time width.
template <typename T, typename F>
Status dispatch_width(int width, F&& f) {
  switch (width) {
    case 2: return f(T{}, std::integral_constant<int, 2>{});
    case 3: return f(T{}, std::integral_constant<int, 3>{});
    case 4: return f(T{}, std::integral_constant<int, 4>{});
    default: return Status::kInvalidArgument;
  }
}

template <typename F>
Status dispatch(DType dtype, int width, F&& f) {
  return SUBQ_DTYPE_SWITCH(dtype, T, [&] { return dispatch_width<T>(width, f); });
}


inline bool valid(const CausalConv1dParams& p) {
  return p.batch >= 0 && p.dim >= 0 && p.seqlen >= 0 && p.width >= 2 && p.width <= 4 &&
         !(p.seq_idx != nullptr && p.initial_states != nullptr);
}

// Number of blocks of the tiled kernels, or -1 when the grid would exceed grid.x.
inline int64_t tile_blocks(const CausalConv1dParams& p) {
  const int64_t blocks = p.batch * channel_tiles(p.dim) * time_tiles(p.seqlen);
  return blocks > INT_MAX ? -1 : blocks;
}

}  // namespace subq::conv1d
