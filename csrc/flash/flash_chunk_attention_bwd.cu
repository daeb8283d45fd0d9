// FLASH mixed-chunk attention backward (see flash_chunk_attention.h): the gradients of the ATen composite's
// flash_chunk_attention_bwd (csrc/flash/flash_cpu.cpp), on tensor cores through WMMA with 16-bit operands
// and float32 accumulation. With dO = dout ⊙ u (dout without a gate), in launch order:
//   chunk_states, state_prefix   on (K_lin, V): the states the forward read, state_g = lin_scale Σ_{h<g} K_lin,hᵀ V_h
//                                (causal) or lin_scale Σ_h K_lin,hᵀ V_h (bidirectional, in slot 0);
//   gate_gradient                dO = dout ⊙ u, rounded to 16 bits (only with a gate);
//   chunk_states, state_prefix   on (Q_lin, dO), the prefix reversed: the gradient of chunk g's K_lin,gᵀ V_g,
//                                dstate_g = lin_scale Σ_{h>g} Q_lin,hᵀ dO_h (causal: the chunks that read it) or
//                                lin_scale Σ_h Q_lin,hᵀ dO_h (bidirectional, in slot 0);
//   score_gradient               per chunk and 64 x 64 (query, key) square: s = quad_scale Q_quad K_quadᵀ + bias,
//                                P = relu(s)², dP = dO Vᵀ, ds = 2 relu(s) dP, both zero where masked, into the
//                                workspace; drel_bias[j - i + C - 1] += ds by a per-block diagonal sum and one float32
//                                atomicAdd per diagonal;
//   output_gradient              du = dout ⊙ (P V + Q_lin state): the forward's output recomputed (only with a gate);
//   value_gradient               dV = Pᵀ dO + K_lin dstate;
//   feature_gradient             dQ_quad = quad_scale ds K_quad, dK_quad = quad_scale dsᵀ Q_quad, dQ_lin = dO stateᵀ,
//                                dK_lin = V dstateᵀ (lin_scale is in state and dstate).
// P and ds go through the workspace in 16 bits (B·L·C elements each): the value, output and feature gradients reduce
// them along different axes, and recomputing them per output tile would repeat the S and E reductions of each square.
// Masks are the composite's: keys past L, and keys after the query when causal; P and ds are written as zero there
// (and for queries past L), so the kernels that read them only bound their loops by the chunk's length.
#include "flash/flash_chunk_attention.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "common/cuda_status.h"
#include "common/dispatch.h"
#include "flash/flash_chunk_states.cuh"

namespace subq {
namespace {

// Positions (queries or keys) per block tile; every chunk size is a multiple, so no tile straddles two chunks.
constexpr int kRowTile = kTile;
// value_gradient and output_gradient: 128 values per block (warp 32 x 64), as the forward's chunk_output.
constexpr int kValueTile = 128;
// feature_gradient: 64 features per block, so S <= 256 takes at most 4 tiles (warp 32 x 32).
constexpr int kFeatureTile = 64;
constexpr int kGateThreads = 256;
static_assert(kThreads >= 2 * kRowTile - 1, "score_gradient sums one diagonal of its square per thread");

// Typed pointers and sizes every kernel reads (one struct, passed by value).
template <typename T>
struct Tensors {
  Dims d;
  bool causal;
  float quad_scale;
  const T *q_quad, *k_quad, *q_lin, *k_lin, *v, *dout;
  const T* d_out_gated;  // dO: dout ⊙ u in the workspace, or dout itself without a gate
  const float* rel_bias;
  const float* state;    // the forward's states (B, G, S, E), times lin_scale
  const float* dstate;   // their gradients (B, G, S, E), times lin_scale
  T* kernel;             // P = relu(s)², (B, G, C, C)
  T* dscore;             // ds, (B, G, C, C)
  T *dq_quad, *dk_quad, *dq_lin, *dk_lin, *dv, *du;
  float* drel_bias;
};

// Where a block's chunk lies: batch row b, chunk g, its first row in (B * L), its length, and the offset of its
// C x C square in P and ds.
struct Chunk {
  int64_t b, g, first, len, square;
};

__device__ __forceinline__ Chunk block_chunk(const Dims& d) {
  Chunk c;
  c.b = blockIdx.x / d.G;
  c.g = blockIdx.x % d.G;
  c.first = c.b * d.L + c.g * d.C;
  c.len = chunk_length(d, c.g);
  c.square = (c.b * d.G + c.g) * d.C * d.C;
  return c;
}

// The state slot chunk g reads (its own when causal, the shared total in slot 0 when bidirectional).
__device__ __forceinline__ int64_t state_offset(const Dims& d, bool causal, const Chunk& c) {
  return (c.b * d.G + (causal ? c.g : 0)) * d.S * d.E;
}

// ---- gate_gradient: dO = dout ⊙ u -----------------------------------------------------------------------------------
template <typename T>
__global__ void gate_gradient_kernel(const T* __restrict__ dout, const T* __restrict__ u, int64_t n,
                                     T* __restrict__ d_out_gated) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    d_out_gated[i] = from_float<T>(to_float(dout[i]) * to_float(u[i]));
  }
}

