// The CUDA device environment of the CPU emulator: force-included (-include) before every kernel source that
// csrc/emu/rewrite.py has rewritten for the host compiler. NVIDIA's own headers give the types (dim3, __half,
// __nv_bfloat16, the runtime API's declarations) and the bit-exact 16-bit conversions in host mode; this file then
// turns the CUDA keywords into plain C++ and defines the built-ins and intrinsics our kernels use. Each emulated
// thread is a fiber (emu_runtime.cpp); the intrinsics that need other threads (barriers, shuffles, WMMA) are
// collectives there. Nothing here is compiled by nvcc.
#pragma once

#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>

#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#undef __noinline__
#undef __launch_bounds__
#undef __restrict__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __restrict__ __restrict

namespace subq_emu {

// Where an intrinsic was called from: reports name the kernel's own source line (the rewrite keeps line numbers).
struct Site {
  const char* file;
  int line;
};
#define SUBQ_EMU_SITE_ARGS const char *emu_file = __builtin_FILE(), int emu_line = __builtin_LINE()
#define SUBQ_EMU_SITE ::subq_emu::Site{emu_file, emu_line}

// One emulated thread's built-in variables.
struct ThreadIndex {
  uint3 thread_idx;
  uint3 block_idx;
  dim3 block_dim;
  dim3 grid_dim;
};
extern thread_local const ThreadIndex* current_index;

// ---- collectives (emu_runtime.cpp) ----------------------------------------------------------------------------

// One lane's part in a warp collective. The last lane to arrive runs `complete` with every participating lane's
// record (nullptr for lanes outside the mask), on its own stack, while the others are suspended.
struct WarpCall {
  const char* kind;
  Site site;
  unsigned mask;
  bool same_site_required;  // shuffles and WMMA: every lane at the same call; __syncwarp: any __syncwarp
  void (*complete)(WarpCall* const lanes[32], const WarpCall& first);
};
void warp_collective(WarpCall& call);
void block_barrier(Site site);
// A finding of the emulator's own checks (synccheck, WMMA and launch rules), with kernel, block, thread and site.
void report(const char* check, Site site, const char* fmt, ...) __attribute__((format(printf, 3, 4)));

// ---- shared memory ------------------------------------------------------------------------------------------------

// The block's copy of one __shared__ declaration: an exactly sized allocation (so ASan bounds each array) filled
// with 0xFF (NaN in every float type, so a read of an unwritten element shows), made by the first thread that
// reaches the declaration. `key` tells declarations (and template instantiations) apart.
void* block_shared(const void* key, std::size_t bytes, std::size_t align, const char* name, Site site);
void* dynamic_shared(Site site);

template <typename T, std::size_t Align, typename Tag>
T& shared(const char* name, Tag, SUBQ_EMU_SITE_ARGS) {
  static const char key = 0;
  constexpr std::size_t align = Align > alignof(T) ? Align : alignof(T);
  return *static_cast<T*>(block_shared(&key, sizeof(T), align, name, SUBQ_EMU_SITE));
}

template <typename T>
T* dynamic_shared_as(SUBQ_EMU_SITE_ARGS) {
  return static_cast<T*>(dynamic_shared(SUBQ_EMU_SITE));
}

// ---- launches -------------------------------------------------------------------------------------------------

struct LaunchConfig {
  const char* kernel_name;
  const void* kernel;
  dim3 grid, block;
  std::size_t dynamic_smem;
  Site site;
};
// Runs every block of the grid; `thread_main(args)` is one thread's body.
void run_grid(const LaunchConfig& config, void (*thread_main)(void*), void* args);

// A launch: `call(args...)` is one thread's body, `call` the kernel's address or, for a function template whose
// arguments the call deduces, a lambda calling it (which leaves no address for cudaFuncSetAttribute to have named).
template <typename Call>
struct Launch {
  LaunchConfig config;
  Call call;
  template <typename... A>
  void operator()(A&&... a) const {
    struct Bound {
      Call call;
      std::tuple<std::decay_t<A>...> args;
      // Each thread gets its own copies of the parameters, as on the GPU.
      static void thread_main(void* self) {
        auto* bound = static_cast<Bound*>(self);
        std::apply([&](auto&... x) { bound->call(x...); }, bound->args);
      }
    } bound{call, std::tuple<std::decay_t<A>...>(std::forward<A>(a)...)};
    run_grid(config, &Bound::thread_main, &bound);
  }
};

template <typename... P>
Launch<void (*)(P...)> launch(const char* name, void (*kernel)(P...), dim3 grid, dim3 block, std::size_t smem = 0,
                              cudaStream_t = nullptr, SUBQ_EMU_SITE_ARGS) {
  return {LaunchConfig{name, reinterpret_cast<const void*>(kernel), grid, block, smem, SUBQ_EMU_SITE}, kernel};
}

template <typename Call>
Launch<Call> launch_by_call(const char* name, Call call, dim3 grid, dim3 block, std::size_t smem = 0,
                            cudaStream_t = nullptr, SUBQ_EMU_SITE_ARGS) {
  return {LaunchConfig{name, nullptr, grid, block, smem, SUBQ_EMU_SITE}, call};
}

// ---- shuffles -------------------------------------------------------------------------------------------------

enum class ShuffleMode { kIdx, kUp, kDown, kXor };
struct ShuffleCall {
  WarpCall call;
  ShuffleMode mode;
  int operand;
  int width;
  const void* in;
  void* out;
  std::size_t bytes;
};
void shuffle_complete(WarpCall* const lanes[32], const WarpCall& first);

template <typename T>
T shuffle(const char* kind, ShuffleMode mode, unsigned mask, T var, int operand, int width, Site site) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 16, "shuffle of an unsupported type");
  T out;
  ShuffleCall c{{kind, site, mask, true, &shuffle_complete}, mode, operand, width, &var, &out, sizeof(T)};
  warp_collective(c.call);
  return out;
}

}  // namespace subq_emu

