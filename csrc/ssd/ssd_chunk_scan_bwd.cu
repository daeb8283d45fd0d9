// SSD chunk scan backward: the adjoints of the forward's steps (see ssd_chunk_scan.h), in reverse, as kernels named
// by what they compute. The math is csrc/ssd/ssd_chunk_scan_cpu.cpp's ssd_chunk_scan_bwd, per chunk of Q positions
// and head h, with g the output gradient after the gate, dS_c the gradient of the state leaving chunk c, E_c the
// state entering it, scores[t, s] = C_t.B_s exp(cum_t - cum_s) (s <= t in one sequence):
//   gate_skip_backward     g = dy silu(z), dz, dD (and dx's skip term D g, added by chunk_dx);
//   entering_state_grad    the gradient of E_c through the state-to-output term: sum_t exp(cum_t) g_t ⊗ C_t;
//   state_passing_backward dS_c, in reverse over the chunks (seq_idx resets, dfinal_states), dinitial_states and
//                          the carries' gradients d_carry_c = <dS_c, E_c>;
//   chunk_dcb              dCB[t, s] = sum over the group's heads of (g_t.x_s) exp(cum_t - cum_s) dt_s;
//   chunk_dx               dx_s = dt_s (exp(cum_last - cum_s) dS_c B_s + sum_t scores[t, s] g_t) + D g_s, and the
//                          row sums x_s . (...) that make dt's gradient;
//   chunk_dc, chunk_db     dC_t = sum_h exp(cum_t) g_t E_c + sum_s dCB[t, s] B_s, and
//                          dB_s = sum_h exp(cum_last - cum_s) dt_s x_s dS_c + sum_t dCB[t, s] C_t;
//   chunk_dt_backward      dcum, dt*A's gradient as a reverse cumulative sum within the chunk, dA, and the raw dt's
//                          gradient through the clamp, softplus and dt_bias.
// The forward runs first (its public entry point, without D and z) to recompute dt, the cumulative sums, C.B per
// chunk, the entering states and the SSM output y_ssm (from which dz and, by g . y_ssm, the t-side of dcum follow).
// y_ssm and a copy of g stay float32: dcum's intra-chunk terms cancel in the chunk's sums (dA, ddt_bias), so
// chunk_dt_backward forms both of their sides from the same float32 values (see there).
// Products are WMMA tiles as in the forward: 16-bit operands staged through shared memory, float32 accumulators.
#include "ssd/ssd_chunk_scan.h"
#include "common/cuda_status.h"
#include "common/dispatch.h"
#include "ssd/ssd_chunk_scan_tiles.cuh"

#include "common/convert.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace subq {
namespace {

constexpr int kMaxP = 128;        // the largest head dim: dD's per-channel sums fit in shared memory
constexpr int kGateRows = 256;    // (batch, position) rows per gate_skip_backward block: few dD atomics
constexpr int kPassThreads = 256; // state elements per state_passing_backward block

// A float32 64 x 64 tile in shared memory that a kernel keeps beside its products' tiles.
using OutTile = float[kTile][kTile + kOutPad];

// The block's total of v, the same on every thread, summed in a fixed order (deterministic). scratch: 32 floats.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  __syncthreads();  // scratch may still be read by a previous call
  if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = v;
  __syncthreads();
  float total = 0.f;
  for (int w = 0; w < static_cast<int>(blockDim.x / 32); ++w) total += scratch[w];
  return total;
}

// Inclusive prefix sum over the block's threads in thread order. scratch: 32 floats.
__device__ __forceinline__ float block_inclusive_scan(float v, float* scratch) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  for (int offset = 1; offset < 32; offset <<= 1) {
    const float up = __shfl_up_sync(0xffffffffu, v, offset);
    if (lane >= offset) v += up;
  }
  __syncthreads();
  if (lane == 31) scratch[warp] = v;
  __syncthreads();
  for (int w = 0; w < warp; ++w) v += scratch[w];
  return v;
}

// sigmoid(v) without an exp of a positive number.
__device__ __forceinline__ float sigmoid(float v) {
  const float e = expf(-fabsf(v));
  return v >= 0.f ? 1.f / (1.f + e) : e / (1.f + e);
}

// The sequence entering chunk c: the one its predecessor ends in (the first position's, for chunk 0), as the
// forward's state_passing and chunk_scan kernels define it.
__device__ __forceinline__ int32_t entering_seq(const int32_t* seq_idx, const Dims& d, int64_t b, int64_t c) {
  return seq_at(seq_idx, d, b, c == 0 ? 0 : c * d.Q - 1);
}

// Workspace of the backward: the forward's (dtp, cum, cb, entering states) first, then these.
struct BackwardWorkspace {
  Workspace fwd;
  float* final_states;  // (b, H, P, N): written by the recomputing forward, unused
  float* y_ssm;         // (b, L, H, P) float32: C.h + intra-chunk output, before skip and gate
  void* g;              // (b, L, H, P) 16-bit: dy silu(z) (only with z; otherwise g is dy)
  float* g32;           // (b, L, H, P) float32: the same g unrounded, for dcum's sums (only with z)
  float* dstates;       // (b, nc, H, P, N): d(entering state), then dS_c in place
  float* dcb;           // (b, nc, G, Q, Q): lower-triangular 64 x 64 tiles
  float* r_state;       // (p_tiles, b, H, Lp): x_s . exp(cum_last - cum_s) (dS_c B_s), partial over P tiles
  float* dcarry;        // (b, H, nc, pn_blocks): <dS_c, E_c>, partial over state_passing_backward blocks
};

__host__ __device__ __forceinline__ int64_t p_tiles_of(const Dims& d) { return (d.P + kTile - 1) / kTile; }
int64_t pn_blocks_of(const Dims& d) { return (d.P * d.N + kPassThreads - 1) / kPassThreads; }