// ---- score_gradient: P = relu(s)², ds = 2 relu(s) dO Vᵀ per (query tile, key tile) square; drel_bias ----------------
// grid (B * G, C / 64, C / 64): chunk, query tile, key tile.
template <typename T>
__global__ void score_gradient_kernel(Tensors<T> t) {
  const Dims& d = t.d;
  const Chunk ch = block_chunk(d);
  const int q0 = static_cast<int>(blockIdx.y) * kRowTile, k0 = static_cast<int>(blockIdx.z) * kRowTile;
  T* kernel = t.kernel + ch.square;
  T* dscore = t.dscore + ch.square;
  const T zero_t = from_float<T>(0.f);
  // A square wholly past L, or (causal) wholly after the diagonal, is zero; it is written all the same, so that the
  // readers of P and ds never meet an unwritten element.
  if (q0 >= ch.len || k0 >= ch.len || (t.causal && k0 > q0)) {
    for (int i = threadIdx.x; i < kRowTile * kRowTile; i += kThreads) {
      const int64_t offset = static_cast<int64_t>(q0 + i / kRowTile) * d.C + k0 + i % kRowTile;
      kernel[offset] = zero_t;
      dscore[offset] = zero_t;
    }
    return;
  }

  // The staging tiles, then the float32 scores and dP (dP becomes ds in place, which the bias sum reads).
  constexpr int kTileFloats = kRowTile * (kRowTile + kOutPad);
  unsigned char* smem = product_smem<T, kRowTile, kRowTile, 2>();
  T* stage = reinterpret_cast<T*>(smem);
  float* sScore = reinterpret_cast<float*>(smem);
  float* sGrad = sScore + kTileFloats;

  FragAcc score[2][2], grad[2][2];
  zero(score);
  zero(grad);
  const int64_t first = ch.first, len = ch.len;
  accumulate_product<T, kRowTile, kRowTile, wmma::row_major, wmma::col_major>(
      score, 0, d.S,
      [&](int r, int64_t s) { return q0 + r < len ? t.q_quad[(first + q0 + r) * d.S + s] : zero_t; },
      [&](int64_t s, int c) { return k0 + c < len ? t.k_quad[(first + k0 + c) * d.S + s] : zero_t; }, stage);
  accumulate_product<T, kRowTile, kRowTile, wmma::row_major, wmma::col_major>(
      grad, 0, d.E,
      [&](int r, int64_t e) { return q0 + r < len ? t.d_out_gated[(first + q0 + r) * d.E + e] : zero_t; },
      [&](int64_t e, int c) { return k0 + c < len ? t.v[(first + k0 + c) * d.E + e] : zero_t; }, stage);
  __syncthreads();  // sScore and sGrad overwrite the staging tiles
  spill<kRowTile, kRowTile>(score, sScore);
  spill<kRowTile, kRowTile>(grad, sGrad);
  __syncthreads();

  for (int i = threadIdx.x; i < kRowTile * kRowTile; i += kThreads) {
    const int r = i / kRowTile, c = i % kRowTile;
    const int qi = q0 + r, kj = k0 + c;  // offsets within the chunk
    float x = t.quad_scale * tile_at<kRowTile>(sScore, r, c);
    if (t.rel_bias) x += t.rel_bias[kj - qi + d.C - 1];
    const float relu = x < 0.f ? 0.f : x;  // keeps NaN, as torch's relu does
    const bool keep = qi < len && kj < len && (!t.causal || kj <= qi);
    const float ds = keep ? 2.f * relu * tile_at<kRowTile>(sGrad, r, c) : 0.f;
    const int64_t offset = static_cast<int64_t>(qi) * d.C + kj;
    kernel[offset] = from_float<T>(keep ? relu * relu : 0.f);
    dscore[offset] = from_float<T>(ds);
    tile_at<kRowTile>(sGrad, r, c) = ds;
  }
  if (!t.drel_bias) return;
  __syncthreads();
  // Thread δ + 63 sums the square's diagonal kj - qi = k0 - q0 + δ (δ in -63..63) in float32, then adds it once.
  if (threadIdx.x < 2 * kRowTile - 1) {
    const int delta = static_cast<int>(threadIdx.x) - (kRowTile - 1);
    const int r_begin = delta < 0 ? -delta : 0, r_end = delta < 0 ? kRowTile : kRowTile - delta;
    float sum = 0.f;
    for (int r = r_begin; r < r_end; ++r) sum += tile_at<kRowTile>(sGrad, r, r + delta);
    atomicAdd(&t.drel_bias[k0 - q0 + delta + d.C - 1], sum);
  }
}

