// The tensor-core stage of the fused Monarch-DFT convolution: the small DFT F_n along one axis of the row as
// complex products of 16 x 16 tiles on WMMA's TF32 units (sm_80 and later), with the row's real and imaginary
// planes (monarch_dft_row.cuh) as the operands' parts: (A_re + i A_im)(B_re + i B_im) is four real tile products.
//
// Precision: "3xTF32". Each float32 operand is split as hi + lo, both TF32, and hi hi + hi lo + lo hi is kept (lo lo
// lies below float32 rounding), which gives the stage the float32 accuracy of the CUDA-core stage it replaces. One
// TF32 product per stage would be three times cheaper, but a numpy model of this kernel at L = 8192 put the float16
// forward at 92% of its error budget with it (1.0 fails), and the float32 filter gradients of the backward, compared
// with a float32 torch.fft, would fail outright.
#pragma once

#include <mma.h>

#include "monarch_conv/monarch_dft_row.cuh"

namespace subq::monarch_dft_smem {

namespace wmma = nvcuda::wmma;

constexpr int kTileK = 8;  // WMMA's TF32 shape: m16 n16 k8
constexpr int kMaxTiles = kMaxTensorCoreFactor / kTile;

using TileA = wmma::fragment<wmma::matrix_a, kTile, kTile, kTileK, wmma::precision::tf32, wmma::row_major>;
using TileB = wmma::fragment<wmma::matrix_b, kTile, kTile, kTileK, wmma::precision::tf32, wmma::row_major>;
using TileAcc = wmma::fragment<wmma::accumulator, kTile, kTile, kTileK, float>;

// sign * x as hi + lo, both TF32.
template <typename Tile>
struct Split {
  Tile hi, lo;
};

template <typename Tile>
__device__ __forceinline__ Split<Tile> load_split(const float* p, int ldm, float sign) {
  Split<Tile> s;
  wmma::load_matrix_sync(s.hi, p, ldm);
#pragma unroll
  for (int i = 0; i < s.hi.num_elements; ++i) {
    const float x = sign * s.hi.x[i];
    s.hi.x[i] = wmma::__float_to_tf32(x);
    s.lo.x[i] = wmma::__float_to_tf32(x - s.hi.x[i]);
  }
  return s;
}

template <typename Tile>
__device__ __forceinline__ Split<Tile> negated(Split<Tile> s) {
#pragma unroll
  for (int i = 0; i < s.hi.num_elements; ++i) {
    s.hi.x[i] = -s.hi.x[i];
    s.lo.x[i] = -s.lo.x[i];
  }
  return s;
}

// acc += a b, the small terms first.
__device__ __forceinline__ void mma_3xtf32(TileAcc& acc, const Split<TileA>& a, const Split<TileB>& b) {
  wmma::mma_sync(acc, a.lo, b.hi, acc);
  wmma::mma_sync(acc, a.hi, b.lo, acc);
  wmma::mma_sync(acc, a.hi, b.hi, acc);
}

// Where a group's operand tiles sit: the tile for output tile kt and contraction step j (a multiple of kTileK) at
// re / im + kt * kt_step + j * j_step, rows ldm floats apart. im_sign is -1 on the small DFT's side of an inverse
// stage (conj F_n).
struct Operand {
  const float* re;
  const float* im;
  int kt_step, j_step, ldm;
  float im_sign;
};

// One stage along `axis` (tensor_core_axis(plan, axis)), in place, then its twiddle diagonal (twiddled). The axis
// view (outer, n, stride) splits into N / (16 n) groups of 16 fibres, one warp's each:
//   stride > 1:  Y_o[:, s0 .. s0+16] = F_n X_o[:, s0 .. s0+16]   (X_o the n x stride slab of fibre block o)
//   stride = 1:  Y[o0 .. o0+16, :] = X[o0 .. o0+16, :] F_n        (X the (N/n) x n matrix; F_n is symmetric)
// The small DFT is the left operand in the first form and the right one in the second; the output has n / 16 tiles
// either way. A group reads only its own elements, so its warp holds all its output tiles in registers, then
// stores them in place over its inputs and applies the twiddles to them; one CTA barrier ends the stage. A call, not
// inlined, for the reason dft_stage's is (monarch_dft_smem.cuh).
__device__ __noinline__ inline void tensor_core_stage(const Plan& plan, int axis, bool inverse) {
  const SmemLayout smem = smem_layout(plan.N);
  const Row z = smem.z;
  const int n = plan.n[axis], stride = plan.stride[axis], tiles = n / kTile;
  const float* f_re = smem.tables + plan.table[axis];
  const float* f_im = f_re + n * n;
  const float f_im_sign = inverse ? -1.f : 1.f;
  const int t_axis = twiddle_axis(plan, axis, inverse), lane = threadIdx.x % 32;
  const int groups = plan.N / (kTile * n);
  for (int g = threadIdx.x / 32; g < groups; g += blockDim.x / 32) {
    int base, out_kt_step, out_ldm;
    Operand a, b;
    if (stride > 1) {
      const int column_tiles = stride / kTile;
      base = (g / column_tiles) * n * stride + (g % column_tiles) * kTile;
      a = {f_re, f_im, kTile * n, 1, n, f_im_sign};
      b = {z.re + base, z.im + base, 0, stride, stride, 1.f};
      out_kt_step = kTile * stride;
      out_ldm = stride;
    } else {
      base = g * kTile * n;
      a = {z.re + base, z.im + base, 0, 1, n, 1.f};
      b = {f_re, f_im, kTile, n, n, f_im_sign};
      out_kt_step = kTile;
      out_ldm = n;
    }
    TileAcc acc_re[kMaxTiles], acc_im[kMaxTiles];
#pragma unroll
    for (int kt = 0; kt < kMaxTiles; ++kt) {
      if (kt >= tiles) continue;
      wmma::fill_fragment(acc_re[kt], 0.f);
      wmma::fill_fragment(acc_im[kt], 0.f);
      for (int j = 0; j < n; j += kTileK) {
        const int at = kt * a.kt_step + j * a.j_step, bt = kt * b.kt_step + j * b.j_step;
        const Split<TileA> a_re = load_split<TileA>(a.re + at, a.ldm, 1.f);
        const Split<TileB> b_re = load_split<TileB>(b.re + bt, b.ldm, 1.f);
        const Split<TileB> b_im = load_split<TileB>(b.im + bt, b.ldm, b.im_sign);
        mma_3xtf32(acc_re[kt], a_re, b_re);
        mma_3xtf32(acc_im[kt], a_re, b_im);
        const Split<TileA> a_im = load_split<TileA>(a.im + at, a.ldm, a.im_sign);
        mma_3xtf32(acc_im[kt], a_im, b_re);
        mma_3xtf32(acc_re[kt], negated(a_im), b_im);
      }
    }
    __syncwarp();  // the whole group read before any of it is overwritten
#pragma unroll
    for (int kt = 0; kt < kMaxTiles; ++kt) {
      if (kt >= tiles) continue;
      wmma::store_matrix_sync(z.re + base + kt * out_kt_step, acc_re[kt], out_ldm, wmma::mem_row_major);
      wmma::store_matrix_sync(z.im + base + kt * out_kt_step, acc_im[kt], out_ldm, wmma::mem_row_major);
    }
    __syncwarp();
    if (t_axis >= 0) {
      // The group's elements: n rows of 16 columns (stride > 1), or 16 rows of n (stride 1, contiguous).
      for (int e = lane; e < kTile * n; e += 32) {
        const int pos = stride > 1 ? base + (e / kTile) * stride + e % kTile : base + e;
        store(z, pos, twiddled(load(z, pos), plan, pos, t_axis, inverse));
      }
      __syncwarp();
    }
  }
  __syncthreads();
}

}  // namespace subq::monarch_dft_smem
