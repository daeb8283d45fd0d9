// The fused Monarch-DFT long convolution on CUDA, forward and backward, plain C++ API (raw device pointers, a CUDA
// stream; no framework types). One CTA per (batch, channel) row computes, with the row held in shared memory
// throughout,
//
//   v = pregate * u;   y = postgate * (irfft(rfft(v, M) * K, M)[:L] + D * v)
//
// the op of monarch_conv_cpu.h, where K = rfft(c, M) is the combined filter's spectrum (monarch_conv_filter) and
// M = fft_size(L). The real transforms are the half-size complex DFTs of monarch_dft.h in the same Monarch form:
// stages of small dense DFTs F_n (n <= 64) along the axes of the (n1, ..., nr) view of the M/2 complex values, with
// the same twiddle diagonals between them. The forward leaves the bins digit-reversed; the spectrum multiply works
// on them in place, and the inverse runs the transposed factorisation (the stages in reverse order, conjugated),
// which takes digit-reversed bins to natural order: no permutation pass, one M/2 complex64 buffer per CTA.
//
// The small DFTs run on tensor cores where an axis is a whole number of 16 x 16 tiles (n = 16 or 32, and the data it
// multiplies: every stage of the powers of two from M = 512, but two of three at M = 4096): WMMA TF32 products in
// 3xTF32 (float32 accuracy), with the row
// as real and imaginary planes so that each part of a tile is one matrix (monarch_dft_tensor_core.cuh). Other axes
// (odd factors, n = 48 or 64, the 8 in 2048 = 8 16 16) run as matrix-vector products on CUDA cores in float32. Both
// were written without a GPU at hand and are checked only by a Python transcription of their indexing; opt-in
// until verified on one (SUBQ_EXPERIMENTAL_CONV_KERNELS, csrc/torch/monarch_conv.cpp).
//
// The backward (monarch_conv_cpu.cpp's, by the same transforms) is two kernels. With g = postgate * dy:
//   rows    one CTA per (b, h) row, one M/2 buffer in shared memory used twice (so the backward takes every size
//           the forward takes): V = rfft(v), kept in the workspace row; conv(v) = irfft(V K) for
//           dpostgate = dy (conv(v) + D v); then G = rfft(g), the workspace row becomes G conj(V) (the filter
//           gradient's per-row spectrum), and dv = irfft(G conj(K))[:L] + D g (the adjoint of the convolution: the
//           correlation with the same filter) gives du = pregate dv and dpregate = u dv; sum_t g v, the row's share
//           of dD, goes to the workspace too.
//   filter  one CTA per channel h: the sum over b of the rows' spectra (in order: deterministic, no atomics), one
//           irfft to dc (H, M), read at the filter's taps: dk[j] = dc[j], dk_rev[j] = dc[M-1-j] (j < min(Lk, L-1),
//           zero beyond, as the combined filter places k_rev); and dD[h] = the sum over b of the rows' shares.
// A precomputed spectrum gets no gradient (as the composite: the filter kernel then only sums dD).
//
// Every function returns a Status and never throws.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cuda_runtime.h>

#include "common/dtype.h"
#include "common/status.h"

namespace subq {

constexpr int kMonarchConvMaxStages = 4;     // order r of the factorisation (monarch_dft.h: 2 to 4)
constexpr int kMonarchConvMaxFactor = 64;    // the largest small DFT

struct MonarchConvParams {
  DType dtype = DType::kFloat32;    // u, pregate, postgate, y
  int64_t batch = 0, heads = 0, seqlen = 0;  // B, H, L
  int64_t fft_size = 0;             // M = fft_size(L) (monarch_conv.h): even, M >= 2L
  // n1 .. nr of the length-M/2 complex DFT: monarch_factors(M / 2) (monarch_dft.h), the composite's factors (the
  // kernels take them in their own order). Their product must be M / 2, each in 2..64; r = 0 for M = 2.
  int num_factors = 0;
  int factors[kMonarchConvMaxStages] = {};

