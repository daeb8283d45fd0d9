// Internal to the FLASH kernels (flash_chunk_attention_fwd.cu and _bwd.cu): the tile conventions both share, and
// the two kernels both run, chunk_states (K_lin,gᵀ V_g per chunk) and state_prefix (the prefix over chunks). The
// backward runs them twice: on (K_lin, V) to recompute the forward's states, and on (Q_lin, dO) for the states'
// gradients, with the prefix reversed.
// Everything here has internal linkage (an unnamed namespace): each .cu compiles its own copy, so the host launch
// stubs of the kernels do not clash at link time.
#pragma once

#include <cstddef>
#include <cstdint>

#include "common/convert.cuh"
#include "common/wmma_tiles.cuh"
#include "flash/flash_chunk_attention.h"

namespace subq {
namespace {

constexpr int kPrefixThreads = 256;

struct Dims {
  int64_t B, L, S, E, C, G;
};

Dims make_dims(const FlashChunkShape& s) {
  Dims d;
  d.B = s.batch, d.L = s.seqlen, d.S = s.qk_dim, d.E = s.value_dim, d.C = s.chunk_size;
  d.G = (d.L + d.C - 1) / d.C;
  return d;
}

// The shapes the kernels take (see run_flash_chunk_attention_fwd): C one of the tile multiples, S and E within the
// tiles' loops, the batch within gridDim.y of state_prefix.
bool shape_supported(const FlashChunkShape& s) {
  const int64_t C = s.chunk_size;
  return s.batch >= 0 && s.seqlen >= 0 && s.qk_dim >= 1 && s.qk_dim <= 256 && s.value_dim >= 1 &&
         s.value_dim <= 4096 && (C == 64 || C == 128 || C == 256 || C == 512) && s.batch <= 65535;
}

// float32 K_lin,gᵀ V_g states, one S x E matrix per (batch row, chunk).
size_t state_bytes(const Dims& d) { return sizeof(float) * d.B * d.G * d.S * d.E; }

// Positions of chunk g that exist: C, or fewer in a short last chunk.
__device__ __forceinline__ int64_t chunk_length(const Dims& d, int64_t g) {
  const int64_t rest = d.L - g * d.C;
  return rest < d.C ? rest : d.C;
}

// ---- chunk_states: state_g[s, e] = sum_t K_lin[t, s] V[t, e] over the positions t of chunk g --------------------
// grid (B * G, ceil(S / 64), ceil(E / 64)).
template <typename T>
__global__ void chunk_states_kernel(const T* __restrict__ k_lin, const T* __restrict__ v, Dims d, float* states) {
  const int64_t b = blockIdx.x / d.G, g = blockIdx.x % d.G;
  const int64_t s0 = static_cast<int64_t>(blockIdx.y) * kTile, e0 = static_cast<int64_t>(blockIdx.z) * kTile;
  const int64_t first = b * d.L + g * d.C, len = chunk_length(d, g);  // the chunk's first row in (B * L)
  unsigned char* smem = product_smem<T, kTile, kTile>();
  const T zero_t = from_float<T>(0.f);
  FragAcc acc[2][2];
  zero(acc);
  accumulate_product<T, kTile, kTile, wmma::col_major, wmma::row_major>(  // element (s, t) = K_lin[t][s]
      acc, 0, len, [&](int r, int64_t t) { return s0 + r < d.S ? k_lin[(first + t) * d.S + s0 + r] : zero_t; },
      [&](int64_t t, int c) { return e0 + c < d.E ? v[(first + t) * d.E + e0 + c] : zero_t; },
      reinterpret_cast<T*>(smem));
  float* out = states + (b * d.G + g) * d.S * d.E;
  store_tile<kTile, kTile>(acc, reinterpret_cast<float*>(smem), [&](int r, int c, float x) {
    if (s0 + r < d.S && e0 + c < d.E) out[(s0 + r) * d.E + e0 + c] = x;
  });
}

// ---- state_prefix: the state each chunk reads, in place, times lin_scale ---------------------------------------
// causal: slot g <- lin_scale * sum_{h<g} state_h (strictly earlier chunks, an exclusive prefix sum), or with
// `reverse` lin_scale * sum_{h>g} state_h (strictly later chunks: the backward's states gradient, as chunk h's state
// reaches every later chunk); bidirectional: slot 0 <- lin_scale * sum_h state_h, which every chunk reads. Folding
// lin_scale in here keeps the state near the output's magnitude before it is rounded to 16 bits.
// grid (ceil(S * E / 256), B), block 256; one thread per state element, walking the chunks.
__global__ void state_prefix_kernel(Dims d, bool causal, bool reverse, float lin_scale, float* states) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x, SE = d.S * d.E;
  if (i >= SE) return;
  float* slot = states + static_cast<int64_t>(blockIdx.y) * d.G * SE + i;
  float sum = 0.f;
  for (int64_t step = 0; step < d.G; ++step) {
    const int64_t g = reverse ? d.G - 1 - step : step;
    const float state = slot[g * SE];
    if (causal) slot[g * SE] = lin_scale * sum;
    sum += state;
  }
  if (!causal) slot[0] = lin_scale * sum;
}

// chunk_states then state_prefix on (keys, values): the states every chunk reads, in `states`.
template <typename T>
void launch_chunk_states(const T* keys, const T* values, const Dims& d, bool causal, bool reverse, float lin_scale,
                         float* states, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(d.B * d.G), static_cast<unsigned>((d.S + kTile - 1) / kTile),
                  static_cast<unsigned>((d.E + kTile - 1) / kTile));
  chunk_states_kernel<T><<<grid, kThreads, 0, stream>>>(keys, values, d, states);
  const unsigned se_blocks = static_cast<unsigned>((d.S * d.E + kPrefixThreads - 1) / kPrefixThreads);
  state_prefix_kernel<<<dim3(se_blocks, static_cast<unsigned>(d.B)), kPrefixThreads, 0, stream>>>(
      d, causal, reverse, lin_scale, states);
}

}  // namespace
}  // namespace subq
