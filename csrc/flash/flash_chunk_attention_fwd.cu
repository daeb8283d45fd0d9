// FLASH mixed-chunk attention forward: three kernels (see flash_chunk_attention.h), tensor-core tiles through WMMA
// on 16-bit inputs with float32 accumulation. Each block has 4 warps as 2 x 2; reductions are staged through
// shared memory; every global load is bounds-checked and zero-filled, so L, S and E need not be tile multiples and
// nothing at or past L is read.
#include "flash/flash_chunk_attention.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "common/cuda_status.h"
#include "common/dispatch.h"
#include "flash/flash_chunk_states.cuh"

namespace subq {
namespace {

// chunk_output: 64 queries x 128 values per block, keys 64 at a time. The scores are recomputed for every E tile,
// so 128 values halve that recompute against 64 while the accumulators stay at 64 floats a thread (warp 32 x 64).
constexpr int kQueryTile = kTile;
constexpr int kKeyTile = kTile;
constexpr int kValueTile = 128;

// ---- chunk_output: out = (relu(quad_scale Q_quad K_quadᵀ + bias)² V + Q_lin state) * u ------------------------------
// grid (B * G, C / 64, ceil(E / 128)): chunk, query tile, value tile. The relu² kernel is zero for keys past L and,
// when causal, for keys after the query; key tiles wholly after the query tile (causal) or past L are skipped.
template <typename T>
__global__ void chunk_output_kernel(FlashChunkParams p, Dims d, const float* states) {
  const int64_t b = blockIdx.x / d.G, g = blockIdx.x % d.G;
  const int q0 = static_cast<int>(blockIdx.y) * kQueryTile;  // query offsets q0.. within the chunk
  const int64_t e0 = static_cast<int64_t>(blockIdx.z) * kValueTile;
  const int64_t first = b * d.L + g * d.C, len = chunk_length(d, g);
  if (q0 >= len) return;  // every query of the tile is past L: no output
  const T* q_quad = static_cast<const T*>(p.q_quad);
  const T* k_quad = static_cast<const T*>(p.k_quad);
  const T* q_lin = static_cast<const T*>(p.q_lin);
  const T* v = static_cast<const T*>(p.v);
  const T zero_t = from_float<T>(0.f);

  // The staging of the 64 x 128 products (which the 64 x 64 score product fits in) and the float32 scores, both
  // overlaid by the float32 output tile of the epilogue. 33 KB in all.
  constexpr int kStageBytes = stage_bytes<T, kQueryTile, kValueTile>();
  constexpr int kScoreBytes = tile_bytes<kQueryTile, kKeyTile>();
  constexpr int kOutBytes = tile_bytes<kQueryTile, kValueTile>();
  static_assert(stage_bytes<T, kQueryTile, kKeyTile>() <= kStageBytes, "the score product stages in the same bytes");
  __shared__ __align__(32) unsigned char smem[kStageBytes + kScoreBytes > kOutBytes ? kStageBytes + kScoreBytes
                                                                                     : kOutBytes];
  T* stage = reinterpret_cast<T*>(smem);
  float* sS = reinterpret_cast<float*>(smem + kStageBytes);  // [query][key] scores

  FragAcc acc[2][4];  // the 64 x 128 output tile: warp (wr, wc) holds rows wr * 32.., columns wc * 64..
  zero(acc);

  // Local part. Causal: key tiles up to the query tile's own (its diagonal square); it starts before len, so
  // every one of them holds a key that exists.
  const int key_tiles = p.causal ? q0 / kKeyTile + 1 : static_cast<int>((len + kKeyTile - 1) / kKeyTile);
  for (int kt = 0; kt < key_tiles; ++kt) {
    const int k0 = kt * kKeyTile;
    FragAcc score[2][2];  // the 64 x 64 score tile: warp (wr, wc) holds rows wr * 32.., keys wc * 32..
    zero(score);
    accumulate_product<T, kQueryTile, kKeyTile, wmma::row_major, wmma::col_major>(
        score, 0, d.S, [&](int r, int64_t s) { return q0 + r < len ? q_quad[(first + q0 + r) * d.S + s] : zero_t; },
        [&](int64_t s, int c) { return k0 + c < len ? k_quad[(first + k0 + c) * d.S + s] : zero_t; }, stage);
    // sS: the previous key tile's readers were its product's loaders, done before that product's last barrier;
    // the next product's first barrier publishes it.
    spill<kQueryTile, kKeyTile>(score, sS);
    accumulate_product<T, kQueryTile, kValueTile, wmma::row_major, wmma::row_major>(
        acc, k0, k0 + kKeyTile,
        [&](int r, int64_t kj) {  // the relu² kernel, kj a key offset within the chunk
          const int qi = q0 + r;
          float x = p.quad_scale * tile_at<kKeyTile>(sS, r, static_cast<int>(kj) - k0);
          if (p.rel_bias) x += p.rel_bias[kj - qi + d.C - 1];
          x = x < 0.f ? 0.f : x;  // relu that keeps NaN, as torch's does
          const bool keep = kj < len && (!p.causal || kj <= qi);
          return keep ? x * x : 0.f;
        },
        [&](int64_t kj, int c) { return kj < len && e0 + c < d.E ? v[(first + kj) * d.E + e0 + c] : zero_t; },
        stage);
  }

  // Global part: Q_lin times the state this chunk reads (already times lin_scale), rounded to 16 bits per tile.
  const float* state = states + (b * d.G + (p.causal ? g : 0)) * d.S * d.E;
  accumulate_product<T, kQueryTile, kValueTile, wmma::row_major, wmma::row_major>(
      acc, 0, d.S, [&](int r, int64_t s) { return q0 + r < len ? q_lin[(first + q0 + r) * d.S + s] : zero_t; },
      [&](int64_t s, int c) { return e0 + c < d.E ? state[s * d.E + e0 + c] : 0.f; }, stage);

  // Epilogue: gate, bounds, 16-bit store.
  const T* u = static_cast<const T*>(p.u);
  T* out = static_cast<T*>(p.out);
  store_tile<kQueryTile, kValueTile>(acc, reinterpret_cast<float*>(smem), [&](int r, int c, float o) {
    const int64_t e = e0 + c;
    if (q0 + r >= len || e >= d.E) return;
    const int64_t offset = (first + q0 + r) * d.E + e;
    if (u) o *= to_float(u[offset]);
    out[offset] = from_float<T>(o);
  });
}

template <typename T>
Status launch(const FlashChunkParams& p, const Dims& d, cudaStream_t stream) {
  auto* states = static_cast<float*>(p.workspace);
  launch_chunk_states(static_cast<const T*>(p.k_lin), static_cast<const T*>(p.v), d, p.causal, /*reverse=*/false,
                      p.lin_scale, states, stream);
  const unsigned chunks = static_cast<unsigned>(d.B * d.G);
  chunk_output_kernel<T><<<dim3(chunks, static_cast<unsigned>(d.C / kQueryTile),
                                static_cast<unsigned>((d.E + kValueTile - 1) / kValueTile)),
                           kThreads, 0, stream>>>(p, d, states);
  return launch_status();
}

}  // namespace

size_t flash_chunk_attention_fwd_workspace_bytes(const FlashChunkShape& shape) {
  return (state_bytes(make_dims(shape)) + 255) / 256 * 256;
}

Status run_flash_chunk_attention_fwd(const FlashChunkParams& p, cudaStream_t stream) {
  const FlashChunkShape& s = p.shape;
  if (p.dtype == DType::kFloat32) return Status::kUnsupported;
  if (!shape_supported(s)) return Status::kInvalidArgument;
  if (s.batch == 0 || s.seqlen == 0) return Status::kSuccess;
  if (!p.q_quad || !p.k_quad || !p.q_lin || !p.k_lin || !p.v || !p.out || !p.workspace) {
    return Status::kInvalidArgument;
  }
  const Dims d = make_dims(s);
  if (d.B * d.G > 0x7fffffff) return Status::kInvalidArgument;
  return SUBQ_HALF_DTYPE_SWITCH(p.dtype, T, [&] { return launch<T>(p, d, stream); });
}

}  // namespace subq