// ---- output_gradient: du = dout ⊙ (P V + Q_lin state) ---------------------------------------------------------------
// grid (B * G, C / 64, ceil(E / 128)): chunk, query tile, value tile.
template <typename T>
__global__ void output_gradient_kernel(Tensors<T> t) {
  const Dims& d = t.d;
  const Chunk ch = block_chunk(d);
  const int i0 = static_cast<int>(blockIdx.y) * kRowTile;
  const int64_t e0 = static_cast<int64_t>(blockIdx.z) * kValueTile;
  if (i0 >= ch.len) return;  // every query of the tile is past L
  unsigned char* smem = product_smem<T, kRowTile, kValueTile>();
  T* stage = reinterpret_cast<T*>(smem);
  const T zero_t = from_float<T>(0.f);
  const int64_t first = ch.first, len = ch.len;
  const T* kernel = t.kernel + ch.square;
  const float* state = t.state + state_offset(d, t.causal, ch);

  FragAcc acc[2][4];
  zero(acc);
  // Local part: P is zero for keys after the query tile when causal, so the loop stops at its end.
  const int64_t key_end = t.causal && i0 + kRowTile < len ? i0 + kRowTile : len;
  accumulate_product<T, kRowTile, kValueTile, wmma::row_major, wmma::row_major>(
      acc, 0, key_end, [&](int r, int64_t j) { return kernel[(i0 + r) * d.C + j]; },
      [&](int64_t j, int c) { return e0 + c < d.E ? t.v[(first + j) * d.E + e0 + c] : zero_t; }, stage);
  // Global part: Q_lin times the state (already times lin_scale), rounded to 16 bits as in the forward.
  accumulate_product<T, kRowTile, kValueTile, wmma::row_major, wmma::row_major>(
      acc, 0, d.S, [&](int r, int64_t s) { return i0 + r < len ? t.q_lin[(first + i0 + r) * d.S + s] : zero_t; },
      [&](int64_t s, int c) { return from_float<T>(e0 + c < d.E ? state[s * d.E + e0 + c] : 0.f); }, stage);
  store_tile<kRowTile, kValueTile>(acc, reinterpret_cast<float*>(smem), [&](int r, int c, float o) {
    if (i0 + r >= len || e0 + c >= d.E) return;
    const int64_t offset = (first + i0 + r) * d.E + e0 + c;
    t.du[offset] = from_float<T>(to_float(t.dout[offset]) * o);
  });
}