// Bytes of each buffer after the forward's workspace, in carve order.
struct BackwardSizes {
  size_t final_states, y_ssm, g, g32, dstates, dcb, r_state, dcarry;
};

BackwardSizes backward_sizes(const Dims& d) {
  const size_t half = 2;  // 16-bit inputs only
  BackwardSizes s;
  s.final_states = aligned(sizeof(float) * d.b * d.H * d.P * d.N);
  s.y_ssm = aligned(sizeof(float) * d.b * d.L * d.H * d.P);
  s.g = aligned(half * d.b * d.L * d.H * d.P);
  s.g32 = s.y_ssm;
  s.dstates = aligned(sizeof(float) * d.b * d.nc * d.H * d.P * d.N);
  s.dcb = aligned(sizeof(float) * d.b * d.nc * d.G * d.Q * d.Q);
  s.r_state = aligned(sizeof(float) * p_tiles_of(d) * d.b * d.H * d.Lp);
  s.dcarry = aligned(sizeof(float) * d.b * d.H * d.nc * pn_blocks_of(d));
  return s;
}

BackwardWorkspace carve_backward(void* base, const Dims& d, size_t forward_bytes) {
  const BackwardSizes s = backward_sizes(d);
  auto* bytes = static_cast<unsigned char*>(base);
  BackwardWorkspace w;
  w.fwd = carve(base, d);
  bytes += forward_bytes;
  w.final_states = reinterpret_cast<float*>(bytes);
  bytes += s.final_states;
  w.y_ssm = reinterpret_cast<float*>(bytes);
  bytes += s.y_ssm;
  w.g = bytes;
  bytes += s.g;
  w.g32 = reinterpret_cast<float*>(bytes);
  bytes += s.g32;
  w.dstates = reinterpret_cast<float*>(bytes);
  bytes += s.dstates;
  w.dcb = reinterpret_cast<float*>(bytes);
  bytes += s.dcb;
  w.r_state = reinterpret_cast<float*>(bytes);
  bytes += s.r_state;
  w.dcarry = reinterpret_cast<float*>(bytes);
  return w;
}

// ---- 1. gate_skip_backward: g = dy silu(z), dz = dy y sigmoid(z) (1 + z (1 - sigmoid(z))), dD = sum g x --------
// grid (ceil(b * L / kGateRows), H). y = y_ssm + D x is the output before the gate.
template <typename T>
__global__ void gate_skip_backward_kernel(SsdChunkScanParams p, SsdChunkScanGrads grads, Dims d, const float* y_ssm,
                                          T* g, float* g32) {
  __shared__ float dD_sum[kMaxP];
  __shared__ float scratch[32];
  const int64_t h = blockIdx.y, row0 = static_cast<int64_t>(blockIdx.x) * kGateRows;
  const T* x = static_cast<const T*>(p.x);
  const T* dy = static_cast<const T*>(grads.dy);
  const T* z = static_cast<const T*>(p.z);
  T* dz = static_cast<T*>(grads.dz);
  for (int i = threadIdx.x; i < kMaxP; i += kThreads) dD_sum[i] = 0.f;
  __syncthreads();
  for (int64_t i = threadIdx.x; i < kGateRows * d.P; i += kThreads) {
    const int64_t r = row0 + i / d.P, pp = i % d.P;  // r: a (batch, position) pair
    if (r >= d.b * d.L) break;
    const int64_t offset = (r * d.H + h) * d.P + pp;
    const float xv = to_float(x[offset]), dyv = to_float(dy[offset]);
    const float Dv = p.D ? (p.D_per_channel ? p.D[h * d.P + pp] : p.D[h]) : 0.f;
    float gv = dyv;
    if (z) {
      const float zv = to_float(z[offset]), sig = sigmoid(zv);
      const float yv = y_ssm[offset] + Dv * xv;
      gv = dyv * zv * sig;
      g[offset] = from_float<T>(gv);
      g32[offset] = gv;
      dz[offset] = from_float<T>(dyv * yv * sig * (1.f + zv * (1.f - sig)));
    }
    if (p.D) atomicAdd(&dD_sum[pp], gv * xv);
  }
  if (!p.D) return;  // uniform over the block
  __syncthreads();
  if (p.D_per_channel) {
    for (int i = threadIdx.x; i < d.P; i += kThreads) atomicAdd(&grads.dD[h * d.P + i], dD_sum[i]);
  } else {
    const float total = block_sum(threadIdx.x < d.P ? dD_sum[threadIdx.x] : 0.f, scratch);
    if (threadIdx.x == 0) atomicAdd(&grads.dD[h], total);
  }
}