#define threadIdx (::subq_emu::current_index->thread_idx)
#define blockIdx (::subq_emu::current_index->block_idx)
#define blockDim (::subq_emu::current_index->block_dim)
#define gridDim (::subq_emu::current_index->grid_dim)
constexpr int warpSize = 32;

inline void __syncthreads(SUBQ_EMU_SITE_ARGS) { ::subq_emu::block_barrier(SUBQ_EMU_SITE); }

inline void __syncwarp(unsigned mask = 0xffffffffu, SUBQ_EMU_SITE_ARGS) {
  ::subq_emu::WarpCall c{"__syncwarp", SUBQ_EMU_SITE, mask, false, nullptr};
  ::subq_emu::warp_collective(c);
}

template <typename T>
T __shfl_sync(unsigned mask, T var, int src_lane, int width = 32, SUBQ_EMU_SITE_ARGS) {
  return ::subq_emu::shuffle("__shfl_sync", ::subq_emu::ShuffleMode::kIdx, mask, var, src_lane, width,
                             SUBQ_EMU_SITE);
}
template <typename T>
T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = 32, SUBQ_EMU_SITE_ARGS) {
  return ::subq_emu::shuffle("__shfl_up_sync", ::subq_emu::ShuffleMode::kUp, mask, var, int(delta), width,
                             SUBQ_EMU_SITE);
}
template <typename T>
T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = 32, SUBQ_EMU_SITE_ARGS) {
  return ::subq_emu::shuffle("__shfl_down_sync", ::subq_emu::ShuffleMode::kDown, mask, var, int(delta), width,
                             SUBQ_EMU_SITE);
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = 32, SUBQ_EMU_SITE_ARGS) {
  return ::subq_emu::shuffle("__shfl_xor_sync", ::subq_emu::ShuffleMode::kXor, mask, var, lane_mask, width,
                             SUBQ_EMU_SITE);
}

// ---- atomics: relaxed, as CUDA's; visible to TSan as atomics -------------------------------------------------------