// ---- value_gradient: dV = Pᵀ dO + K_lin dstate ----------------------------------------------------------------------
// grid (B * G, C / 64, ceil(E / 128)): chunk, key tile, value tile.
template <typename T>
__global__ void value_gradient_kernel(Tensors<T> t) {
  const Dims& d = t.d;
  const Chunk ch = block_chunk(d);
  const int j0 = static_cast<int>(blockIdx.y) * kRowTile;
  const int64_t e0 = static_cast<int64_t>(blockIdx.z) * kValueTile;
  if (j0 >= ch.len) return;  // every key of the tile is past L
  unsigned char* smem = product_smem<T, kRowTile, kValueTile>();
  T* stage = reinterpret_cast<T*>(smem);
  const T zero_t = from_float<T>(0.f);
  const int64_t first = ch.first, len = ch.len;
  const T* kernel = t.kernel + ch.square;
  const float* dstate = t.dstate + state_offset(d, t.causal, ch);

  FragAcc acc[2][4];
  zero(acc);
  // Local part, over the chunk's queries: P is zero for queries before the key tile when causal.
  accumulate_product<T, kRowTile, kValueTile, wmma::col_major, wmma::row_major>(
      acc, t.causal ? j0 : 0, len, [&](int r, int64_t i) { return kernel[i * d.C + j0 + r]; },
      [&](int64_t i, int c) { return e0 + c < d.E ? t.d_out_gated[(first + i) * d.E + e0 + c] : zero_t; }, stage);
  // Global part: chunk j's keys and values reach the output through K_lin,jᵀ V_j, whose gradient is dstate.
  accumulate_product<T, kRowTile, kValueTile, wmma::row_major, wmma::row_major>(
      acc, 0, d.S, [&](int r, int64_t s) { return j0 + r < len ? t.k_lin[(first + j0 + r) * d.S + s] : zero_t; },
      [&](int64_t s, int c) { return from_float<T>(e0 + c < d.E ? dstate[s * d.E + e0 + c] : 0.f); }, stage);
  store_tile<kRowTile, kValueTile>(acc, reinterpret_cast<float*>(smem), [&](int r, int c, float x) {
    if (j0 + r < len && e0 + c < d.E) t.dv[(first + j0 + r) * d.E + e0 + c] = from_float<T>(x);
  });
}

// ---- feature_gradient: one of the four (B, L, S) gradients ----------------------------------------------------------
enum class Feature { kQuadQuery, kQuadKey, kLinQuery, kLinKey };

