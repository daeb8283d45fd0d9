// FLASH mixed-chunk attention forward: three kernels (see flash_chunk_attention.h), tensor-core tiles through WMMA
// on 16-bit inputs with float32 accumulation. Each block has 4 warps as 2 x 2; reductions are staged through
// shared memory; every global load is bounds-checked and zero-filled, so L, S and E need not be tile multiples and
// nothing at or past L is read.
#include "flash/flash_chunk_attention.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "common/cuda_status.h"
#include "flash/flash_chunk_states.cuh"

namespace subq {
namespace {

// chunk_output: 64 queries x 128 values per block, keys 64 at a time. The scores are recomputed for every E tile,
// so 128 values halve that recompute against 64 while the accumulators stay at 64 floats a thread (warp 32 x 64).
constexpr int kQueryTile = 64;
constexpr int kKeyTile = 64;
constexpr int kValueTile = 128;
static_assert(kQueryTile == kKeyTile, "chunk_output stages query and key rows in one loop");
static_assert(kStep <= kKeyTile, "chunk_output stages the state's rows in the value tile");

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

  // The score operands (query and key rows) share bytes with the relu² tile computed from them; the value tile and
  // the float32 scores share bytes with the float32 output tile of the epilogue. 44 KB in all.
  constexpr int kOperandBytes = (kQueryTile + kKeyTile) * (kStep + kPad) * sizeof(T);
  constexpr int kKernelBytes = kQueryTile * (kKeyTile + kPad) * sizeof(T);
  constexpr int kValueBytes = kKeyTile * (kValueTile + kPad) * sizeof(T);
  constexpr int kScoreBytes = kQueryTile * (kKeyTile + kOutPad) * sizeof(float);
  constexpr int kOutBytes = kQueryTile * (kValueTile + kOutPad) * sizeof(float);
  __shared__ __align__(32) unsigned char raw_a[kOperandBytes > kKernelBytes ? kOperandBytes : kKernelBytes];
  __shared__ __align__(32) unsigned char
      raw_b[kValueBytes + kScoreBytes > kOutBytes ? kValueBytes + kScoreBytes : kOutBytes];
  auto sQ = reinterpret_cast<T (*)[kStep + kPad]>(raw_a);  // [query][s]: q_quad, then q_lin
  auto sK = reinterpret_cast<T (*)[kStep + kPad]>(raw_a + kQueryTile * (kStep + kPad) * sizeof(T));  // [key][s]
  auto sP = reinterpret_cast<T (*)[kKeyTile + kPad]>(raw_a);          // [query][key]: the relu² kernel
  auto sV = reinterpret_cast<T (*)[kValueTile + kPad]>(raw_b);        // [key][e], then [s][e] of the state
  auto sS = reinterpret_cast<float (*)[kKeyTile + kOutPad]>(raw_b + kValueBytes);  // [query][key] scores
  auto sOut = reinterpret_cast<float (*)[kValueTile + kOutPad]>(raw_b);

  const int warp = threadIdx.x / 32, wr = warp / 2, wc = warp % 2;
  FragAcc acc[2][4];  // the 64 x 128 output tile: warp (wr, wc) holds rows wr * 32.., columns wc * 64..
  zero(acc);