  const void* u = nullptr;          // (B, H, L), contiguous
  const void* pregate = nullptr;    // (B, H, L), contiguous; nullptr: none
  const void* postgate = nullptr;   // (B, H, L), contiguous; nullptr: none
  const float* D = nullptr;         // (H,); nullptr: no skip
  const float* filter_spectrum = nullptr;  // (H, M/2 + 1) complex64 as interleaved (re, im) float pairs
  void* y = nullptr;                // (B, H, L), contiguous, written
};

// Whether the kernel takes FFT size M on the current device: M/2 <= 16384 and the M/2 complex values plus the
// CUDA-core stages' roots within the device's opt-in shared memory per block
// (cudaDevAttrMaxSharedMemoryPerBlockOptin: M up to 32K on sm_80 / sm_90, up to 16K on sm_89). The tensor-core
// stages' matrices (at most 10 KB for powers of two) come on top where they fit; where they do not, those axes
// run on CUDA cores.
bool monarch_conv_fwd_supports(int64_t fft_size);

// kUnsupported where monarch_conv_fwd_supports is false (the caller takes its composite path);
// kInvalidArgument for inconsistent sizes, factors or missing pointers; B == 0 does nothing.
Status run_monarch_conv_fwd(const MonarchConvParams& params, cudaStream_t stream);

// The workspace the backward may ask for: B H (M/2 + 1) complex64 (the rows' product spectra, 8 B H (M/2 + 1)
// bytes) plus B H floats (the rows' shares of dD). 8 GiB holds B = 64, H = 768 at M = 32K (6.4 GB), the largest
// the kernel takes at the benchmark's shapes; beyond it the backward is kUnsupported (the caller's composite then
// runs, which needs several buffers of that size itself, so a call there is memory-bound either way) rather than
// make one surprising allocation.
constexpr size_t kMonarchConvBwdMaxWorkspace = size_t{8} << 30;

// The gradients of the forward above given dy; the backward takes the forward's params too (their y is not read).
struct MonarchConvGrads {
  const void* dy = nullptr;         // (B, H, L) in the params' dtype, contiguous
  // The filter's length Lk (1 <= Lk <= L) when the forward had k (and k_rev); 0 when it had a precomputed spectrum,
  // which gets no gradient (dk, dk_rev unused).
  int64_t filter_len = 0;
  // Each written, and non-null exactly where the forward's input is (dk: filter_len > 0; dk_rev: bidirectional k).
  void* du = nullptr;               // (B, H, L) in the params' dtype
  void* dpregate = nullptr;         // (B, H, L) in the params' dtype
  void* dpostgate = nullptr;        // (B, H, L) in the params' dtype
  float* dk = nullptr;              // (H, Lk)
  float* dk_rev = nullptr;          // (H, Lk)
  float* dD = nullptr;              // (H,)
  void* workspace = nullptr;        // monarch_conv_bwd_workspace_bytes(params, grads) bytes, 8-byte aligned
};

// The workspace run_monarch_conv_bwd needs for these sizes (see kMonarchConvBwdMaxWorkspace): it reads the
// params' sizes and D, and the grads' filter_len only.
size_t monarch_conv_bwd_workspace_bytes(const MonarchConvParams& params, const MonarchConvGrads& grads);

// Whether the backward takes these sizes on the current device: the forward's FFT sizes (the same one buffer in
// shared memory) and a workspace within kMonarchConvBwdMaxWorkspace.
bool monarch_conv_bwd_supports(const MonarchConvParams& params, const MonarchConvGrads& grads);

// kUnsupported where monarch_conv_bwd_supports is false; kInvalidArgument for inconsistent sizes, factors or
// pointers. B == 0 writes zero filter and dD gradients. Deterministic: no atomics.
Status run_monarch_conv_bwd(const MonarchConvParams& params, const MonarchConvGrads& grads, cudaStream_t stream);

}  // namespace subq
