// What the SSD chunk scan's forward and backward kernels share beyond the tile toolkit (common/wmma_tiles.cuh): the
// dimensions struct, the packed-sequence lookup, and the workspace layout of the forward (which the
// backward reuses: it runs the forward to recompute decays, chunk products and the states entering each chunk).
// Internal: included by csrc/ssd/ssd_chunk_scan_{fwd,bwd}.cu only (anonymous namespace: one copy per file).
#pragma once

#include "ssd/ssd_chunk_scan.h"

#include "common/convert.cuh"
#include "common/wmma_tiles.cuh"

namespace subq {
namespace {

// The largest chunk: per-position vectors of a chunk fit in shared memory.
constexpr int kMaxQ = 256;

struct Dims {
  int64_t b, L, H, P, G, N, Q, nc, Lp, heads_per_group;
};

Dims make_dims(const SsdShape& s) {
  Dims d;
  d.b = s.batch, d.L = s.seqlen, d.H = s.heads, d.P = s.head_dim, d.G = s.groups, d.N = s.state_dim;
  d.Q = s.chunk_size;
  d.nc = (d.L + d.Q - 1) / d.Q;
  d.Lp = d.nc * d.Q;
  d.heads_per_group = d.H / d.G;
  return d;
}

// Offset of element n at position pos, group g, batch b of a (B, L, G, N) tensor: B, C and their gradients.
__device__ __forceinline__ int64_t bc_offset(const Dims& d, int64_t b, int64_t pos, int64_t g, int64_t n) {
  return ((b * d.L + pos) * d.G + g) * d.N + n;
}

// That element of B or C, or zero past the sequence or the state size, where the tiles overhang.
template <typename T>
__device__ __forceinline__ T bc_element(const T* m, const Dims& d, int64_t b, int64_t pos, int64_t g, int64_t n) {
  return pos < d.L && n < d.N ? m[bc_offset(d, b, pos, g, n)] : from_float<T>(0.f);
}

// Padded positions continue the last sequence (they carry dt = 0 and zero inputs, so they change nothing).
__device__ __forceinline__ int32_t seq_at(const int32_t* seq_idx, const Dims& d, int64_t b, int64_t pos) {
  if (seq_idx == nullptr) return 0;
  return seq_idx[b * d.L + (pos < d.L ? pos : d.L - 1)];
}

size_t aligned(size_t bytes) { return (bytes + 255) / 256 * 256; }

struct Workspace {
  float *dtp, *cum, *cb, *states;
};

Workspace carve(void* base, const Dims& d) {
  auto* bytes = static_cast<unsigned char*>(base);
  Workspace w;
  w.dtp = reinterpret_cast<float*>(bytes);
  bytes += aligned(sizeof(float) * d.b * d.H * d.Lp);
  w.cum = reinterpret_cast<float*>(bytes);
  bytes += aligned(sizeof(float) * d.b * d.H * d.Lp);
  w.cb = reinterpret_cast<float*>(bytes);
  bytes += aligned(sizeof(float) * d.b * d.nc * d.G * d.Q * d.Q);
  w.states = reinterpret_cast<float*>(bytes);
  return w;
}

}  // namespace
}  // namespace subq
