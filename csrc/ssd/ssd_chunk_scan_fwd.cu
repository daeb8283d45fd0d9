// SSD chunk scan forward: five kernels (see ssd_chunk_scan.h), tensor-core tiles through WMMA on 16-bit inputs
// with float32 accumulation. Tiles are 64 x 64 outputs per 4-warp block (each warp 32 x 32, 2 x 2 fragments),
// K staged through shared memory 32 (or 64) at a time; every global load is bounds-checked and zero-filled, so
// the last chunk, P and N need not be tile multiples.
#include "ssd/ssd_chunk_scan.h"
#include "common/cuda_status.h"
#include "ssd/ssd_chunk_scan_tiles.cuh"

#include "common/convert.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

namespace subq {
namespace {

// ---- 1. chunk_cumsum: processed dt and the inclusive cumulative sum of dt * A within each chunk -----------------
// grid (b * nc, H), block Q threads (64..256, whole warps).
__global__ void chunk_cumsum_kernel(SsdForwardParams p, Dims d, float* dtp, float* cum) {
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
  __shared__ __align__(32) T sC[kTile][kStep + kPad];  // [t][n]
  __shared__ __align__(32) T sB[kTile][kStep + kPad];  // [s][n]
  const int warp = threadIdx.x / 32, wr = warp / 2, wc = warp % 2;
  FragAcc acc[2][2];
  zero(acc);
  for (int64_t n0 = 0; n0 < d.N; n0 += kStep) {
    for (int i = threadIdx.x; i < kTile * kStep; i += kThreads) {
      const int r = i / kStep, k = i % kStep;
      const int64_t n = n0 + k;
      const int64_t tpos = c * d.Q + ti * kTile + r, spos = c * d.Q + si * kTile + r;
      sC[r][k] = bc_element(C, d, b, tpos, g, n);
      sB[r][k] = bc_element(B, d, b, spos, g, n);
    }
    __syncthreads();
    for (int kk = 0; kk < kStep; kk += 16) {
      FragA<T> fa[2];
      FragBcol<T> fb[2];  // element (n, s) = sB[s][n]: column-major
      for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(fa[i], &sC[wr * 32 + i * 16][kk], kStep + kPad);
      for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(fb[j], &sB[wc * 32 + j * 16][kk], kStep + kPad);
      for (int i = 0; i < 2; ++i)
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
    }
    __syncthreads();
  }
  float* out = cb + (((b * d.nc + c) * d.G + g) * d.Q + ti * kTile) * d.Q + si * kTile;
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 2; ++j)
      wmma::store_matrix_sync(out + (wr * 32 + i * 16) * d.Q + wc * 32 + j * 16, acc[i][j],
                              static_cast<unsigned>(d.Q), wmma::mem_row_major);
}

// ---- 3. chunk_state: state[p, n] = sum_s x[s, p] w_s B[s, n], w_s = exp(cum_last - cum_s) dt_s ------------------
// grid (b * nc, H, p_tiles * n_tiles). w_s is zero where s is not in the chunk's last sequence.
template <typename T>
__global__ void chunk_state_kernel(SsdForwardParams p, Dims d, const float* dtp, const float* cum, float* states) {
  const int64_t p_tiles = (d.P + kTile - 1) / kTile;
  const int64_t pi = blockIdx.z % p_tiles, ni = blockIdx.z / p_tiles;
  const int64_t b = blockIdx.x / d.nc, c = blockIdx.x % d.nc, h = blockIdx.y, g = h / d.heads_per_group;
  const T* x = static_cast<const T*>(p.x);
  const T* B = static_cast<const T*>(p.B);
  __shared__ __align__(32) T sX[kStep][kTile + kPad];  // [s][p], scaled by w_s
  __shared__ __align__(32) T sB[kStep][kTile + kPad];  // [s][n]
  __shared__ __align__(32) float sOut[kTile][kTile + kOutPad];
  __shared__ float sW[kStep];
  const int64_t row = (b * d.H + h) * d.Lp + c * d.Q;
  const float cum_last = cum[row + d.Q - 1];
  const int32_t seq_last = seq_at(p.seq_idx, d, b, c * d.Q + d.Q - 1);
  const int warp = threadIdx.x / 32, wr = warp / 2, wc = warp % 2;
  FragAcc acc[2][2];
  zero(acc);
  for (int s0 = 0; s0 < d.Q; s0 += kStep) {
    if (threadIdx.x < kStep) {
      const int s = s0 + threadIdx.x;
      const int64_t pos = c * d.Q + s;
      float w = 0.f;
      if (pos < d.L && seq_at(p.seq_idx, d, b, pos) == seq_last) w = expf(cum_last - cum[row + s]) * dtp[row + s];
      sW[threadIdx.x] = w;
    }
    __syncthreads();
    for (int i = threadIdx.x; i < kStep * kTile; i += kThreads) {
      const int s = i / kTile, col = i % kTile;
      const int64_t pos = c * d.Q + s0 + s;
      const int64_t pp = pi * kTile + col, nn = ni * kTile + col;
      const float xv = pos < d.L && pp < d.P ? to_float(x[((b * d.L + pos) * d.H + h) * d.P + pp]) * sW[s] : 0.f;
      sX[s][col] = from_float<T>(xv);
      sB[s][col] = bc_element(B, d, b, pos, g, nn);
    }
    __syncthreads();
    for (int kk = 0; kk < kStep; kk += 16) {
      FragAcol<T> fa[2];  // element (p, s) = sX[s][p]: column-major
      FragB<T> fb[2];     // element (s, n) = sB[s][n]: row-major
      for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(fa[i], &sX[kk][wr * 32 + i * 16], kTile + kPad);
      for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(fb[j], &sB[kk][wc * 32 + j * 16], kTile + kPad);
      for (int i = 0; i < 2; ++i)
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
    }
    __syncthreads();
  }
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 2; ++j)
      wmma::store_matrix_sync(&sOut[wr * 32 + i * 16][wc * 32 + j * 16], acc[i][j], kTile + kOutPad,
                              wmma::mem_row_major);
  __syncthreads();
  float* out = states + ((b * d.nc + c) * d.H + h) * d.P * d.N;
  for (int i = threadIdx.x; i < kTile * kTile; i += kThreads) {
    const int r = i / kTile, col = i % kTile;
    const int64_t pp = pi * kTile + r, nn = ni * kTile + col;
    if (pp < d.P && nn < d.N) out[pp * d.N + nn] = sOut[r][col];
  }
}