// grid (B * G, C / 64, ceil(S / 64)): chunk, position tile, feature tile.
template <typename T, Feature kFeature>
__global__ void feature_gradient_kernel(Tensors<T> t) {
  const Dims& d = t.d;
  const Chunk ch = block_chunk(d);
  const int r0 = static_cast<int>(blockIdx.y) * kRowTile;  // the tile's positions (queries or keys) in the chunk
  const int64_t s0 = static_cast<int64_t>(blockIdx.z) * kFeatureTile;
  if (r0 >= ch.len) return;  // every position of the tile is past L
  unsigned char* smem = product_smem<T, kRowTile, kFeatureTile>();
  T* stage = reinterpret_cast<T*>(smem);
  const T zero_t = from_float<T>(0.f);
  const int64_t first = ch.first, len = ch.len;
  const T* dscore = t.dscore + ch.square;

  FragAcc acc[2][2];
  zero(acc);
  float scale = 1.f;
  T* grad = nullptr;
  if constexpr (kFeature == Feature::kQuadQuery) {
    // dQ_quad[i, s] = quad_scale Σ_j ds[i, j] K_quad[j, s]; ds is zero for keys after the tile when causal.
    const int64_t key_end = t.causal && r0 + kRowTile < len ? r0 + kRowTile : len;
    accumulate_product<T, kRowTile, kFeatureTile, wmma::row_major, wmma::row_major>(
        acc, 0, key_end, [&](int r, int64_t j) { return dscore[(r0 + r) * d.C + j]; },
        [&](int64_t j, int c) { return s0 + c < d.S ? t.k_quad[(first + j) * d.S + s0 + c] : zero_t; }, stage);
    scale = t.quad_scale;
    grad = t.dq_quad;
  } else if constexpr (kFeature == Feature::kQuadKey) {
    // dK_quad[j, s] = quad_scale Σ_i ds[i, j] Q_quad[i, s]; ds is zero for queries before the tile when causal.
    accumulate_product<T, kRowTile, kFeatureTile, wmma::col_major, wmma::row_major>(
        acc, t.causal ? r0 : 0, len, [&](int r, int64_t i) { return dscore[i * d.C + r0 + r]; },
        [&](int64_t i, int c) { return s0 + c < d.S ? t.q_quad[(first + i) * d.S + s0 + c] : zero_t; }, stage);
    scale = t.quad_scale;
    grad = t.dk_quad;
  } else if constexpr (kFeature == Feature::kLinQuery) {
    // dQ_lin[i, s] = Σ_e dO[i, e] state[s, e] (lin_scale is in the state).
    const float* state = t.state + state_offset(d, t.causal, ch);
    accumulate_product<T, kRowTile, kFeatureTile, wmma::row_major, wmma::col_major>(
        acc, 0, d.E,
        [&](int r, int64_t e) { return r0 + r < len ? t.d_out_gated[(first + r0 + r) * d.E + e] : zero_t; },
        [&](int64_t e, int c) { return from_float<T>(s0 + c < d.S ? state[(s0 + c) * d.E + e] : 0.f); }, stage);
    grad = t.dq_lin;
  } else {
    // dK_lin[j, s] = Σ_e V[j, e] dstate[s, e] (lin_scale is in dstate).
    const float* dstate = t.dstate + state_offset(d, t.causal, ch);
    accumulate_product<T, kRowTile, kFeatureTile, wmma::row_major, wmma::col_major>(
        acc, 0, d.E, [&](int r, int64_t e) { return r0 + r < len ? t.v[(first + r0 + r) * d.E + e] : zero_t; },
        [&](int64_t e, int c) { return from_float<T>(s0 + c < d.S ? dstate[(s0 + c) * d.E + e] : 0.f); }, stage);
    grad = t.dk_lin;
  }
  store_tile<kRowTile, kFeatureTile>(acc, reinterpret_cast<float*>(smem), [&](int r, int c, float x) {
    if (r0 + r < len && s0 + c < d.S) grad[(first + r0 + r) * d.S + s0 + c] = from_float<T>(scale * x);
  });
}

// ---- workspace and launch -------------------------------------------------------------------------------------------

size_t aligned(size_t bytes) { return (bytes + 255) / 256 * 256; }

// The workspace, in order: state and dstate (float32, B x G x S x E each), P and ds (16-bit, B x G x C x C each),
// dO (16-bit, B x L x E).
struct Workspace {
  size_t state, square, gated;  // bytes of each region
};

Workspace workspace_layout(const Dims& d) {
  constexpr size_t kHalf = 2;  // the backward takes 16-bit inputs only
  return {aligned(state_bytes(d)), aligned(kHalf * d.B * d.G * d.C * d.C), aligned(kHalf * d.B * d.L * d.E)};
}

unsigned tiles(int64_t n, int tile) { return static_cast<unsigned>((n + tile - 1) / tile); }