// ---- 2. entering_state_grad: dE[p, n] = sum_t g[t, p] from_start_t C[t, n] ---------------------------------------
// grid (b * nc, H, p_tiles * n_tiles). from_start_t = exp(cum_t) where t is still in the entering sequence, else 0.
template <typename T>
__global__ void entering_state_grad_kernel(SsdChunkScanParams p, Dims d, const T* g, const float* cum,
                                           float* dstates) {
  const int64_t p_tiles = p_tiles_of(d);
  const int64_t pi = blockIdx.z % p_tiles, ni = blockIdx.z / p_tiles;
  const int64_t b = blockIdx.x / d.nc, c = blockIdx.x % d.nc, h = blockIdx.y, grp = h / d.heads_per_group;
  const T* C = static_cast<const T*>(p.C);
  unsigned char* smem = product_smem<T, kTile, kTile>();  // the operands' staging, then the float32 tile
  T* stage = reinterpret_cast<T*>(smem);
  float* tile = reinterpret_cast<float*>(smem);
  __shared__ float from_start[kMaxQ];
  const int64_t row = (b * d.H + h) * d.Lp + c * d.Q;
  const int32_t seq_in = entering_seq(p.seq_idx, d, b, c);
  for (int t = threadIdx.x; t < d.Q; t += kThreads)
    from_start[t] = seq_at(p.seq_idx, d, b, c * d.Q + t) == seq_in ? expf(cum[row + t]) : 0.f;
  FragAcc acc[2][2];
  zero(acc);
  accumulate_product<T, kTile, kTile, wmma::col_major, wmma::row_major>(
      acc, 0, d.Q,
      [&](int r, int64_t t) {
        const int64_t pp = pi * kTile + r, pos = c * d.Q + t;
        return pos < d.L && pp < d.P ? to_float(g[((b * d.L + pos) * d.H + h) * d.P + pp]) * from_start[t] : 0.f;
      },
      [&](int64_t t, int col) {
        const int64_t nn = ni * kTile + col, pos = c * d.Q + t;
        return to_float(bc_element(C, d, b, pos, grp, nn));
      },
      stage);
  float* out = dstates + ((b * d.nc + c) * d.H + h) * d.P * d.N;
  store_tile<kTile, kTile>(acc, tile, [&](int r, int col, float v) {
    const int64_t pp = pi * kTile + r, nn = ni * kTile + col;
    if (pp < d.P && nn < d.N) out[pp * d.N + nn] = v;
  });
}

// ---- 3. state_passing_backward: dS_c = d(state leaving chunk c), in reverse -----------------------------------------
// The forward's h_c = carry_c h_{c-1} + state_c, with h_{c-1} the state entering c, gives
// d(entering_c) += carry_c dS_c and d(carry_c) = <dS_c, E_c>. dstates holds dE_c on entry and dS_c on exit.
// grid (pn_blocks, H, b), block kPassThreads; one thread per state element, block partial sums of <dS_c, E_c>.
__global__ void state_passing_backward_kernel(SsdChunkScanParams p, SsdChunkScanGrads grads, Dims d, const float* cum,
                                              const float* entering, float* dstates, float* dcarry) {
  __shared__ float scratch[32];
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t h = blockIdx.y, b = blockIdx.z, PN = d.P * d.N;
  const bool valid = e < PN;
  float d_state = valid && grads.dfinal_states ? grads.dfinal_states[(b * d.H + h) * PN + e] : 0.f;
  for (int64_t c = d.nc - 1; c >= 0; --c) {
    const int64_t slot = ((b * d.nc + c) * d.H + h) * PN + e;
    const float d_entering = valid ? dstates[slot] : 0.f;
    if (valid) dstates[slot] = d_state;
    const float partial = block_sum(valid ? d_state * entering[slot] : 0.f, scratch);
    if (threadIdx.x == 0) dcarry[((b * d.H + h) * d.nc + c) * gridDim.x + blockIdx.x] = partial;
    const bool continues = seq_at(p.seq_idx, d, b, c * d.Q + d.Q - 1) == entering_seq(p.seq_idx, d, b, c);
    const float carry = continues ? expf(cum[(b * d.H + h) * d.Lp + c * d.Q + d.Q - 1]) : 0.f;
    d_state = d_entering + carry * d_state;
  }
  if (valid && grads.dinitial_states) grads.dinitial_states[(b * d.H + h) * PN + e] = d_state;
}

// ---- 4. chunk_dcb: dCB[t, s] = sum_{h in group} (g_t . x_s) exp(cum_t - cum_s) dt_s, s <= t in one sequence ------
// grid (b * nc, G, tiles * tiles), lower-triangular tiles; the diagonal tile's upper half is written as zeros.
// The heads of a group are summed inside the block, in order (no atomics), into a shared tile that each thread
// reads and writes only at its own elements (registers would cost occupancy).
template <typename T>
__global__ void chunk_dcb_kernel(SsdChunkScanParams p, Dims d, const T* g, const float* dtp, const float* cum,
                                 float* dcb) {
  const int tiles = static_cast<int>(d.Q / kTile);
  const int ti = blockIdx.z / tiles, si = blockIdx.z % tiles;
  if (si > ti) return;  // above the diagonal: never read
  const int64_t b = blockIdx.x / d.nc, c = blockIdx.x % d.nc, grp = blockIdx.y;
  const T* x = static_cast<const T*>(p.x);
  unsigned char* smem = product_smem<T, kTile, kTile>();  // the operands' staging, then the float32 tile
  T* stage = reinterpret_cast<T*>(smem);
  float* tile = reinterpret_cast<float*>(smem);
  __shared__ OutTile sum;
  __shared__ float cum_t[kTile], cum_s[kTile], dt_s[kTile];
  __shared__ int32_t seq_t[kTile], seq_s[kTile];
  if (threadIdx.x < kTile) {
    seq_t[threadIdx.x] = seq_at(p.seq_idx, d, b, c * d.Q + ti * kTile + threadIdx.x);
    seq_s[threadIdx.x] = seq_at(p.seq_idx, d, b, c * d.Q + si * kTile + threadIdx.x);
  }
  for (int i = threadIdx.x; i < kTile * kTile; i += kThreads) sum[i / kTile][i % kTile] = 0.f;
  for (int64_t j = 0; j < d.heads_per_group; ++j) {
    const int64_t h = grp * d.heads_per_group + j, row = (b * d.H + h) * d.Lp + c * d.Q;
    if (threadIdx.x < kTile) {
      cum_t[threadIdx.x] = cum[row + ti * kTile + threadIdx.x];
      cum_s[threadIdx.x] = cum[row + si * kTile + threadIdx.x];
      dt_s[threadIdx.x] = dtp[row + si * kTile + threadIdx.x];
    }
    FragAcc acc[2][2];
    zero(acc);
    // The products' barriers publish the vectors above before the masking below reads them.
    accumulate_product<T, kTile, kTile, wmma::row_major, wmma::col_major>(
        acc, 0, d.P,
        [&](int r, int64_t pp) {
          const int64_t pos = c * d.Q + ti * kTile + r;
          return pos < d.L ? to_float(g[((b * d.L + pos) * d.H + h) * d.P + pp]) : 0.f;
        },
        [&](int64_t pp, int col) {
          const int64_t pos = c * d.Q + si * kTile + col;
          return pos < d.L ? to_float(x[((b * d.L + pos) * d.H + h) * d.P + pp]) : 0.f;
        },
        stage);
    store_tile<kTile, kTile>(acc, tile, [&](int r, int col, float v) {
      // Masked before the exp: cum_t - cum_s <= 0 wherever it is taken (A < 0).
      if (si * kTile + col <= ti * kTile + r && seq_s[col] == seq_t[r])
        sum[r][col] += v * expf(cum_t[r] - cum_s[col]) * dt_s[col];
    });
    __syncthreads();  // the next head rewrites the vectors
  }
  float* out = dcb + (((b * d.nc + c) * d.G + grp) * d.Q + ti * kTile) * d.Q + si * kTile;
  for (int i = threadIdx.x; i < kTile * kTile; i += kThreads) {
    const int r = i / kTile, col = i % kTile;
    out[r * d.Q + col] = sum[r][col];
  }
}

