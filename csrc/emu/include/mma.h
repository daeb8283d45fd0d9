// nvcuda::wmma for the CPU emulator (found before CUDA's own <mma.h>, which is device-only): fragments, loads,
// stores and mma_sync for the shapes our kernels use (m16n16k16 f16/bf16, m16n16k8 tf32), each load, store and
// mma a warp collective that all 32 lanes must reach with the same pointer and ldm.
//
// CUDA leaves the per-lane layout of a fragment unspecified. Here each lane's elements come from a permutation of
// the tile that the schedule picks (emu_runtime.cpp: wmma_layout), different from the hardware's: code that only
// applies the same operation to every element gives the same result in every schedule, code that depends on which
// element a lane holds does not, and the emulated tests see the difference in every schedule.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "common/convert.cuh"
#include "emu_device.h"

namespace subq_emu {
// A permutation of [0, n): the logical (row-major) tile index of lane l's element e is layout[l * n / 32 + e], for
// fragments of kind `kind` (each use and layout its own).
const int* wmma_layout(int n, int kind);
bool wmma_check_pointer(const char* op, const WarpCall& first, const void* ptr, unsigned ldm, std::size_t element,
                        const void* const lane_ptrs[32], const unsigned lane_ldms[32]);
}  // namespace subq_emu

namespace nvcuda {
namespace wmma {

struct row_major;
struct col_major;
struct matrix_a;
struct matrix_b;
struct accumulator;
namespace precision {
struct tf32;
}
enum layout_t { mem_row_major, mem_col_major };

namespace detail {
template <typename T>
struct storage {
  using type = T;
};
template <>
struct storage<precision::tf32> {
  using type = float;
};
template <typename Use, int M, int N, int K>
struct shape;
template <int M, int N, int K>
struct shape<matrix_a, M, N, K> {
  static constexpr int rows = M, cols = K;
};
template <int M, int N, int K>
struct shape<matrix_b, M, N, K> {
  static constexpr int rows = K, cols = N;
};
template <int M, int N, int K>
struct shape<accumulator, M, N, K> {
  static constexpr int rows = M, cols = N;
};
using subq::from_float;
using subq::to_float;

// The tensor cores read the top 19 bits of a tf32 operand.
inline float tf32_truncate(float v) {
  std::uint32_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  bits &= 0xffffe000u;
  std::memcpy(&v, &bits, sizeof v);
  return v;
}
}  // namespace detail

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
class fragment {
 public:
  using element_type = T;
  using storage_element_type = typename detail::storage<T>::type;
  static constexpr int rows = detail::shape<Use, M, N, K>::rows;
  static constexpr int cols = detail::shape<Use, M, N, K>::cols;
  static constexpr int num_elements = rows * cols / 32;
  storage_element_type x[num_elements];
};

// cvt.rna.tf32.f32: round to nearest, ties away from zero, to 10 mantissa bits.
inline float __float_to_tf32(float v) {
  std::uint32_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  if ((bits & 0x7f800000u) != 0x7f800000u) bits = (bits + 0x1000u) & 0xffffe000u;
  std::memcpy(&v, &bits, sizeof v);
  return v;
}

template <typename Use, int M, int N, int K, typename T, typename Layout>
inline void fill_fragment(fragment<Use, M, N, K, T, Layout>& f, const typename fragment<Use, M, N, K, T, Layout>::storage_element_type& v) {
  for (int i = 0; i < f.num_elements; ++i) f.x[i] = v;
}

namespace detail {

// Which layout table a fragment type's elements follow (csrc/emu/emu_runtime.cpp: wmma_layout).
template <typename Frag>
struct fragment_kind;
template <typename Use, int M, int N, int K, typename T, typename Layout>
struct fragment_kind<fragment<Use, M, N, K, T, Layout>> {
  static constexpr int value = (std::is_same_v<Use, matrix_a> ? 0 : std::is_same_v<Use, matrix_b> ? 2 : 4) +
                               (std::is_same_v<Layout, col_major> ? 1 : 0);
};
template <typename Frag>
const int* layout_of() {
  return subq_emu::wmma_layout(Frag::rows * Frag::cols, fragment_kind<std::remove_const_t<Frag>>::value);
}

template <typename Frag, typename Mem>
struct MemoryCall {
  subq_emu::WarpCall call;
  Frag* frag;
  Mem* ptr;
  unsigned ldm;
  bool row_major;