// ---- 4. state_passing: h_c = carry_c h_{c-1} + state_c, leaving the state entering each chunk in its slot -------
// grid (ceil(P*N / 256), H, b), block 256; one thread per state element.
__global__ void state_passing_kernel(SsdForwardParams p, Dims d, const float* cum, float* states) {
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
__global__ void chunk_scan_kernel(SsdForwardParams p, Dims d, const float* dtp, const float* cum, const float* cb,
                                  const float* states) {
  const int64_t t_tiles = d.Q / kTile;
  const int64_t ti = blockIdx.z % t_tiles, pi = blockIdx.z / t_tiles;
  const int64_t b = blockIdx.x / d.nc, c = blockIdx.x % d.nc, h = blockIdx.y, g = h / d.heads_per_group;
  const T* x = static_cast<const T*>(p.x);
  const T* C = static_cast<const T*>(p.C);
  const T zero_t = from_float<T>(0.f);

  __shared__ __align__(32) T sC[kTile][kStep + kPad];  // [t][n], times exp(cum_t) where t continues the sequence
  __shared__ __align__(32) T sE[kTile][kStep + kPad];  // [p][n]: the state entering the chunk
  // The two 64 x 64 operand tiles of the intra-chunk product, later reused for the float32 output tile.
  constexpr int kOperandBytes = 2 * kTile * (kTile + kPad) * sizeof(T);
  constexpr int kOutBytes = kTile * (kTile + kOutPad) * sizeof(float);
  __shared__ __align__(32) unsigned char raw[kOperandBytes > kOutBytes ? kOperandBytes : kOutBytes];
  auto sS = reinterpret_cast<T (*)[kTile + kPad]>(raw);                                  // [t][s] scores
  auto sX = reinterpret_cast<T (*)[kTile + kPad]>(raw + kTile * (kTile + kPad) * sizeof(T));  // [s][p]
  auto sOut = reinterpret_cast<float (*)[kTile + kOutPad]>(raw);
  __shared__ float cum_t[kTile], scale_t[kTile], cum_s[kTile], dt_s[kTile];
  __shared__ int32_t seq_t[kTile], seq_s[kTile];

  const int64_t row = (b * d.H + h) * d.Lp + c * d.Q;
  const int32_t entering_seq = seq_at(p.seq_idx, d, b, c == 0 ? 0 : c * d.Q - 1);
  if (threadIdx.x < kTile) {
    const int64_t t = ti * kTile + threadIdx.x;
    cum_t[threadIdx.x] = cum[row + t];
    seq_t[threadIdx.x] = seq_at(p.seq_idx, d, b, c * d.Q + t);
    scale_t[threadIdx.x] = seq_t[threadIdx.x] == entering_seq ? expf(cum[row + t]) : 0.f;
  }
  __syncthreads();
  const int warp = threadIdx.x / 32, wr = warp / 2, wc = warp % 2;
  FragAcc acc[2][2];
  zero(acc);

  // State to output: (scale_t C_t) . h_entering[p, :]
  const float* entering = states + ((b * d.nc + c) * d.H + h) * d.P * d.N;
  for (int64_t n0 = 0; n0 < d.N; n0 += kStep) {
    for (int i = threadIdx.x; i < kTile * kStep; i += kThreads) {
      const int r = i / kStep, k = i % kStep;
      const int64_t n = n0 + k, tpos = c * d.Q + ti * kTile + r, pp = pi * kTile + r;
      const float cv = tpos < d.L && n < d.N ? to_float(C[((b * d.L + tpos) * d.G + g) * d.N + n]) * scale_t[r] : 0.f;
      sC[r][k] = from_float<T>(cv);
      sE[r][k] = from_float<T>(pp < d.P && n < d.N ? entering[pp * d.N + n] : 0.f);
    }
    __syncthreads();
    for (int kk = 0; kk < kStep; kk += 16) {
      FragA<T> fa[2];
      FragBcol<T> fb[2];  // element (n, p) = sE[p][n]: column-major
      for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(fa[i], &sC[wr * 32 + i * 16][kk], kStep + kPad);
      for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(fb[j], &sE[wc * 32 + j * 16][kk], kStep + kPad);
      for (int i = 0; i < 2; ++i)
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
    }
    __syncthreads();
  }

  // Intra-chunk: scores[t, s] = CB[t, s] exp(cum_t - cum_s) dt_s on s <= t in one sequence, times x[s, p].
  const float* cb_rows = cb + (((b * d.nc + c) * d.G + g) * d.Q + ti * kTile) * d.Q;
  for (int64_t sj = 0; sj <= ti; ++sj) {
    if (threadIdx.x < kTile) {
      const int64_t s = sj * kTile + threadIdx.x;
      cum_s[threadIdx.x] = cum[row + s];
      dt_s[threadIdx.x] = dtp[row + s];
      seq_s[threadIdx.x] = seq_at(p.seq_idx, d, b, c * d.Q + s);
    }
    __syncthreads();
    for (int i = threadIdx.x; i < kTile * kTile; i += kThreads) {
      const int r = i / kTile, col = i % kTile;
      const int64_t t = ti * kTile + r, s = sj * kTile + col;
      float score = 0.f;  // masked before the exp: cum_t - cum_s <= 0 wherever it is taken
      if (s <= t && seq_s[col] == seq_t[r]) score = cb_rows[r * d.Q + s] * expf(cum_t[r] - cum_s[col]) * dt_s[col];
      sS[r][col] = from_float<T>(score);
      const int64_t xs = c * d.Q + sj * kTile + r, pp = pi * kTile + col;
      sX[r][col] = xs < d.L && pp < d.P ? x[((b * d.L + xs) * d.H + h) * d.P + pp] : zero_t;
    }
    __syncthreads();
    for (int kk = 0; kk < kTile; kk += 16) {
      FragA<T> fa[2];
      FragB<T> fb[2];  // element (s, p) = sX[s][p]: row-major
      for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(fa[i], &sS[wr * 32 + i * 16][kk], kTile + kPad);
      for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(fb[j], &sX[kk][wc * 32 + j * 16], kTile + kPad);
      for (int i = 0; i < 2; ++i)
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
    }
    __syncthreads();
  }

  // Epilogue through shared memory: skip connection, gate, bounds, 16-bit store.
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 2; ++j)
      wmma::store_matrix_sync(&sOut[wr * 32 + i * 16][wc * 32 + j * 16], acc[i][j], kTile + kOutPad,
                              wmma::mem_row_major);
  __syncthreads();
  const T* z = static_cast<const T*>(p.z);
  T* y = static_cast<T*>(p.y);
  for (int i = threadIdx.x; i < kTile * kTile; i += kThreads) {
    const int r = i / kTile, col = i % kTile;
    const int64_t tpos = c * d.Q + ti * kTile + r, pp = pi * kTile + col;
    if (tpos >= d.L || pp >= d.P) continue;
    const int64_t offset = ((b * d.L + tpos) * d.H + h) * d.P + pp;
    float out = sOut[r][col];
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
  }
}

template <typename T>
Status launch(const SsdForwardParams& p, const Dims& d, cudaStream_t stream) {
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

size_t ssd_forward_workspace_bytes(const SsdShape& shape) {
  const Dims d = make_dims(shape);
  return 2 * aligned(sizeof(float) * d.b * d.H * d.Lp) + aligned(sizeof(float) * d.b * d.nc * d.G * d.Q * d.Q) +
         aligned(sizeof(float) * d.b * d.nc * d.H * d.P * d.N);
}

Status run_ssd_forward(const SsdForwardParams& p, cudaStream_t stream) {
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
  return p.dtype == DType::kBFloat16 ? launch<__nv_bfloat16>(p, d, stream) : launch<__half>(p, d, stream);
}

}  // namespace subq
