// SSD chunk scan forward: five kernels (see ssd_chunk_scan.h), tensor-core tiles through WMMA on 16-bit inputs
// with float32 accumulation (common/wmma_tiles.cuh: 64 x 64 outputs per 4-warp block, K staged 32 at a time);
// every global load is bounds-checked and zero-filled, so the last chunk, P and N need not be tile multiples.
#include "ssd/ssd_chunk_scan.h"
#include "common/cuda_status.h"
#include "common/dispatch.h"
#include "ssd/ssd_chunk_scan_tiles.cuh"

#include "common/convert.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace subq {
namespace {

// ---- 1. chunk_cumsum: processed dt and the inclusive cumulative sum of dt * A within each chunk -----------------
// grid (b * nc, H), block Q threads (64..256, whole warps).
__global__ void chunk_cumsum_kernel(SsdChunkScanParams p, Dims d, float* dtp, float* cum) {
  const int t = threadIdx.x;
  const int64_t b = blockIdx.x / d.nc, c = blockIdx.x % d.nc, h = blockIdx.y;
  const int64_t pos = c * d.Q + t;
  float v = 0.f;  // padded positions: dt = 0
  if (pos < d.L) {
    v = p.dt[(b * d.L + pos) * d.H + h];
    if (p.dt_bias) v += p.dt_bias[h];
    if (p.dt_softplus) v = v <= 20.f ? log1pf(expf(v)) : v;  // torch's softplus, threshold 20
    if (p.has_dt_limit) {  // comparisons keep NaN, as torch.clamp does
      v = v < p.dt_lo ? p.dt_lo : v;
      v = v > p.dt_hi ? p.dt_hi : v;
    }
  }
  float a = v * p.A[h];
  __shared__ float warp_totals[8];
  const int lane = t & 31, warp = t >> 5;
  for (int offset = 1; offset < 32; offset <<= 1) {
    const float up = __shfl_up_sync(0xffffffffu, a, offset);
    if (lane >= offset) a += up;
  }
  if (lane == 31) warp_totals[warp] = a;
  __syncthreads();
  for (int w = 0; w < warp; ++w) a += warp_totals[w];
  const int64_t out = (b * d.H + h) * d.Lp + pos;
  dtp[out] = v;
  cum[out] = a;
}

// ---- 2. chunk_cb: CB[t, s] = C_t . B_s per (batch, chunk, group), lower-triangular 64 x 64 tiles ----------------
// grid (b * nc, G, tiles * tiles).
template <typename T>
__global__ void chunk_cb_kernel(const T* __restrict__ B, const T* __restrict__ C, Dims d, float* cb) {
  const int tiles = static_cast<int>(d.Q / kTile);
  const int ti = blockIdx.z / tiles, si = blockIdx.z % tiles;
  if (si > ti) return;  // above the diagonal: never read
  const int64_t b = blockIdx.x / d.nc, c = blockIdx.x % d.nc, g = blockIdx.y;
  const int64_t t0 = c * d.Q + ti * kTile, s0 = c * d.Q + si * kTile;
  FragAcc acc[2][2];
  zero(acc);
  accumulate_product<T, kTile, kTile, wmma::row_major, wmma::col_major>(  // element (n, s) = B[s][n]
      acc, 0, d.N, [&](int r, int64_t n) { return bc_element(C, d, b, t0 + r, g, n); },
      [&](int64_t n, int col) { return bc_element(B, d, b, s0 + col, g, n); },
      reinterpret_cast<T*>(product_smem<T, kTile, kTile>()));
  spill<kTile, kTile>(acc, cb + (((b * d.nc + c) * d.G + g) * d.Q + ti * kTile) * d.Q + si * kTile,
                      static_cast<unsigned>(d.Q));
}

// ---- 3. chunk_state: state[p, n] = sum_s x[s, p] w_s B[s, n], w_s = exp(cum_last - cum_s) dt_s ------------------
// grid (b * nc, H, p_tiles * n_tiles). w_s is zero where s is not in the chunk's last sequence.
template <typename T>
__global__ void chunk_state_kernel(SsdChunkScanParams p, Dims d, const float* dtp, const float* cum, float* states) {
  const int64_t p_tiles = (d.P + kTile - 1) / kTile;
  const int64_t pi = blockIdx.z % p_tiles, ni = blockIdx.z / p_tiles;
  const int64_t b = blockIdx.x / d.nc, c = blockIdx.x % d.nc, h = blockIdx.y, g = h / d.heads_per_group;
  const T* x = static_cast<const T*>(p.x);
  const T* B = static_cast<const T*>(p.B);
  unsigned char* smem = product_smem<T, kTile, kTile>();
  __shared__ float weight[kMaxQ];
  const int64_t row = (b * d.H + h) * d.Lp + c * d.Q;
  const float cum_last = cum[row + d.Q - 1];
  const int32_t seq_last = seq_at(p.seq_idx, d, b, c * d.Q + d.Q - 1);
  for (int s = threadIdx.x; s < d.Q; s += kThreads) {
    const int64_t pos = c * d.Q + s;
    const bool in_last = pos < d.L && seq_at(p.seq_idx, d, b, pos) == seq_last;
    weight[s] = in_last ? expf(cum_last - cum[row + s]) * dtp[row + s] : 0.f;
  }
  FragAcc acc[2][2];
  zero(acc);
  accumulate_product<T, kTile, kTile, wmma::col_major, wmma::row_major>(  // element (p, s) = x[s][p] w_s
      acc, 0, d.Q,
      [&](int r, int64_t s) {
        const int64_t pos = c * d.Q + s, pp = pi * kTile + r;
        return pos < d.L && pp < d.P ? to_float(x[((b * d.L + pos) * d.H + h) * d.P + pp]) * weight[s] : 0.f;
      },
      [&](int64_t s, int col) { return bc_element(B, d, b, c * d.Q + s, g, ni * kTile + col); },
      reinterpret_cast<T*>(smem));
  float* out = states + ((b * d.nc + c) * d.H + h) * d.P * d.N;
  store_tile<kTile, kTile>(acc, reinterpret_cast<float*>(smem), [&](int r, int col, float v) {
    const int64_t pp = pi * kTile + r, nn = ni * kTile + col;
    if (pp < d.P && nn < d.N) out[pp * d.N + nn] = v;
  });
}

// ---- 4. state_passing: h_c = carry_c h_{c-1} + state_c, leaving the state entering each chunk in its slot -------
// grid (ceil(P*N / 256), H, b), block 256; one thread per state element.
__global__ void state_passing_kernel(SsdChunkScanParams p, Dims d, const float* cum, float* states) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t h = blockIdx.y, b = blockIdx.z, PN = d.P * d.N;
  if (e >= PN) return;
  float state = p.initial_states ? p.initial_states[(b * d.H + h) * PN + e] : 0.f;
  int32_t entering_seq = seq_at(p.seq_idx, d, b, 0);  // initial_states belongs to the first sequence
  for (int64_t c = 0; c < d.nc; ++c) {
    const int32_t last_seq = seq_at(p.seq_idx, d, b, c * d.Q + d.Q - 1);
    const float carry = last_seq == entering_seq ? expf(cum[(b * d.H + h) * d.Lp + c * d.Q + d.Q - 1]) : 0.f;
    float* slot = states + ((b * d.nc + c) * d.H + h) * PN + e;
    const float chunk_state = *slot;
    *slot = state;
    state = carry * state + chunk_state;
    entering_seq = last_seq;
  }
  p.final_states[(b * d.H + h) * PN + e] = state;
}