  // The lanes' pointers and ldm agree and are aligned as WMMA requires; then every lane's elements move.
  template <bool kLoad>
  static void complete(subq_emu::WarpCall* const lanes[32], const subq_emu::WarpCall& first_call) {
    const auto& first = reinterpret_cast<const MemoryCall&>(first_call);
    const void* lane_ptrs[32];
    unsigned lane_ldms[32];
    for (int l = 0; l < 32; ++l) {
      const auto* c = reinterpret_cast<const MemoryCall*>(lanes[l]);
      lane_ptrs[l] = c ? static_cast<const void*>(c->ptr) : nullptr;
      lane_ldms[l] = c ? c->ldm : 0;
    }
    if (!subq_emu::wmma_check_pointer(kLoad ? "load_matrix_sync" : "store_matrix_sync", first_call, first.ptr,
                                      first.ldm, sizeof(Mem), lane_ptrs, lane_ldms)) {
      return;
    }
    constexpr int kRows = Frag::rows, kCols = Frag::cols, kPer = Frag::num_elements;
    const int* layout = layout_of<Frag>();
    for (int l = 0; l < 32; ++l) {
      auto* c = reinterpret_cast<MemoryCall*>(lanes[l]);
      for (int e = 0; e < kPer; ++e) {
        const int flat = layout[l * kPer + e], r = flat / kCols, col = flat % kCols;
        const std::size_t offset = first.row_major ? std::size_t(r) * first.ldm + col : std::size_t(col) * first.ldm + r;
        if constexpr (kLoad) {
          c->frag->x[e] = static_cast<typename Frag::storage_element_type>(first.ptr[offset]);
        } else {
          first.ptr[offset] = c->frag->x[e];
        }
      }
    }
  }
};

template <typename Frag, typename Mem, bool kLoad>
void memory_collective(const char* kind, Frag& frag, Mem* ptr, unsigned ldm, bool row_major, subq_emu::Site site) {
  using Call = MemoryCall<Frag, Mem>;
  Call call{{kind, site, 0xffffffffu, true, &Call::template complete<kLoad>}, &frag, ptr, ldm, row_major};
  subq_emu::warp_collective(call.call);
}

template <typename Use, typename Layout>
constexpr bool operand_row_major() {
  static_assert(std::is_same_v<Layout, row_major> || std::is_same_v<Layout, col_major>,
                "matrix_a / matrix_b fragments need row_major or col_major");
  return std::is_same_v<Layout, row_major>;
}

}  // namespace detail

template <typename Use, int M, int N, int K, typename T, typename Layout, typename Mem>
void load_matrix_sync(fragment<Use, M, N, K, T, Layout>& a, const Mem* p, unsigned ldm, SUBQ_EMU_SITE_ARGS) {
  detail::memory_collective<fragment<Use, M, N, K, T, Layout>, const Mem, true>(
      "wmma::load_matrix_sync", a, p, ldm, detail::operand_row_major<Use, Layout>(), SUBQ_EMU_SITE);
}

template <int M, int N, int K, typename T, typename Mem>
void load_matrix_sync(fragment<accumulator, M, N, K, T>& a, const Mem* p, unsigned ldm, layout_t layout,
                      SUBQ_EMU_SITE_ARGS) {
  detail::memory_collective<fragment<accumulator, M, N, K, T>, const Mem, true>(
      "wmma::load_matrix_sync", a, p, ldm, layout == mem_row_major, SUBQ_EMU_SITE);
}

template <int M, int N, int K, typename T, typename Mem>
void store_matrix_sync(Mem* p, const fragment<accumulator, M, N, K, T>& a, unsigned ldm, layout_t layout,
                       SUBQ_EMU_SITE_ARGS) {
  using Frag = fragment<accumulator, M, N, K, T>;
  detail::memory_collective<Frag, Mem, false>("wmma::store_matrix_sync", const_cast<Frag&>(a), p, ldm,
                                              layout == mem_row_major, SUBQ_EMU_SITE);
}

namespace detail {

template <typename FD, typename FA, typename FB, typename FC>
struct MmaCall {
  subq_emu::WarpCall call;
  FD* d;
  const FA* a;
  const FB* b;
  const FC* c;

  template <typename Frag>
  static void gather(subq_emu::WarpCall* const lanes[32], const Frag* MmaCall::*member, float* tile) {
    constexpr int kPer = Frag::num_elements;
    const int* layout = layout_of<Frag>();
    for (int l = 0; l < 32; ++l) {
      const Frag* f = reinterpret_cast<const MmaCall*>(lanes[l])->*member;
      for (int e = 0; e < kPer; ++e) {
        float v = to_float(f->x[e]);
        if constexpr (std::is_same_v<typename Frag::element_type, precision::tf32>) v = tf32_truncate(v);
        tile[layout[l * kPer + e]] = v;
      }
    }
  }

  static void complete(subq_emu::WarpCall* const lanes[32], const subq_emu::WarpCall&) {
    constexpr int kM = FA::rows, kK = FA::cols, kN = FB::cols;
    float a[kM * kK], b[kK * kN], c[kM * kN];
    gather(lanes, &MmaCall::a, a);
    gather(lanes, &MmaCall::b, b);
    gather(lanes, &MmaCall::c, c);
    float d[kM * kN];
    for (int i = 0; i < kM; ++i) {
      for (int j = 0; j < kN; ++j) {
        float acc = c[i * kN + j];
        for (int k = 0; k < kK; ++k) acc += a[i * kK + k] * b[k * kN + j];
        d[i * kN + j] = acc;
      }
    }
    constexpr int kPer = FD::num_elements;
    const int* layout = layout_of<FD>();
    for (int l = 0; l < 32; ++l) {
      FD* f = reinterpret_cast<MmaCall*>(lanes[l])->d;
      for (int e = 0; e < kPer; ++e) {
        f->x[e] = from_float<typename FD::storage_element_type>(d[layout[l * kPer + e]]);
      }
    }
  }
};

}  // namespace detail

template <int M, int N, int K, typename TA, typename LA, typename TB, typename LB, typename TD, typename TC>
void mma_sync(fragment<accumulator, M, N, K, TD>& d, const fragment<matrix_a, M, N, K, TA, LA>& a,
              const fragment<matrix_b, M, N, K, TB, LB>& b, const fragment<accumulator, M, N, K, TC>& c,
              SUBQ_EMU_SITE_ARGS) {
  using Call = detail::MmaCall<fragment<accumulator, M, N, K, TD>, fragment<matrix_a, M, N, K, TA, LA>,
                               fragment<matrix_b, M, N, K, TB, LB>, fragment<accumulator, M, N, K, TC>>;
  Call call{{"wmma::mma_sync", SUBQ_EMU_SITE, 0xffffffffu, true, &Call::complete}, &d, &a, &b, &c};
  subq_emu::warp_collective(call.call);
}

}  // namespace wmma
}  // namespace nvcuda