  // Local part. Causal: key tiles up to the query tile's own (its diagonal square); it starts before len, so
  // every one of them holds a key that exists.
  const int key_tiles = p.causal ? q0 / kKeyTile + 1 : static_cast<int>((len + kKeyTile - 1) / kKeyTile);
  for (int kt = 0; kt < key_tiles; ++kt) {
    const int k0 = kt * kKeyTile;
    FragAcc score[2][2];  // the 64 x 64 score tile: warp (wr, wc) holds rows wr * 32.., keys wc * 32..
    zero(score);
    for (int64_t s0 = 0; s0 < d.S; s0 += kStep) {
      __syncthreads();  // the previous readers of sQ, sK (or of sP, sV) are done
      for (int i = threadIdx.x; i < kQueryTile * kStep; i += kThreads) {
        const int r = i / kStep, k = i % kStep;
        const int64_t s = s0 + k;
        sQ[r][k] = q0 + r < len && s < d.S ? q_quad[(first + q0 + r) * d.S + s] : zero_t;
        sK[r][k] = k0 + r < len && s < d.S ? k_quad[(first + k0 + r) * d.S + s] : zero_t;
      }
      __syncthreads();
      for (int kk = 0; kk < kStep; kk += 16) {
        FragA<T> fa[2];
        FragBcol<T> fb[2];  // element (s, key) = sK[key][s]: column-major
        for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(fa[i], &sQ[wr * 32 + i * 16][kk], kStep + kPad);
        for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(fb[j], &sK[wc * 32 + j * 16][kk], kStep + kPad);
        for (int i = 0; i < 2; ++i)
          for (int j = 0; j < 2; ++j) wmma::mma_sync(score[i][j], fa[i], fb[j], score[i][j]);
      }
    }
    for (int i = 0; i < 2; ++i)
      for (int j = 0; j < 2; ++j)
        wmma::store_matrix_sync(&sS[wr * 32 + i * 16][wc * 32 + j * 16], score[i][j], kKeyTile + kOutPad,
                                wmma::mem_row_major);
    for (int i = threadIdx.x; i < kKeyTile * kValueTile; i += kThreads) {
      const int r = i / kValueTile, col = i % kValueTile;
      const int64_t e = e0 + col;
      sV[r][col] = k0 + r < len && e < d.E ? v[(first + k0 + r) * d.E + e] : zero_t;
    }
    __syncthreads();  // sS and sV are whole, and every warp is done with sQ and sK, which sP overwrites
    for (int i = threadIdx.x; i < kQueryTile * kKeyTile; i += kThreads) {
      const int r = i / kKeyTile, c = i % kKeyTile;
      const int qi = q0 + r, kj = k0 + c;  // offsets within the chunk
      float x = p.quad_scale * sS[r][c];
      if (p.rel_bias) x += p.rel_bias[kj - qi + d.C - 1];
      x = x < 0.f ? 0.f : x;  // relu that keeps NaN, as torch's does
      const bool keep = kj < len && (!p.causal || kj <= qi);
      sP[r][c] = from_float<T>(keep ? x * x : 0.f);
    }
    __syncthreads();
    for (int kk = 0; kk < kKeyTile; kk += 16) {
      FragA<T> fa[2];
      FragB<T> fb[4];
      for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(fa[i], &sP[wr * 32 + i * 16][kk], kKeyTile + kPad);
      for (int j = 0; j < 4; ++j) wmma::load_matrix_sync(fb[j], &sV[kk][wc * 64 + j * 16], kValueTile + kPad);
      for (int i = 0; i < 2; ++i)
        for (int j = 0; j < 4; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
    }
  }

  // Global part: Q_lin times the state this chunk reads (already times lin_scale), rounded to 16 bits per tile.
  const float* state = states + (b * d.G + (p.causal ? g : 0)) * d.S * d.E;
  for (int64_t s0 = 0; s0 < d.S; s0 += kStep) {
    __syncthreads();  // the previous readers of sQ / sP and sV are done
    for (int i = threadIdx.x; i < kQueryTile * kStep; i += kThreads) {
      const int r = i / kStep, k = i % kStep;
      const int64_t s = s0 + k;
      sQ[r][k] = q0 + r < len && s < d.S ? q_lin[(first + q0 + r) * d.S + s] : zero_t;
    }
    for (int i = threadIdx.x; i < kStep * kValueTile; i += kThreads) {
      const int r = i / kValueTile, col = i % kValueTile;
      const int64_t s = s0 + r, e = e0 + col;
      sV[r][col] = from_float<T>(s < d.S && e < d.E ? state[s * d.E + e] : 0.f);
    }
    __syncthreads();
    for (int kk = 0; kk < kStep; kk += 16) {
      FragA<T> fa[2];
      FragB<T> fb[4];
      for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(fa[i], &sQ[wr * 32 + i * 16][kk], kStep + kPad);
      for (int j = 0; j < 4; ++j) wmma::load_matrix_sync(fb[j], &sV[kk][wc * 64 + j * 16], kValueTile + kPad);
      for (int i = 0; i < 2; ++i)
        for (int j = 0; j < 4; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
    }
  }

  // Epilogue through shared memory: gate, bounds, 16-bit store.
  __syncthreads();  // sOut overwrites sV and sS
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 4; ++j)
      wmma::store_matrix_sync(&sOut[wr * 32 + i * 16][wc * 64 + j * 16], acc[i][j], kValueTile + kOutPad,
                              wmma::mem_row_major);
  __syncthreads();
  const T* u = static_cast<const T*>(p.u);
  T* out = static_cast<T*>(p.out);
  for (int i = threadIdx.x; i < kQueryTile * kValueTile; i += kThreads) {
    const int r = i / kValueTile, col = i % kValueTile;
    const int64_t e = e0 + col;
    if (q0 + r >= len || e >= d.E) continue;
    const int64_t offset = (first + q0 + r) * d.E + e;
    float o = sOut[r][col];
    if (u) o *= to_float(u[offset]);
    out[offset] = from_float<T>(o);
  }
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

size_t flash_chunk_workspace_bytes(const FlashChunkShape& shape) {
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
  return p.dtype == DType::kBFloat16 ? launch<__nv_bfloat16>(p, d, stream) : launch<__half>(p, d, stream);
}

}  // namespace subq