// Per row r of a 64-row tile: sum over the tile's columns (p < P) of x[row r, p] tile[r][p]. Two adjacent lanes per
// row, 32 columns each; written to part[row_base + r] (rows past L hold zeros, which the readers expect).
template <typename T>
__device__ __forceinline__ void row_dot_x(float* tile, const T* x, const Dims& d, int64_t b, int64_t h,
                                          int64_t pos0, int64_t pi, float* part) {
  const int r = threadIdx.x / 2, half = threadIdx.x % 2;
  const int64_t pos = pos0 + r;
  float sum = 0.f;
  for (int col = half * 32; col < half * 32 + 32; ++col) {
    const int64_t pp = pi * kTile + col;
    if (pos < d.L && pp < d.P) {
      sum += to_float(x[((b * d.L + pos) * d.H + h) * d.P + pp]) * tile_at<kTile>(tile, r, col);
    }
  }
  sum += __shfl_xor_sync(0xffffffffu, sum, 1);
  if (half == 0) part[r] = sum;
}

// ---- 5. chunk_dx: dx_s = dt_s (to_end_s B_s . dS_c[p, :] + sum_t scores[t, s] g_t) + D g_s -----------------------
// grid (b * nc, H, tiles * p_tiles). to_end_s = exp(cum_last - cum_s) where s is in the chunk's last sequence.
// Also the dt gradient's state-side row sums (before the dt_s factor): r_state_s = x_s . to_end_s (dS_c B_s),
// partial over this block's P tile.
template <typename T>
__global__ void chunk_dx_kernel(SsdChunkScanParams p, SsdChunkScanGrads grads, Dims d, const T* g, const float* dtp,
                                const float* cum, const float* cb, const float* dstates, float* r_state) {
  const int tiles = static_cast<int>(d.Q / kTile);
  const int si = blockIdx.z % tiles;
  const int64_t pi = blockIdx.z / tiles;
  const int64_t b = blockIdx.x / d.nc, c = blockIdx.x % d.nc, h = blockIdx.y, grp = h / d.heads_per_group;
  const T* x = static_cast<const T*>(p.x);
  const T* B = static_cast<const T*>(p.B);
  unsigned char* smem = product_smem<T, kTile, kTile>();  // the operands' staging, then the float32 tile
  T* stage = reinterpret_cast<T*>(smem);
  float* tile = reinterpret_cast<float*>(smem);
  __shared__ float cum_s[kTile], dt_s[kTile], to_end[kTile], cum_t[kTile];
  __shared__ int32_t seq_s[kTile], seq_t[kTile];
  const int64_t row = (b * d.H + h) * d.Lp + c * d.Q, s0 = si * kTile;
  if (threadIdx.x < kTile) {
    const int s = s0 + threadIdx.x;
    const int32_t seq_last = seq_at(p.seq_idx, d, b, c * d.Q + d.Q - 1);
    cum_s[threadIdx.x] = cum[row + s];
    dt_s[threadIdx.x] = dtp[row + s];
    seq_s[threadIdx.x] = seq_at(p.seq_idx, d, b, c * d.Q + s);
    to_end[threadIdx.x] = seq_s[threadIdx.x] == seq_last ? expf(cum[row + d.Q - 1] - cum[row + s]) : 0.f;
  }
  FragAcc acc[2][2];
  zero(acc);
  const float* dS = dstates + ((b * d.nc + c) * d.H + h) * d.P * d.N;
  accumulate_product<T, kTile, kTile, wmma::row_major, wmma::col_major>(  // to_end_s B[s, n] . dS[p, n]
      acc, 0, d.N,
      [&](int r, int64_t n) {
        const int64_t pos = c * d.Q + s0 + r;
        return pos < d.L ? to_float(B[((b * d.L + pos) * d.G + grp) * d.N + n]) * to_end[r] : 0.f;
      },
      [&](int64_t n, int col) {
        const int64_t pp = pi * kTile + col;
        return pp < d.P ? dS[pp * d.N + n] : 0.f;
      },
      stage);
  publish_tile<kTile, kTile>(acc, tile);
  const int64_t part = pi * d.b * d.H * d.Lp + row + s0;
  row_dot_x(tile, x, d, b, h, c * d.Q + s0, pi, r_state + part);

  const float* cb_chunk = cb + ((b * d.nc + c) * d.G + grp) * d.Q * d.Q;
  for (int tj = si; tj < tiles; ++tj) {  // t >= s only
    if (threadIdx.x < kTile) {
      cum_t[threadIdx.x] = cum[row + tj * kTile + threadIdx.x];
      seq_t[threadIdx.x] = seq_at(p.seq_idx, d, b, c * d.Q + tj * kTile + threadIdx.x);
    }
    // Published to the loaders by the product's first barrier; the previous product's loaders are done with them.
    accumulate_product<T, kTile, kTile, wmma::col_major, wmma::row_major>(  // scores[t, s] g[t, p]
        acc, tj * kTile, tj * kTile + kTile,
        [&](int r, int64_t t) {
          const int tl = static_cast<int>(t - tj * kTile);
          // Masked before the exp: cum_t - cum_s <= 0 wherever it is taken.
          return s0 + r <= t && seq_t[tl] == seq_s[r] ? cb_chunk[t * d.Q + s0 + r] * expf(cum_t[tl] - cum_s[r])
                                                      : 0.f;
        },
        [&](int64_t t, int col) {
          const int64_t pos = c * d.Q + t, pp = pi * kTile + col;
          return pos < d.L && pp < d.P ? to_float(g[((b * d.L + pos) * d.H + h) * d.P + pp]) : 0.f;
        },
        stage);
  }
  T* dx = static_cast<T*>(grads.dx);
  store_tile<kTile, kTile>(acc, tile, [&](int r, int col, float out) {
    const int64_t pos = c * d.Q + s0 + r, pp = pi * kTile + col;
    if (pos >= d.L || pp >= d.P) return;
    const int64_t offset = ((b * d.L + pos) * d.H + h) * d.P + pp;
    float v = dt_s[r] * out;
    if (p.D) v += (p.D_per_channel ? p.D[h * d.P + pp] : p.D[h]) * to_float(g[offset]);
    dx[offset] = from_float<T>(v);
  });
}