template <typename T>
Status launch(const FlashChunkParams& p, const FlashChunkGrads& g, const Dims& d, cudaStream_t stream) {
  const Workspace w = workspace_layout(d);
  auto* base = static_cast<unsigned char*>(g.workspace);
  auto* state = reinterpret_cast<float*>(base);
  auto* dstate = reinterpret_cast<float*>(base + w.state);
  auto* kernel = reinterpret_cast<T*>(base + 2 * w.state);
  auto* dscore = reinterpret_cast<T*>(base + 2 * w.state + w.square);
  auto* d_out_gated = reinterpret_cast<T*>(base + 2 * w.state + 2 * w.square);

  const T* dout = static_cast<const T*>(g.dout);
  const T* u = static_cast<const T*>(p.u);
  Tensors<T> t{d,
               p.causal,
               p.quad_scale,
               static_cast<const T*>(p.q_quad),
               static_cast<const T*>(p.k_quad),
               static_cast<const T*>(p.q_lin),
               static_cast<const T*>(p.k_lin),
               static_cast<const T*>(p.v),
               dout,
               u ? d_out_gated : dout,
               p.rel_bias,
               state,
               dstate,
               kernel,
               dscore,
               static_cast<T*>(g.dq_quad),
               static_cast<T*>(g.dk_quad),
               static_cast<T*>(g.dq_lin),
               static_cast<T*>(g.dk_lin),
               static_cast<T*>(g.dv),
               u ? static_cast<T*>(g.du) : nullptr,
               p.rel_bias ? g.drel_bias : nullptr};

  launch_chunk_states(t.k_lin, t.v, d, p.causal, /*reverse=*/false, p.lin_scale, state, stream);
  if (u) {
    const int64_t n = d.B * d.L * d.E;
    const int64_t blocks = (n + kGateThreads - 1) / kGateThreads;
    gate_gradient_kernel<T><<<static_cast<unsigned>(blocks < 65536 ? blocks : 65536), kGateThreads, 0, stream>>>(
        dout, u, n, d_out_gated);
  }
  launch_chunk_states(t.q_lin, t.d_out_gated, d, p.causal, /*reverse=*/true, p.lin_scale, dstate, stream);
  if (t.drel_bias) {
    SUBQ_RETURN_IF_ERROR(cuda_status(cudaMemsetAsync(t.drel_bias, 0, sizeof(float) * (2 * d.C - 1), stream)));
  }

  const unsigned chunks = static_cast<unsigned>(d.B * d.G), row_tiles = tiles(d.C, kRowTile);
  score_gradient_kernel<T><<<dim3(chunks, row_tiles, row_tiles), kThreads, 0, stream>>>(t);
  const dim3 value_grid(chunks, row_tiles, tiles(d.E, kValueTile));
  if (u) output_gradient_kernel<T><<<value_grid, kThreads, 0, stream>>>(t);
  value_gradient_kernel<T><<<value_grid, kThreads, 0, stream>>>(t);
  const dim3 feature_grid(chunks, row_tiles, tiles(d.S, kFeatureTile));
  feature_gradient_kernel<T, Feature::kQuadQuery><<<feature_grid, kThreads, 0, stream>>>(t);
  feature_gradient_kernel<T, Feature::kQuadKey><<<feature_grid, kThreads, 0, stream>>>(t);
  feature_gradient_kernel<T, Feature::kLinQuery><<<feature_grid, kThreads, 0, stream>>>(t);
  feature_gradient_kernel<T, Feature::kLinKey><<<feature_grid, kThreads, 0, stream>>>(t);
  return launch_status();
}

}  // namespace

size_t flash_chunk_attention_bwd_workspace_bytes(const FlashChunkShape& shape) {
  const Workspace w = workspace_layout(make_dims(shape));
  return 2 * w.state + 2 * w.square + w.gated;
}

Status run_flash_chunk_attention_bwd(const FlashChunkParams& p, const FlashChunkGrads& g, cudaStream_t stream) {
  const FlashChunkShape& s = p.shape;
  if (p.dtype == DType::kFloat32) return Status::kUnsupported;
  if (!shape_supported(s)) return Status::kInvalidArgument;
  if (s.batch == 0 || s.seqlen == 0) return Status::kSuccess;
  if (!p.q_quad || !p.k_quad || !p.q_lin || !p.k_lin || !p.v || !g.dout || !g.dq_quad || !g.dk_quad || !g.dq_lin ||
      !g.dk_lin || !g.dv || (p.u && !g.du) || (p.rel_bias && !g.drel_bias) || !g.workspace) {
    return Status::kInvalidArgument;
  }
  const Dims d = make_dims(s);
  if (d.B * d.G > 0x7fffffff) return Status::kInvalidArgument;
  return SUBQ_HALF_DTYPE_SWITCH(p.dtype, T, [&] { return launch<T>(p, g, d, stream); });
}

}  // namespace subq