// ---- 5. chunk_scan: y = intra-chunk quadratic form + state to output + D x, gated --------------------------------
// grid (b * nc, H, t_tiles * p_tiles).
template <typename T>
__global__ void chunk_scan_kernel(SsdChunkScanParams p, Dims d, const float* dtp, const float* cum, const float* cb,
                                  const float* states) {
  const int64_t t_tiles = d.Q / kTile;
  const int64_t ti = blockIdx.z % t_tiles, pi = blockIdx.z / t_tiles;
  const int64_t b = blockIdx.x / d.nc, c = blockIdx.x % d.nc, h = blockIdx.y, g = h / d.heads_per_group;
  const T* x = static_cast<const T*>(p.x);
  const T* C = static_cast<const T*>(p.C);
  const T zero_t = from_float<T>(0.f);
  unsigned char* smem = product_smem<T, kTile, kTile>();  // the operands' staging, then the float32 output tile
  T* stage = reinterpret_cast<T*>(smem);
  __shared__ float cum_t[kTile], scale_t[kTile], cum_s[kMaxQ], dt_s[kMaxQ];
  __shared__ int32_t seq_t[kTile], seq_s[kMaxQ];

  // The vectors the loaders read, published by the first product's first barrier.
  const int64_t row = (b * d.H + h) * d.Lp + c * d.Q, t0 = ti * kTile;
  const int32_t entering_seq = seq_at(p.seq_idx, d, b, c == 0 ? 0 : c * d.Q - 1);
  if (threadIdx.x < kTile) {
    const int64_t t = t0 + threadIdx.x;
    cum_t[threadIdx.x] = cum[row + t];
    seq_t[threadIdx.x] = seq_at(p.seq_idx, d, b, c * d.Q + t);
    scale_t[threadIdx.x] = seq_t[threadIdx.x] == entering_seq ? expf(cum[row + t]) : 0.f;
  }
  for (int s = threadIdx.x; s < t0 + kTile; s += kThreads) {
    cum_s[s] = cum[row + s];
    dt_s[s] = dtp[row + s];
    seq_s[s] = seq_at(p.seq_idx, d, b, c * d.Q + s);
  }
  FragAcc acc[2][2];
  zero(acc);

  // State to output: (scale_t C_t) . h_entering[p, :]
  const float* entering = states + ((b * d.nc + c) * d.H + h) * d.P * d.N;
  accumulate_product<T, kTile, kTile, wmma::row_major, wmma::col_major>(  // element (n, p) = entering[p][n]
      acc, 0, d.N,
      [&](int r, int64_t n) {
        const int64_t tpos = c * d.Q + t0 + r;
        return tpos < d.L ? to_float(C[((b * d.L + tpos) * d.G + g) * d.N + n]) * scale_t[r] : 0.f;
      },
      [&](int64_t n, int col) {
        const int64_t pp = pi * kTile + col;
        return pp < d.P ? entering[pp * d.N + n] : 0.f;
      },
      stage);

  // Intra-chunk: scores[t, s] = CB[t, s] exp(cum_t - cum_s) dt_s on s <= t in one sequence, times x[s, p].
  const float* cb_rows = cb + (((b * d.nc + c) * d.G + g) * d.Q + t0) * d.Q;
  accumulate_product<T, kTile, kTile, wmma::row_major, wmma::row_major>(
      acc, 0, t0 + kTile,  // s <= t: the tiles up to the diagonal
      [&](int r, int64_t s) {
        // Masked before the exp: cum_t - cum_s <= 0 wherever it is taken.
        return s <= t0 + r && seq_s[s] == seq_t[r] ? cb_rows[r * d.Q + s] * expf(cum_t[r] - cum_s[s]) * dt_s[s] : 0.f;
      },
      [&](int64_t s, int col) {
        const int64_t xs = c * d.Q + s, pp = pi * kTile + col;
        return xs < d.L && pp < d.P ? x[((b * d.L + xs) * d.H + h) * d.P + pp] : zero_t;
      },
      stage);

  // Epilogue: skip connection, gate, bounds, 16-bit store.
  const T* z = static_cast<const T*>(p.z);
  T* y = static_cast<T*>(p.y);
  store_tile<kTile, kTile>(acc, reinterpret_cast<float*>(smem), [&](int r, int col, float out) {
    const int64_t tpos = c * d.Q + t0 + r, pp = pi * kTile + col;
    if (tpos >= d.L || pp >= d.P) return;
    const int64_t offset = ((b * d.L + tpos) * d.H + h) * d.P + pp;
    if (p.D) out += (p.D_per_channel ? p.D[h * d.P + pp] : p.D[h]) * to_float(x[offset]);
    if (z) {
      const float zv = to_float(z[offset]);
      out *= zv / (1.f + expf(-zv));
    }
    if (p.y_float32) {
      p.y_float32[offset] = out;
    } else {
      y[offset] = from_float<T>(out);
    }
  });
}