// ---- 6. chunk_dc: dC_t = sum_{h in group} from_start_t g_t . E_c[:, n] + sum_{s <= t} dCB[t, s] B_s ----------------
// grid (b * nc, G, tiles * n_tiles).
template <typename T>
__global__ void chunk_dc_kernel(SsdChunkScanParams p, SsdChunkScanGrads grads, Dims d, const T* g, const float* cum,
                                const float* entering, const float* dcb) {
  const int tiles = static_cast<int>(d.Q / kTile);
  const int ti = blockIdx.z % tiles;
  const int64_t ni = blockIdx.z / tiles;
  const int64_t b = blockIdx.x / d.nc, c = blockIdx.x % d.nc, grp = blockIdx.y;
  const T* B = static_cast<const T*>(p.B);
  unsigned char* smem = product_smem<T, kTile, kTile>();  // the operands' staging, then the float32 tile
  T* stage = reinterpret_cast<T*>(smem);
  float* tile = reinterpret_cast<float*>(smem);
  __shared__ float from_start[kTile];
  const int64_t t0 = ti * kTile;
  const int32_t seq_in = entering_seq(p.seq_idx, d, b, c);
  FragAcc acc[2][2];
  zero(acc);
  for (int64_t j = 0; j < d.heads_per_group; ++j) {
    const int64_t h = grp * d.heads_per_group + j, row = (b * d.H + h) * d.Lp + c * d.Q;
    if (threadIdx.x < kTile) {
      const bool same = seq_at(p.seq_idx, d, b, c * d.Q + t0 + threadIdx.x) == seq_in;
      from_start[threadIdx.x] = same ? expf(cum[row + t0 + threadIdx.x]) : 0.f;
    }
    // Published to the loaders by the product's first barrier; the previous head's loaders are done with it.
    const float* E = entering + ((b * d.nc + c) * d.H + h) * d.P * d.N;
    accumulate_product<T, kTile, kTile, wmma::row_major, wmma::row_major>(
        acc, 0, d.P,
        [&](int r, int64_t pp) {
          const int64_t pos = c * d.Q + t0 + r;
          return pos < d.L ? to_float(g[((b * d.L + pos) * d.H + h) * d.P + pp]) * from_start[r] : 0.f;
        },
        [&](int64_t pp, int col) {
          const int64_t nn = ni * kTile + col;
          return nn < d.N ? E[pp * d.N + nn] : 0.f;
        },
        stage);
  }
  const float* dcb_rows = dcb + (((b * d.nc + c) * d.G + grp) * d.Q + t0) * d.Q;
  accumulate_product<T, kTile, kTile, wmma::row_major, wmma::row_major>(
      acc, 0, t0 + kTile,  // s <= t: the tiles up to the diagonal (its upper half is zero)
      [&](int r, int64_t s) { return dcb_rows[r * d.Q + s]; },
      [&](int64_t s, int col) {
        const int64_t pos = c * d.Q + s, nn = ni * kTile + col;
        return to_float(bc_element(B, d, b, pos, grp, nn));
      },
      stage);
  T* dC = static_cast<T*>(grads.dC);
  store_tile<kTile, kTile>(acc, tile, [&](int r, int col, float v) {
    const int64_t pos = c * d.Q + t0 + r, nn = ni * kTile + col;
    if (pos < d.L && nn < d.N) dC[bc_offset(d, b, pos, grp, nn)] = from_float<T>(v);
  });
}

