// The tile toolkit of the hand-written tensor-core kernels (SSD chunk scan, FLASH chunk attention): a block of
// 4 warps as 2 x 2 computes an M x N float32 tile of a product A B through WMMA, 16 x 16 x 16 fragments with 16-bit
// operands and float32 accumulators. accumulate_product stages the reduction kStep elements at a time through
// shared memory (bounds-checked, zero-filled loads, so no size need be a tile multiple); store_tile is the epilogue
// that writes the accumulators out through a float32 tile in shared memory, one element per call of a functor.
// Nothing here depends on which fragment element a lane holds: fragments only meet load/store/mma_sync.
// Internal linkage (an unnamed namespace): each .cu compiles its own copy, so kernels' host stubs do not clash.
#pragma once

#include <type_traits>

#include <mma.h>

#include "common/convert.cuh"

namespace subq {

using FragAcc = nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float>;

template <int M, int N>
__device__ __forceinline__ void zero(FragAcc (&acc)[M][N]) {
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j) nvcuda::wmma::fill_fragment(acc[i][j], 0.f);
}

namespace {

using namespace nvcuda;

// Why 64 x 64 per 4 warps, K 32 at a time: each warp holds 32 x 32 outputs (2 x 2 fragments, 32 floats a thread),
// enough reuse of every staged operand for the tensor cores while a 64 x 64 product's staging (9.5 KB in 16 bits)
// and its float32 output tile (17 KB) leave room for several blocks per SM on sm_80..sm_90.
constexpr int kTile = 64;      // output tile edge
constexpr int kThreads = 128;  // 4 warps, 2 x 2
constexpr int kStep = 32;      // reduction elements staged per shared-memory round
constexpr int kPad = 8;        // row padding of 16-bit tiles: fewer bank conflicts, rows stay 32-byte aligned
constexpr int kOutPad = 4;     // row padding of float32 tiles

// Elements of an M-row operand tile staged for one kStep round, in either layout.
template <int M>
constexpr int staged_elements() {
  return M * (kStep + kPad) > kStep * (M + kPad) ? M * (kStep + kPad) : kStep * (M + kPad);
}

template <typename T, int M, int N>
constexpr int stage_bytes() {
  return (staged_elements<M>() + staged_elements<N>()) * static_cast<int>(sizeof(T));
}

template <int M, int N>
constexpr int tile_bytes() {
  return M * (N + kOutPad) * static_cast<int>(sizeof(float));
}

// The block's shared memory for an M x N product: accumulate_product's operand staging, reused once it is done for
// `kTiles` float32 M x N output tiles (store_tile). A static array: one per kernel that calls this.
template <typename T, int M, int N, int kTiles = 1>
__device__ __forceinline__ unsigned char* product_smem() {
  constexpr int kStageBytes = stage_bytes<T, M, N>();
  constexpr int kTilesBytes = kTiles * tile_bytes<M, N>();
  __shared__ __align__(32) unsigned char smem[kStageBytes > kTilesBytes ? kStageBytes : kTilesBytes];
  return smem;
}

// An operand element as staged: loaders return T or a float32 value (scaled as the caller needs), rounded here.
template <typename T>
__device__ __forceinline__ T staged(T v) {
  return v;
}
template <typename T>
__device__ __forceinline__ T staged(float v) {
  return from_float<T>(v);
}

// acc += A B for the block's M x N tile, over the reduction index k in [k_begin, k_end), kStep at a time; warp
// (wr, wc) of the 2 x 2 holds rows wr * M/2.., columns wc * N/2... load_a(r, k) and load_b(k, c) return the
// operands' elements (T or float), zero for a row r or column c outside the operand (k is always in range). LayoutA /
// LayoutB name the index that is contiguous in global memory (row_major: k of A, c of B): staging walks it fastest,
// so the loads coalesce, and the fragments read the staged tile in that layout. `stage`: stage_bytes<T, M, N>().
// Barriers: one before each round's staging (the previous readers of `stage` are done) and one after it; a caller's
// shared values that the loaders read must be published before the call (the first barrier does, if written
// before it), and may be rewritten once it returns (every loader read happened before its last barrier).
template <typename T, int M, int N, typename LayoutA, typename LayoutB, typename LoadA, typename LoadB>
__device__ __forceinline__ void accumulate_product(FragAcc (&acc)[M / 32][N / 32], int64_t k_begin, int64_t k_end,
                                                   LoadA load_a, LoadB load_b, T* stage) {
  constexpr bool kARows = std::is_same_v<LayoutA, wmma::row_major>;  // A staged [r][k], else [k][r]
  constexpr bool kBRows = std::is_same_v<LayoutB, wmma::row_major>;  // B staged [k][c], else [c][k]
  constexpr int lda = kARows ? kStep + kPad : M + kPad;
  constexpr int ldb = kBRows ? N + kPad : kStep + kPad;
  T* sA = stage;
  T* sB = stage + staged_elements<M>();
  const int warp = threadIdx.x / 32, wr = warp / 2, wc = warp % 2;
  const T zero_t = from_float<T>(0.f);
  for (int64_t k0 = k_begin; k0 < k_end; k0 += kStep) {
    __syncthreads();  // the previous readers of the staging tiles are done
    for (int i = threadIdx.x; i < M * kStep; i += kThreads) {
      const int r = kARows ? i / kStep : i % M, k = kARows ? i % kStep : i / M;
      sA[kARows ? r * lda + k : k * lda + r] = k0 + k < k_end ? staged<T>(load_a(r, k0 + k)) : zero_t;
    }
    for (int i = threadIdx.x; i < kStep * N; i += kThreads) {
      const int c = kBRows ? i % N : i / kStep, k = kBRows ? i / N : i % kStep;
      sB[kBRows ? k * ldb + c : c * ldb + k] = k0 + k < k_end ? staged<T>(load_b(k0 + k, c)) : zero_t;
    }
    __syncthreads();
    for (int kk = 0; kk < kStep; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, LayoutA> fa[M / 32];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, LayoutB> fb[N / 32];
      for (int i = 0; i < M / 32; ++i) {
        const int r0 = wr * (M / 2) + i * 16;
        wmma::load_matrix_sync(fa[i], kARows ? &sA[r0 * lda + kk] : &sA[kk * lda + r0], lda);
      }
      for (int j = 0; j < N / 32; ++j) {
        const int c0 = wc * (N / 2) + j * 16;
        wmma::load_matrix_sync(fb[j], kBRows ? &sB[kk * ldb + c0] : &sB[c0 * ldb + kk], ldb);
      }
      for (int i = 0; i < M / 32; ++i)
        for (int j = 0; j < N / 32; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
    }
  }
}

// The block's M x N accumulators into a float32 row-major tile of row stride ldm (shared or global memory).
template <int M, int N>
__device__ __forceinline__ void spill(FragAcc (&acc)[M / 32][N / 32], float* tile, unsigned ldm = N + kOutPad) {
  const int warp = threadIdx.x / 32, wr = warp / 2, wc = warp % 2;
  for (int i = 0; i < M / 32; ++i)
    for (int j = 0; j < N / 32; ++j)
      wmma::store_matrix_sync(&tile[(wr * (M / 2) + i * 16) * ldm + wc * (N / 2) + j * 16], acc[i][j], ldm,
                              wmma::mem_row_major);
}

// The accumulators into the shared float32 tile (row stride N + kOutPad), which may overlay the staging tiles:
// whole and visible to every thread of the block on return.
template <int M, int N>
__device__ __forceinline__ void publish_tile(FragAcc (&acc)[M / 32][N / 32], float* tile) {
  __syncthreads();  // every warp is done reading the staging tiles
  spill<M, N>(acc, tile);
  __syncthreads();
}

// Element (r, c) of an M x N float32 tile published by publish_tile.
template <int N>
__device__ __forceinline__ float& tile_at(float* tile, int r, int c) {
  return tile[r * (N + kOutPad) + c];
}

// The store epilogue: the accumulators through `tile` (publish_tile), then store(r, c, value) per element, the
// block's threads walking the tile row by row; store bounds-checks.
template <int M, int N, typename Store>
__device__ __forceinline__ void store_tile(FragAcc (&acc)[M / 32][N / 32], float* tile, Store store) {
  publish_tile<M, N>(acc, tile);
  for (int i = threadIdx.x; i < M * N; i += kThreads) {
    const int r = i / N, c = i % N;
    store(r, c, tile_at<N>(tile, r, c));
  }
}

}  // namespace
}  // namespace subq