template <typename T>
Status launch(const SsdChunkScanParams& p, const Dims& d, cudaStream_t stream) {
  const Workspace w = carve(p.workspace, d);
  const unsigned bc = static_cast<unsigned>(d.b * d.nc), heads = static_cast<unsigned>(d.H);
  const unsigned tiles = static_cast<unsigned>(d.Q / kTile);
  const unsigned p_tiles = static_cast<unsigned>((d.P + kTile - 1) / kTile);
  const unsigned n_tiles = static_cast<unsigned>((d.N + kTile - 1) / kTile);
  chunk_cumsum_kernel<<<dim3(bc, heads), static_cast<unsigned>(d.Q), 0, stream>>>(p, d, w.dtp, w.cum);
  chunk_cb_kernel<T><<<dim3(bc, static_cast<unsigned>(d.G), tiles * tiles), kThreads, 0, stream>>>(
      static_cast<const T*>(p.B), static_cast<const T*>(p.C), d, w.cb);
  chunk_state_kernel<T><<<dim3(bc, heads, p_tiles * n_tiles), kThreads, 0, stream>>>(p, d, w.dtp, w.cum, w.states);
  const unsigned pn_blocks = static_cast<unsigned>((d.P * d.N + 255) / 256);
  state_passing_kernel<<<dim3(pn_blocks, heads, static_cast<unsigned>(d.b)), 256, 0, stream>>>(p, d, w.cum,
                                                                                                w.states);
  chunk_scan_kernel<T><<<dim3(bc, heads, tiles * p_tiles), kThreads, 0, stream>>>(p, d, w.dtp, w.cum, w.cb,
                                                                                  w.states);
  return launch_status();
}

}  // namespace