// ---- 7. chunk_db: dB_s = sum_{h in group} to_end_s dt_s x_s . dS_c[:, n] + sum_{t >= s} dCB[t, s] C_t --------------
// grid (b * nc, G, tiles * n_tiles).
template <typename T>
__global__ void chunk_db_kernel(SsdChunkScanParams p, SsdChunkScanGrads grads, Dims d, const float* dtp,
                                const float* cum, const float* dstates, const float* dcb) {
  const int tiles = static_cast<int>(d.Q / kTile);
  const int si = blockIdx.z % tiles;
  const int64_t ni = blockIdx.z / tiles;
  const int64_t b = blockIdx.x / d.nc, c = blockIdx.x % d.nc, grp = blockIdx.y;
  const T* x = static_cast<const T*>(p.x);
  const T* C = static_cast<const T*>(p.C);
  unsigned char* smem = product_smem<T, kTile, kTile>();  // the operands' staging, then the float32 tile
  T* stage = reinterpret_cast<T*>(smem);
  float* tile = reinterpret_cast<float*>(smem);
  __shared__ float weight[kTile];
  const int64_t s0 = si * kTile;
  const int32_t seq_last = seq_at(p.seq_idx, d, b, c * d.Q + d.Q - 1);
  FragAcc acc[2][2];
  zero(acc);
  for (int64_t j = 0; j < d.heads_per_group; ++j) {
    const int64_t h = grp * d.heads_per_group + j, row = (b * d.H + h) * d.Lp + c * d.Q;
    if (threadIdx.x < kTile) {
      const int64_t s = s0 + threadIdx.x;
      const bool same = seq_at(p.seq_idx, d, b, c * d.Q + s) == seq_last;
      weight[threadIdx.x] = same ? expf(cum[row + d.Q - 1] - cum[row + s]) * dtp[row + s] : 0.f;
    }
    // Published to the loaders by the product's first barrier; the previous head's loaders are done with it.
    const float* dS = dstates + ((b * d.nc + c) * d.H + h) * d.P * d.N;
    accumulate_product<T, kTile, kTile, wmma::row_major, wmma::row_major>(
        acc, 0, d.P,
        [&](int r, int64_t pp) {
          const int64_t pos = c * d.Q + s0 + r;
          return pos < d.L ? to_float(x[((b * d.L + pos) * d.H + h) * d.P + pp]) * weight[r] : 0.f;
        },
        [&](int64_t pp, int col) {
          const int64_t nn = ni * kTile + col;
          return nn < d.N ? dS[pp * d.N + nn] : 0.f;
        },
        stage);
  }
  const float* dcb_chunk = dcb + ((b * d.nc + c) * d.G + grp) * d.Q * d.Q;
  accumulate_product<T, kTile, kTile, wmma::col_major, wmma::row_major>(
      acc, s0, d.Q,  // t >= s: the tiles from the diagonal down (the diagonal's upper half is zero)
      [&](int r, int64_t t) { return dcb_chunk[t * d.Q + s0 + r]; },
      [&](int64_t t, int col) {
        const int64_t pos = c * d.Q + t, nn = ni * kTile + col;
        return to_float(bc_element(C, d, b, pos, grp, nn));
      },
      stage);
  T* dB = static_cast<T*>(grads.dB);
  store_tile<kTile, kTile>(acc, tile, [&](int r, int col, float v) {
    const int64_t pos = c * d.Q + s0 + r, nn = ni * kTile + col;
    if (pos < d.L && nn < d.N) dB[bc_offset(d, b, pos, grp, nn)] = from_float<T>(v);
  });
}

// ---- 8. chunk_dt_backward: dcum, da = reverse cumsum, ddt through clamp/softplus/bias, dA, ddt_bias --------------
// grid (b * nc, H), block Q threads (one per position). cum_t = sum_{u <= t} a_u with a = dt A, so
// da_s = sum_{t >= s} dcum_t, where
//   dcum_t = from_start_t g_t . (E_c C_t)          (state to output, on the t side)
//          + sum_{s <= t} G[t, s] - sum_{t' >= t} G[t', t]   (the intra-chunk decays' two sides)
//          - dt_t r_state_t                       (to_end's s side)
//          + [t = Q-1] (d_carry carry + sum_s dt_s r_state_s)   (carry = exp(cum_last), to_end's cum_last side)
// with G[t, s] = scores[t, s] (g_t . x_s) = dt_s W[t, s]. A chunk's intra-chunk terms cancel in its sum (shifting
// every cum_t leaves cum_t - cum_s alone), so both sides come from the same float32 W values here: taken from the
// forward's 16-bit y_ssm and the 16-bit-operand products of chunk_dx, their roundings did not cancel and the
// reverse cumsum carried them into dA and ddt_bias (bf16 dA off by tens of percent). d(dt_t) = r_state_t +
// sum_{t' >= t} W[t', t] + da_t A. dA and ddt_bias take one float32 atomic per block.
// g unrounded: gate_skip_backward's float32 copy with z, else dy.
template <typename T>
__device__ __forceinline__ float gate_gradient(const SsdChunkScanParams& p, const SsdChunkScanGrads& grads,
                                               const float* g32, int64_t offset) {
  return p.z ? g32[offset] : to_float(static_cast<const T*>(grads.dy)[offset]);
}

// W[t, s] = cb[t, s] exp(cum_t - cum_s) (g_t . x_s) for s <= t in one sequence (and inside L), else 0: the same
// float operations wherever it is evaluated, so every use sees the same value.
template <typename T>
__device__ __forceinline__ float intra_term(const SsdChunkScanParams& p, const SsdChunkScanGrads& grads, const Dims& d,
                                            int64_t b, int64_t c, int64_t h, const float* g32, const float* cb_chunk,
                                            const float* cum_row, int t, int s) {
  const int64_t t_pos = c * d.Q + t, s_pos = c * d.Q + s;
  if (s > t || t_pos >= d.L || seq_at(p.seq_idx, d, b, t_pos) != seq_at(p.seq_idx, d, b, s_pos)) return 0.f;
  const T* x = static_cast<const T*>(p.x);
  const int64_t t_base = ((b * d.L + t_pos) * d.H + h) * d.P, s_base = ((b * d.L + s_pos) * d.H + h) * d.P;
  float gx = 0.f;
  for (int64_t pp = 0; pp < d.P; ++pp) gx += gate_gradient<T>(p, grads, g32, t_base + pp) * to_float(x[s_base + pp]);
  return cb_chunk[t * d.Q + s] * expf(cum_row[t] - cum_row[s]) * gx;
}