template <typename T>
T emu_atomic_add(T* address, T value) {
  if constexpr (std::is_integral_v<T>) {
    return __atomic_fetch_add(address, value, __ATOMIC_RELAXED);
  } else {
    using Bits = std::conditional_t<sizeof(T) == 8, std::uint64_t, std::uint32_t>;
    static_assert(sizeof(T) == sizeof(Bits), "atomicAdd of an unsupported type");
    Bits* bits = reinterpret_cast<Bits*>(address);
    Bits expected = __atomic_load_n(bits, __ATOMIC_RELAXED);
    for (;;) {
      T old;
      std::memcpy(&old, &expected, sizeof(T));
      const T sum = old + value;
      Bits desired;
      std::memcpy(&desired, &sum, sizeof(T));
      if (__atomic_compare_exchange_n(bits, &expected, desired, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) return old;
    }
  }
}
inline float atomicAdd(float* address, float value) { return emu_atomic_add(address, value); }
inline double atomicAdd(double* address, double value) { return emu_atomic_add(address, value); }
inline int atomicAdd(int* address, int value) { return emu_atomic_add(address, value); }
inline unsigned atomicAdd(unsigned* address, unsigned value) { return emu_atomic_add(address, value); }
inline unsigned long long atomicAdd(unsigned long long* address, unsigned long long value) {
  return emu_atomic_add(address, value);
}

// ---- device math the host library lacks ------------------------------------------------------------------------

inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float rsqrtf(float x) { return 1.f / std::sqrt(x); }
inline double rsqrt(double x) { return 1.0 / std::sqrt(x); }
inline float __frcp_rn(float x) { return 1.f / x; }
inline float __saturatef(float x) { return x < 0.f ? 0.f : (x > 1.f ? 1.f : x); }
template <typename To, typename From>
To emu_bit_cast(From v) {
  static_assert(sizeof(To) == sizeof(From), "bit cast between types of different sizes");
  To t;
  std::memcpy(&t, &v, sizeof t);
  return t;
}
inline float __int_as_float(int x) { return emu_bit_cast<float>(x); }
inline int __float_as_int(float x) { return emu_bit_cast<int>(x); }
inline unsigned __float_as_uint(float x) { return emu_bit_cast<unsigned>(x); }
inline float __uint_as_float(unsigned x) { return emu_bit_cast<float>(x); }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }
inline float __exp2f(float x) { return std::exp2(x); }
inline unsigned __umulhi(unsigned a, unsigned b) {
  return static_cast<unsigned>((static_cast<std::uint64_t>(a) * b) >> 32);
}
inline unsigned long long __umul64hi(unsigned long long a, unsigned long long b) {
  return static_cast<unsigned long long>((static_cast<unsigned __int128>(a) * b) >> 64);
}

// CUDA's global min / max overloads (integer and floating, mixed types by the usual conversions).
template <typename A, typename B, typename = std::enable_if_t<std::is_arithmetic_v<A> && std::is_arithmetic_v<B>>>
inline std::common_type_t<A, B> min(A a, B b) {
  using C = std::common_type_t<A, B>;
  if constexpr (std::is_floating_point_v<C>) return std::fmin(C(a), C(b));
  return C(b) < C(a) ? C(b) : C(a);
}
template <typename A, typename B, typename = std::enable_if_t<std::is_arithmetic_v<A> && std::is_arithmetic_v<B>>>
inline std::common_type_t<A, B> max(A a, B b) {
  using C = std::common_type_t<A, B>;
  if constexpr (std::is_floating_point_v<C>) return std::fmax(C(a), C(b));
  return C(a) < C(b) ? C(b) : C(a);
}

// sin(pi x) and cos(pi x), reduced exactly modulo 2 first and evaluated in a wider type.
inline void sincospif(float x, float* s, float* c) {
  const double r = std::fmod(static_cast<double>(x), 2.0) * 3.14159265358979323846;
  *s = static_cast<float>(std::sin(r));
  *c = static_cast<float>(std::cos(r));
}
inline void sincospi(double x, double* s, double* c) {
  const long double r = std::fmod(static_cast<long double>(x), 2.0L) * 3.141592653589793238462643383279502884L;
  *s = static_cast<double>(std::sin(r));
  *c = static_cast<double>(std::cos(r));
}
inline float sinpif(float x) {
  float s, c;
  sincospif(x, &s, &c);
  return s;
}
inline float cospif(float x) {
  float s, c;
  sincospif(x, &s, &c);
  return c;
}

// The runtime's typed cudaFuncSetAttribute (nvcc's cuda_runtime.h declares it only for device compilation).
template <typename... P>
cudaError_t cudaFuncSetAttribute(void (*kernel)(P...), cudaFuncAttribute attr, int value) {
  return ::cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel), attr, value);
}