size_t ssd_chunk_scan_fwd_workspace_bytes(const SsdShape& shape) {
  const Dims d = make_dims(shape);
  return 2 * aligned(sizeof(float) * d.b * d.H * d.Lp) + aligned(sizeof(float) * d.b * d.nc * d.G * d.Q * d.Q) +
         aligned(sizeof(float) * d.b * d.nc * d.H * d.P * d.N);
}

Status run_ssd_chunk_scan_fwd(const SsdChunkScanParams& p, cudaStream_t stream) {
  const SsdShape& s = p.shape;
  if (p.dtype == DType::kFloat32) return Status::kUnsupported;
  if (s.batch <= 0 || s.seqlen <= 0 || s.heads <= 0 || s.head_dim <= 0 || s.groups <= 0 || s.state_dim <= 0 ||
      s.heads % s.groups != 0 || s.head_dim > 128 || s.state_dim > 256 ||
      (s.chunk_size != 64 && s.chunk_size != 128 && s.chunk_size != 256) || s.heads > 65535 || s.batch > 65535) {
    return Status::kInvalidArgument;
  }
  if (!p.x || !p.dt || !p.A || !p.B || !p.C || (!p.y && !p.y_float32) || !p.final_states || !p.workspace) {
    return Status::kInvalidArgument;
  }
  const Dims d = make_dims(s);
  if (d.b * d.nc > 0x7fffffff) return Status::kInvalidArgument;
  return SUBQ_HALF_DTYPE_SWITCH(p.dtype, T, [&] { return launch<T>(p, d, stream); });
}

}  // namespace subq