template <typename T>
__global__ void chunk_dt_backward_kernel(SsdChunkScanParams p, SsdChunkScanGrads grads, Dims d, const float* g32,
                                         const float* dtp, const float* cum, const float* cb, const float* entering,
                                         const float* r_state, const float* dcarry, int64_t pn_blocks) {
  __shared__ float scratch[32];
  __shared__ float reversed[kMaxQ];
  const int t = threadIdx.x;
  const int64_t b = blockIdx.x / d.nc, c = blockIdx.x % d.nc, h = blockIdx.y, grp = h / d.heads_per_group;
  const int64_t pos = c * d.Q + t, row = (b * d.H + h) * d.Lp + c * d.Q;
  const int64_t part_stride = d.b * d.H * d.Lp;
  const float dt_t = dtp[row + t];
  float rs = 0.f;
  for (int64_t pi = 0; pi < p_tiles_of(d); ++pi) rs += r_state[pi * part_stride + row + t];
  float gy_state = 0.f;  // from_start_t g_t . (E_c C_t)
  if (pos < d.L && seq_at(p.seq_idx, d, b, pos) == entering_seq(p.seq_idx, d, b, c)) {
    const T* C = static_cast<const T*>(p.C) + ((b * d.L + pos) * d.G + grp) * d.N;
    const float* E = entering + ((b * d.nc + c) * d.H + h) * d.P * d.N;
    const int64_t base = ((b * d.L + pos) * d.H + h) * d.P;
    for (int64_t pp = 0; pp < d.P; ++pp) {
      float ec = 0.f;
      for (int64_t n = 0; n < d.N; ++n) ec += E[pp * d.N + n] * to_float(C[n]);
      gy_state += gate_gradient<T>(p, grads, g32, base + pp) * ec;
    }
    gy_state *= expf(cum[row + t]);
  }
  const float* cb_chunk = cb + ((b * d.nc + c) * d.G + grp) * d.Q * d.Q;
  float t_side = 0.f, s_side = 0.f;  // sum_{s <= t} dt_s W[t, s] and sum_{t' >= t} W[t', t]
  for (int s = 0; s <= t; ++s) {
    t_side += dtp[row + s] * intra_term<T>(p, grads, d, b, c, h, g32, cb_chunk, cum + row, t, s);
  }
  for (int u = t; u < d.Q; ++u) s_side += intra_term<T>(p, grads, d, b, c, h, g32, cb_chunk, cum + row, u, t);
  const float ra = rs + s_side;
  float d_carry = 0.f;
  for (int64_t k = 0; k < pn_blocks; ++k) d_carry += dcarry[((b * d.H + h) * d.nc + c) * pn_blocks + k];
  const bool continues = seq_at(p.seq_idx, d, b, c * d.Q + d.Q - 1) == entering_seq(p.seq_idx, d, b, c);
  const float carry = continues ? expf(cum[row + d.Q - 1]) : 0.f;
  const float to_end_total = block_sum(dt_t * rs, scratch);
  float dcum = gy_state + t_side - dt_t * ra;
  if (t == d.Q - 1) dcum += d_carry * carry + to_end_total;

  reversed[d.Q - 1 - t] = dcum;
  __syncthreads();
  const float suffix = block_inclusive_scan(reversed[t], scratch);  // sum over positions >= Q-1-t
  reversed[t] = suffix;  // every read of reversed happened before the scan's barriers
  __syncthreads();
  const float da = reversed[d.Q - 1 - t];

  const float dA_part = block_sum(da * dt_t, scratch);
  if (t == 0) atomicAdd(&grads.dA[h], dA_part);

  float grad = 0.f;  // of the raw dt, through clamp(softplus(dt + dt_bias))
  if (pos < d.L) {
    grad = ra + da * p.A[h];
    float v = p.dt[(b * d.L + pos) * d.H + h];
    if (p.dt_bias) v += p.dt_bias[h];
    const float soft = p.dt_softplus && v <= 20.f ? log1pf(expf(v)) : v;  // the forward's value, before the clamp
    if (p.has_dt_limit && !(soft >= p.dt_lo && soft <= p.dt_hi)) grad = 0.f;
    if (p.dt_softplus && v <= 20.f) grad *= sigmoid(v);  // softplus' = sigmoid below torch's threshold, else 1
    grads.ddt[(b * d.L + pos) * d.H + h] = grad;
  }
  if (grads.ddt_bias) {
    const float bias_part = block_sum(grad, scratch);
    if (t == 0) atomicAdd(&grads.ddt_bias[h], bias_part);
  }
}

// The forward on the same inputs for the SSM output alone, in float32: the skip and the gate are differentiated by
// gate_skip_backward.
SsdChunkScanParams recompute_params(const SsdChunkScanParams& p, const SsdChunkScanGrads& grads, float* y_ssm,
                                    float* final_states) {
  SsdChunkScanParams f = p;
  f.D = nullptr;
  f.z = nullptr;
  f.y = nullptr;
  f.y_float32 = y_ssm;
  f.final_states = final_states;
  f.workspace = grads.workspace;
  return f;
}

template <typename T>
Status launch(const SsdChunkScanParams& p, const SsdChunkScanGrads& grads, const Dims& d, cudaStream_t stream) {
  const BackwardWorkspace w = carve_backward(grads.workspace, d, ssd_chunk_scan_fwd_workspace_bytes(p.shape));
  SUBQ_RETURN_IF_ERROR(run_ssd_chunk_scan_fwd(recompute_params(p, grads, w.y_ssm, w.final_states), stream));

  // dA, dD and ddt_bias are accumulated with atomics.
  const int64_t D_size = p.D_per_channel ? d.H * d.P : d.H;
  SUBQ_RETURN_IF_ERROR(cuda_status(cudaMemsetAsync(grads.dA, 0, sizeof(float) * d.H, stream)));
  if (p.D) SUBQ_RETURN_IF_ERROR(cuda_status(cudaMemsetAsync(grads.dD, 0, sizeof(float) * D_size, stream)));
  if (p.dt_bias) SUBQ_RETURN_IF_ERROR(cuda_status(cudaMemsetAsync(grads.ddt_bias, 0, sizeof(float) * d.H, stream)));

  const float* y_ssm = w.y_ssm;
  const T* g = p.z ? static_cast<const T*>(w.g) : static_cast<const T*>(grads.dy);
  const unsigned bc = static_cast<unsigned>(d.b * d.nc), heads = static_cast<unsigned>(d.H);
  const unsigned groups = static_cast<unsigned>(d.G), tiles = static_cast<unsigned>(d.Q / kTile);
  const unsigned p_tiles = static_cast<unsigned>(p_tiles_of(d));
  const unsigned n_tiles = static_cast<unsigned>((d.N + kTile - 1) / kTile);
  const int64_t pn_blocks = pn_blocks_of(d);
  if (p.z || p.D) {
    const unsigned row_blocks = static_cast<unsigned>((d.b * d.L + kGateRows - 1) / kGateRows);
    gate_skip_backward_kernel<T><<<dim3(row_blocks, heads), kThreads, 0, stream>>>(p, grads, d, y_ssm,
                                                                                   static_cast<T*>(w.g), w.g32);
  }
  entering_state_grad_kernel<T><<<dim3(bc, heads, p_tiles * n_tiles), kThreads, 0, stream>>>(p, d, g, w.fwd.cum,
                                                                                             w.dstates);
  state_passing_backward_kernel<<<dim3(static_cast<unsigned>(pn_blocks), heads, static_cast<unsigned>(d.b)),
                                  kPassThreads, 0, stream>>>(p, grads, d, w.fwd.cum, w.fwd.states, w.dstates,
                                                             w.dcarry);
  chunk_dcb_kernel<T><<<dim3(bc, groups, tiles * tiles), kThreads, 0, stream>>>(p, d, g, w.fwd.dtp, w.fwd.cum,
                                                                                w.dcb);
  chunk_dx_kernel<T><<<dim3(bc, heads, tiles * p_tiles), kThreads, 0, stream>>>(
      p, grads, d, g, w.fwd.dtp, w.fwd.cum, w.fwd.cb, w.dstates, w.r_state);
  chunk_dc_kernel<T><<<dim3(bc, groups, tiles * n_tiles), kThreads, 0, stream>>>(p, grads, d, g, w.fwd.cum,
                                                                                 w.fwd.states, w.dcb);
  chunk_db_kernel<T><<<dim3(bc, groups, tiles * n_tiles), kThreads, 0, stream>>>(p, grads, d, w.fwd.dtp, w.fwd.cum,
                                                                                 w.dstates, w.dcb);
  chunk_dt_backward_kernel<T><<<dim3(bc, heads), static_cast<unsigned>(d.Q), 0, stream>>>(
      p, grads, d, w.g32, w.fwd.dtp, w.fwd.cum, w.fwd.cb, w.fwd.states, w.r_state, w.dcarry, pn_blocks);
  return launch_status();
}

}  // namespace

size_t ssd_chunk_scan_bwd_workspace_bytes(const SsdShape& shape) {
  const Dims d = make_dims(shape);
  const BackwardSizes s = backward_sizes(d);
  return ssd_chunk_scan_fwd_workspace_bytes(shape) + s.final_states + s.y_ssm + s.g + s.g32 + s.dstates + s.dcb +
         s.r_state + s.dcarry;
}

Status run_ssd_chunk_scan_bwd(const SsdChunkScanParams& p, const SsdChunkScanGrads& grads, cudaStream_t stream) {
  const SsdShape& s = p.shape;
  if (p.dtype == DType::kFloat32) return Status::kUnsupported;
  if (s.batch <= 0 || s.seqlen <= 0 || s.heads <= 0 || s.head_dim <= 0 || s.groups <= 0 || s.state_dim <= 0 ||
      s.heads % s.groups != 0 || s.head_dim > kMaxP || s.state_dim > 256 ||
      (s.chunk_size != 64 && s.chunk_size != 128 && s.chunk_size != 256) || s.heads > 65535 || s.batch > 65535) {
    return Status::kInvalidArgument;
  }
  if (!p.x || !p.dt || !p.A || !p.B || !p.C || !grads.dy || !grads.dx || !grads.ddt || !grads.dA || !grads.dB ||
      !grads.dC || !grads.workspace || (p.D && !grads.dD) || (p.z && !grads.dz) || (p.dt_bias && !grads.ddt_bias) ||
      (p.initial_states && !grads.dinitial_states)) {
    return Status::kInvalidArgument;
  }
  const Dims d = make_dims(s);
  if (d.b * d.nc > 0x7fffffff || (d.b * d.L + kGateRows - 1) / kGateRows > 0x7fffffff) {
    return Status::kInvalidArgument;
  }
  return SUBQ_HALF_DTYPE_SWITCH(p.dtype, T, [&] { return launch<T>(p, grads, d, stream); });
}

}  // namespace subq
