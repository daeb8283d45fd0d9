// The CPU emulator's runtime: every block of a launch runs its threads as fibers on one OS thread (blocks are
// shared out over SUBQ_EMU_WORKERS threads), switched only at barriers, warp collectives and exit. It checks what
// compute-sanitizer's synccheck and the launch rules check, and tells ASan and TSan about the fibers so that they
// see shared-memory races between barriers and races between blocks (ordering edges only at barriers, warp
// collectives and launch boundaries). It also implements the CUDA runtime calls our cores make, on host memory.
//
// Compiled without -fsanitize=thread (its bookkeeping is shared by all fibers of a block), with
// -fsanitize=address under ASan. Schedules: SUBQ_EMU_SCHEDULE=forward|reverse|random, SUBQ_EMU_SEED, and
// SUBQ_EMU_ARCH=80|89|90 for the device limits (read at each launch).
#include "emu_device.h"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

// Sanitizer fiber interfaces, weak so the plain build runs without the sanitizer runtimes.
extern "C" {
void __sanitizer_start_switch_fiber(void** fake_stack_save, const void* bottom, std::size_t size)
    __attribute__((weak));
void __sanitizer_finish_switch_fiber(void* fake_stack_save, const void** bottom_old, std::size_t* size_old)
    __attribute__((weak));
void __asan_unpoison_memory_region(const volatile void* addr, std::size_t size) __attribute__((weak));
void* __tsan_get_current_fiber() __attribute__((weak));
void* __tsan_create_fiber(unsigned flags) __attribute__((weak));
void __tsan_destroy_fiber(void* fiber) __attribute__((weak));
void __tsan_switch_to_fiber(void* fiber, unsigned flags) __attribute__((weak));
void __tsan_set_fiber_name(void* fiber, const char* name) __attribute__((weak));
void __tsan_acquire(void* addr) __attribute__((weak));
void __sanitizer_set_death_callback(void (*callback)()) __attribute__((weak));
void __tsan_release(void* addr) __attribute__((weak));
void __tsan_ignore_thread_begin() __attribute__((weak));
void __tsan_ignore_thread_end() __attribute__((weak));
void AnnotateIgnoreSyncBegin(const char* file, int line) __attribute__((weak));
void AnnotateIgnoreSyncEnd(const char* file, int line) __attribute__((weak));
}

// Saves the callee-saved registers on the current stack, stores its pointer in *save and continues on `load`.
extern "C" void subq_emu_switch(void** save, void* load);
asm(R"(
  .text
  .globl subq_emu_switch
  .type subq_emu_switch, @function
subq_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size subq_emu_switch, .-subq_emu_switch
  .section .note.GNU-stack,"",@progbits
  .text
)");

namespace subq_emu {

thread_local const ThreadIndex* current_index = nullptr;

namespace {

bool under_tsan() { return __tsan_create_fiber != nullptr; }
void tsan_acquire(void* a) {
  if (__tsan_acquire) __tsan_acquire(a);
}
void tsan_release(void* a) {
  if (__tsan_release) __tsan_release(a);
}

// ---- configuration --------------------------------------------------------------------------------------------

enum class Order { kForward, kReverse, kRandom };

struct Config {
  Order order = Order::kForward;
  std::uint64_t seed = 1;
  int workers = 1;
  int arch = 90;
};

Config read_config() {
  Config c;
  if (const char* s = std::getenv("SUBQ_EMU_SCHEDULE")) {
    const std::string v = s;
    c.order = v == "reverse" ? Order::kReverse : v == "random" ? Order::kRandom : Order::kForward;
  }
  if (const char* s = std::getenv("SUBQ_EMU_SEED")) c.seed = std::strtoull(s, nullptr, 10);
  if (const char* s = std::getenv("SUBQ_EMU_WORKERS")) c.workers = std::max(1, std::atoi(s));
  if (const char* s = std::getenv("SUBQ_EMU_ARCH")) c.arch = std::atoi(s);
  return c;
}

std::size_t smem_optin_limit(int arch) {  // cudaDevAttrMaxSharedMemoryPerBlockOptin
  switch (arch) {
    case 80: return 163 * 1024;
    case 89: return 99 * 1024;
    default: return 227 * 1024;
  }
}
constexpr std::size_t kStaticSmemLimit = 48 * 1024;
// Finished blocks' TSan fibers kept alive, shared out over the workers (run_block). TSan allows 8k threads in all,
// and each worker runs a block of up to 1024 more.
constexpr std::size_t kRetiredFibers = 2048;

// ---- reports --------------------------------------------------------------------------------------------------

std::mutex report_mutex;
std::vector<std::string> reports;
thread_local std::string last_error_message;
thread_local cudaError_t last_error = cudaSuccess;

std::vector<std::string> launched;  // "kernel at file:line" since the last take_launches(): what ran, from where
std::map<const void*, int> max_dynamic_smem;  // cudaFuncAttributeMaxDynamicSharedMemorySize per kernel
std::mutex attribute_mutex;

// ---- fibers and blocks ----------------------------------------------------------------------------------------

enum class FiberState { kRunnable, kBarrier, kWarp, kExited };

struct Fiber {
  void* sp = nullptr;
  char* stack = nullptr;
  std::size_t stack_size = 0;
  bool stack_mapped = false;
  FiberState state = FiberState::kRunnable;
  ThreadIndex index{};
  int linear = 0;
  WarpCall* pending = nullptr;
  void* tsan_fiber = nullptr;
  void* fake_stack = nullptr;
};

struct SharedAllocation {
  const void* key;
  void* ptr;
};

struct Block;

struct Worker {
  void* scheduler_sp = nullptr;
  void* scheduler_fake_stack = nullptr;
  const void* native_bottom = nullptr;
  std::size_t native_size = 0;
  void* tsan_native = nullptr;
  void* tsan_teardown = nullptr;  // the TSan context that frees finished blocks (run_block)
  std::vector<void*> retired;     // TSan fibers of finished blocks, destroyed late (run_block)
  std::vector<Fiber> fibers;
  Block* block = nullptr;
  int current = -1;
};
thread_local Worker* worker = nullptr;

struct GridRun {
  const LaunchConfig* config;
  void (*thread_main)(void*);
  void* args;
  Config settings;
  int threads;
  // TSan: host -> every block at the start, every block -> host at the end. Two objects, so that no block is
  // ordered after another one that ended before it started.
  char* launch_start;
  char* launch_end;
  std::atomic<bool> failed{false};
  std::atomic<bool> static_limit_reported{false};
};

struct Block {
  GridRun* launch;
  uint3 block_idx;
  int threads;
  int exited = 0;
  int barrier_arrived = 0;
  Site barrier_site{nullptr, 0};
  Site barrier_other_site{nullptr, 0};
  bool abandoned = false;
  std::vector<SharedAllocation> shared;
  std::size_t static_bytes = 0;
  void* dynamic = nullptr;
  char* sync;  // TSan sync objects: [0] the block barrier, [1 + w] warp w; fresh per block
};

Fiber& current_fiber() { return worker->fibers[worker->current]; }

std::string where(Site site) {
  std::string s = site.file ? site.file : "?";
  return s + ":" + std::to_string(site.line);
}

std::string context() {
  if (!worker || !worker->block) return "";
  const Block& b = *worker->block;
  char buf[320];
  if (worker->current >= 0) {
    const uint3 t = worker->fibers[worker->current].index.thread_idx;
    std::snprintf(buf, sizeof buf, " [kernel %s, block (%u,%u,%u), thread (%u,%u,%u)]", b.launch->config->kernel_name,
                  b.block_idx.x, b.block_idx.y, b.block_idx.z, t.x, t.y, t.z);
  } else {
    std::snprintf(buf, sizeof buf, " [kernel %s, block (%u,%u,%u)]", b.launch->config->kernel_name, b.block_idx.x,
                  b.block_idx.y, b.block_idx.z);
  }
  return buf;
}

void add_report(const std::string& message) {
  {
    const std::lock_guard<std::mutex> lock(report_mutex);
    if (reports.size() < 1000) reports.push_back(message);
  }
  std::fprintf(stderr, "%s\n", message.c_str());
  if (worker && worker->block) worker->block->launch->failed = true;
  const char* abort_flag = std::getenv("SUBQ_EMU_ABORT_ON_REPORT");
  if (abort_flag && std::string(abort_flag) == "1") std::abort();
}

}  // namespace

void report(const char* check, Site site, const char* fmt, ...) {
  char buf[1024];
  va_list ap;
  va_start(ap, fmt);
  std::vsnprintf(buf, sizeof buf, fmt, ap);
  va_end(ap);
  add_report(std::string("subq-emu ") + check + ": " + buf + " at " + where(site) + context());
}

namespace {


// ---- switching ------------------------------------------------------------------------------------------------

[[noreturn]] void fiber_entry();

void switch_to_fiber(int i) {
  Worker& w = *worker;
  Fiber& f = w.fibers[i];
  w.current = i;
  current_index = &f.index;
  if (__tsan_switch_to_fiber) __tsan_switch_to_fiber(f.tsan_fiber, 1 /* __tsan_switch_to_fiber_no_sync */);
  if (__sanitizer_start_switch_fiber) __sanitizer_start_switch_fiber(&w.scheduler_fake_stack, f.stack, f.stack_size);
  subq_emu_switch(&w.scheduler_sp, f.sp);
  if (__sanitizer_finish_switch_fiber) __sanitizer_finish_switch_fiber(w.scheduler_fake_stack, nullptr, nullptr);
  w.current = -1;
  current_index = nullptr;
}

// From a fiber back to its worker's scheduler; returns when the scheduler resumes this fiber.
void suspend(bool exiting) {
  Worker& w = *worker;
  Fiber& f = current_fiber();
  if (__tsan_switch_to_fiber) __tsan_switch_to_fiber(w.tsan_native, 1);
  if (__sanitizer_start_switch_fiber) {
    __sanitizer_start_switch_fiber(exiting ? nullptr : &f.fake_stack, w.native_bottom, w.native_size);
  }
  subq_emu_switch(&f.sp, w.scheduler_sp);
  if (__sanitizer_finish_switch_fiber) __sanitizer_finish_switch_fiber(f.fake_stack, nullptr, nullptr);
}

void prepare_stack(Fiber& f, std::size_t size) {
  if (under_tsan()) {
    // TSan would see a reused stack's old accesses as racing with the new fiber's: fresh memory each block.
    f.stack = static_cast<char*>(std::malloc(size));
    f.stack_size = size;
  } else if (!f.stack) {
    const std::size_t page = static_cast<std::size_t>(sysconf(_SC_PAGESIZE));
    void* m = mmap(nullptr, size + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (m == MAP_FAILED) std::abort();
    mprotect(m, page, PROT_NONE);  // a guard page: a stack overflow faults instead of corrupting a neighbour
    f.stack = static_cast<char*>(m) + page;
    f.stack_size = size;
    f.stack_mapped = true;
  }
  if (__asan_unpoison_memory_region) __asan_unpoison_memory_region(f.stack, f.stack_size);
  auto top = reinterpret_cast<std::uintptr_t>(f.stack + f.stack_size) & ~std::uintptr_t(15);
  void** sp = reinterpret_cast<void**>(top - 64);
  for (int r = 0; r < 6; ++r) sp[r] = nullptr;          // r15 r14 r13 r12 rbx rbp
  sp[6] = reinterpret_cast<void*>(&fiber_entry);      // subq_emu_switch's ret
  sp[7] = nullptr;
  f.sp = sp;
}

// ---- block-level checks ---------------------------------------------------------------------------------------

void abandon(Block& b) { b.abandoned = true; }

// TSan: `f` acquires `sync` now, at the barrier's or collective's completion, although it runs later. Were it to
// acquire when resumed, the threads resumed before it would already have run on and released their next stretch's
// accesses into `sync`, which would order them before f's: every race inside a block after its first barrier would
// be hidden. Ends in the calling fiber's own TSan context.
void acquire_as(Fiber& f, void* sync) {
  if (!__tsan_switch_to_fiber || !f.tsan_fiber) return;
  Fiber& self = current_fiber();
  if (&f != &self) __tsan_switch_to_fiber(f.tsan_fiber, 1);
  __tsan_acquire(sync);
  if (&f != &self) __tsan_switch_to_fiber(self.tsan_fiber, 1);
}

void release_barrier(Block& b, Site site) {
  if (b.exited > 0) {
    report("synccheck", site,
                "__syncthreads reached by part of the block: %d of %d threads (the others had exited)",
                b.threads - b.exited, b.threads);
  }
  if (b.barrier_other_site.file) {
    report("synccheck", site, "threads of one block wait at different __syncthreads: %s and %s",
                where(b.barrier_site).c_str(), where(b.barrier_other_site).c_str());
  }
  b.barrier_arrived = 0;
  b.barrier_site = b.barrier_other_site = Site{nullptr, 0};
  for (int i = 0; i < b.threads; ++i) {
    Fiber& f = worker->fibers[i];
    if (f.state != FiberState::kBarrier) continue;
    f.state = FiberState::kRunnable;
    acquire_as(f, b.sync);  // the last thread to arrive included
  }
}

bool same_site(Site a, Site b) { return a.line == b.line && a.file && b.file && std::strcmp(a.file, b.file) == 0; }

// The linear index of the calling thread's warp's lane 0.
int warp_base() { return current_fiber().linear & ~31; }

// Completes the warp collective of the lanes in `call`'s mask when every one of them has arrived.
void try_complete(Block& b, int base, WarpCall& call) {
  WarpCall* lanes[32] = {};
  for (int l = 0; l < 32; ++l) {
    if (!(call.mask >> l & 1u)) continue;
    if (base + l >= b.threads) {
      report("synccheck", call.site, "%s names lane %d, which this block (%d threads) does not have", call.kind,
                  l, b.threads);
      abandon(b);
      return;
    }
    Fiber& f = worker->fibers[base + l];
    if (f.state == FiberState::kExited) {
      report("synccheck", call.site, "%s names lane %d, which has exited", call.kind, l);
      abandon(b);
      return;
    }
    if (f.state != FiberState::kWarp) return;  // not there yet
    lanes[l] = f.pending;
  }
  for (int l = 0; l < 32; ++l) {
    if (!lanes[l]) continue;
    const WarpCall& o = *lanes[l];
    const bool same_op = std::strcmp(o.kind, call.kind) == 0 && o.mask == call.mask;
    if (!same_op || (call.same_site_required && !same_site(o.site, call.site))) {
      report("synccheck", call.site,
                  "diverged warp: lane %d is at %s (mask 0x%08x) at %s while this lane is at %s (mask 0x%08x)", l,
                  o.kind, o.mask, where(o.site).c_str(), call.kind, call.mask);
      abandon(b);
      return;
    }
  }
  char* sync = b.sync + 1 + base / 32;
  tsan_acquire(sync);
  if (call.complete) call.complete(lanes, call);
  tsan_release(sync);
  for (int l = 0; l < 32; ++l) {
    if (!lanes[l]) continue;
    Fiber& f = worker->fibers[base + l];
    f.pending = nullptr;
    f.state = FiberState::kRunnable;
    acquire_as(f, sync);
  }
}

void check_exit_against_pending(Block& b, Fiber& f) {
  const int base = f.linear & ~31, lane = f.linear & 31;
  for (int l = 0; l < 32 && base + l < b.threads; ++l) {
    Fiber& o = worker->fibers[base + l];
    if (o.state == FiberState::kWarp && (o.pending->mask >> lane & 1u)) {
      report("synccheck", o.pending->site, "%s (mask 0x%08x) waits for lane %d, which exited", o.pending->kind,
                  o.pending->mask, lane);
      abandon(b);
      return;
    }
  }
  if (b.barrier_arrived > 0 && b.barrier_arrived + b.exited == b.threads) release_barrier(b, b.barrier_site);
}

[[noreturn]] void fiber_entry() {
  Worker& w = *worker;
  if (__sanitizer_finish_switch_fiber) {
    __sanitizer_finish_switch_fiber(nullptr, &w.native_bottom, &w.native_size);
  }
  Block& b = *w.block;
  tsan_acquire(b.launch->launch_start);
  b.launch->thread_main(b.launch->args);
  tsan_release(b.launch->launch_end);
  tsan_release(b.sync);  // the block's memory is freed after this
  Fiber& f = current_fiber();
  f.state = FiberState::kExited;
  ++b.exited;
  check_exit_against_pending(b, f);
  suspend(true);
  std::abort();  // an exited fiber is never resumed
}

void describe_deadlock(Block& b) {
  std::string waiting;
  int at_barrier = 0;
  for (int i = 0; i < b.threads; ++i) {
    const Fiber& f = worker->fibers[i];
    if (f.state == FiberState::kBarrier) ++at_barrier;
  }
  if (at_barrier) waiting += std::to_string(at_barrier) + " thread(s) at __syncthreads (" + where(b.barrier_site) + ")";
  for (int i = 0; i < b.threads; ++i) {
    const Fiber& f = worker->fibers[i];
    if (f.state != FiberState::kWarp) continue;
    char buf[256];
    std::snprintf(buf, sizeof buf, "%sthread %d at %s (mask 0x%08x, %s)", waiting.empty() ? "" : "; ", i,
                  f.pending->kind, f.pending->mask, where(f.pending->site).c_str());
    waiting += buf;
    if (waiting.size() > 600) {
      waiting += "; ...";
      break;
    }
  }
  report("synccheck", b.barrier_site.file ? b.barrier_site : Site{"?", 0},
              "deadlock: no thread can go on (%d exited): %s", b.exited, waiting.c_str());
}

std::vector<int> thread_order(int n, Order order, std::mt19937_64& rng) {
  std::vector<int> v(n);
  for (int i = 0; i < n; ++i) v[i] = order == Order::kReverse ? n - 1 - i : i;
  if (order == Order::kRandom) std::shuffle(v.begin(), v.end(), rng);
  return v;
}

void run_block(GridRun& launch, std::uint64_t linear_block) {
  Worker& w = *worker;
  const LaunchConfig& cfg = *launch.config;
  Block b;
  b.launch = &launch;
  b.threads = launch.threads;
  b.block_idx = uint3{static_cast<unsigned>(linear_block % cfg.grid.x),
                      static_cast<unsigned>(linear_block / cfg.grid.x % cfg.grid.y),
                      static_cast<unsigned>(linear_block / (std::uint64_t(cfg.grid.x) * cfg.grid.y))};
  b.sync = static_cast<char*>(std::malloc(2 + b.threads / 32));
  if (cfg.dynamic_smem > 0) {
    void* p = nullptr;
    if (posix_memalign(&p, 128, cfg.dynamic_smem) != 0) std::abort();
    std::memset(p, 0xFF, cfg.dynamic_smem);  // before the block's fibers are created, which orders it before them
    b.dynamic = p;
  }
  w.block = &b;
  const std::size_t stack = under_tsan() ? 128 * 1024 : 256 * 1024;
  if (w.fibers.size() < static_cast<std::size_t>(b.threads)) w.fibers.resize(b.threads);
  for (int i = 0; i < b.threads; ++i) {
    Fiber& f = w.fibers[i];
    prepare_stack(f, stack);
    f.state = FiberState::kRunnable;
    f.pending = nullptr;
    f.fake_stack = nullptr;
    f.linear = i;
    f.index.thread_idx = uint3{static_cast<unsigned>(i % cfg.block.x), static_cast<unsigned>(i / cfg.block.x % cfg.block.y),
                               static_cast<unsigned>(i / (cfg.block.x * cfg.block.y))};
    f.index.block_idx = b.block_idx;
    f.index.block_dim = cfg.block;
    f.index.grid_dim = cfg.grid;
    if (under_tsan()) {
      f.tsan_fiber = __tsan_create_fiber(0);
      if (__tsan_set_fiber_name) {
        // Block and thread first: TSan's reports cut a thread's name at 64 characters.
        static thread_local char name[160];
        std::snprintf(name, sizeof name, "block (%u,%u,%u) thread (%u,%u,%u) of %s", b.block_idx.x, b.block_idx.y,
                      b.block_idx.z, f.index.thread_idx.x, f.index.thread_idx.y, f.index.thread_idx.z, cfg.kernel_name);
        __tsan_set_fiber_name(f.tsan_fiber, name);
      }
    }
  }
  std::mt19937_64 rng(launch.settings.seed * 0x9E3779B97F4A7C15ull + linear_block);
  while (!b.abandoned && b.exited < b.threads) {
    bool ran = false;
    for (int i : thread_order(b.threads, launch.settings.order, rng)) {
      if (b.abandoned) break;
      if (w.fibers[i].state != FiberState::kRunnable) continue;
      switch_to_fiber(i);
      ran = true;
    }
    if (!ran && !b.abandoned && b.exited < b.threads) {
      describe_deadlock(b);
      abandon(b);
    }
  }
  // The block's memory is freed in a TSan context of its own that has seen the block's accesses. Were it the
  // scheduler's, every later block's threads (which the scheduler creates) would be ordered after this block, and
  // TSan would miss the races between blocks that happen to run one after the other.
  if (__tsan_switch_to_fiber) __tsan_switch_to_fiber(w.tsan_teardown, 1);
  tsan_acquire(b.sync);
  for (int i = 0; i < b.threads; ++i) {
    Fiber& f = w.fibers[i];
    if (f.tsan_fiber) {
      w.retired.push_back(f.tsan_fiber);
      f.tsan_fiber = nullptr;
    }
    if (!f.stack_mapped) {
      std::free(f.stack);
      f.stack = nullptr;
    }
  }
  if (b.static_bytes + cfg.dynamic_smem > smem_optin_limit(launch.settings.arch)) {
    report("launch", cfg.site, "%zu bytes of shared memory per block (%zu static + %zu dynamic) exceed sm_%d's %zu",
                b.static_bytes + cfg.dynamic_smem, b.static_bytes, cfg.dynamic_smem, launch.settings.arch,
                smem_optin_limit(launch.settings.arch));
  }
  for (auto& s : b.shared) std::free(s.ptr);
  std::free(b.dynamic);
  std::free(b.sync);
  // TSan gives a new thread the id of a destroyed one, and with the id that thread's accesses as its own: a block's
  // fibers live on while later ones finish, so that blocks run close together stay unordered.
  const std::size_t keep = kRetiredFibers / static_cast<std::size_t>(launch.settings.workers);
  if (w.retired.size() > keep) {
    const auto oldest = w.retired.begin() + static_cast<std::ptrdiff_t>(w.retired.size() - keep);
    for (auto it = w.retired.begin(); it != oldest; ++it) __tsan_destroy_fiber(*it);
    w.retired.erase(w.retired.begin(), oldest);
  }
  if (__tsan_switch_to_fiber) __tsan_switch_to_fiber(w.tsan_native, 1);
  w.block = nullptr;
}

void run_worker(GridRun& launch, const std::vector<std::uint64_t>& order, std::atomic<std::size_t>& next) {
  Worker w;
  Worker* saved = worker;
  worker = &w;
  if (under_tsan()) {
    w.tsan_native = __tsan_get_current_fiber();
    w.tsan_teardown = __tsan_create_fiber(0);
  }
  for (std::size_t i = next++; i < order.size(); i = next++) run_block(launch, order[i]);
  for (Fiber& f : w.fibers) {
    if (f.stack_mapped) munmap(f.stack - sysconf(_SC_PAGESIZE), f.stack_size + sysconf(_SC_PAGESIZE));
  }
  if (w.tsan_teardown) {
    // The threads read their indices from w.fibers, and `retired` grew in this context: freed, like the blocks'
    // memory, where the blocks were seen to end.
    __tsan_switch_to_fiber(w.tsan_teardown, 1);
    std::vector<Fiber>().swap(w.fibers);
    for (void* f : w.retired) __tsan_destroy_fiber(f);
    std::vector<void*>().swap(w.retired);
    __tsan_switch_to_fiber(w.tsan_native, 1);
    __tsan_destroy_fiber(w.tsan_teardown);
  }
  worker = saved;
}

// ASan and UBSan (halting) name the source line; this names the emulated kernel, block and thread it ran in.
void print_context_at_death() {
  const std::string where_now = context();
  if (!where_now.empty()) std::fprintf(stderr, "subq-emu: the error above happened in%s\n", where_now.c_str());
}

void fail_launch(cudaError_t error, const std::string& message) {
  last_error = error;
  last_error_message = message;
  add_report(message);
}

}  // namespace


void block_barrier(Site site) {
  Block& b = *worker->block;
  Fiber& f = current_fiber();
  if (b.barrier_arrived == 0) {
    b.barrier_site = site;
  } else if (!same_site(site, b.barrier_site) && !b.barrier_other_site.file) {
    b.barrier_other_site = site;
  }
  tsan_release(b.sync);
  ++b.barrier_arrived;
  f.state = FiberState::kBarrier;
  if (b.barrier_arrived + b.exited == b.threads) {
    release_barrier(b, site);
  } else {
    suspend(false);  // release_barrier acquired b.sync for this thread
  }
}

void warp_collective(WarpCall& call) {
  Block& b = *worker->block;
  Fiber& f = current_fiber();
  const int lane = f.linear & 31;
  if (!(call.mask >> lane & 1u)) {
    report("synccheck", call.site, "%s called by lane %d, which its mask 0x%08x leaves out", call.kind, lane,
                call.mask);
  }
  f.pending = &call;
  f.state = FiberState::kWarp;
  tsan_release(b.sync + 1 + f.linear / 32);
  try_complete(b, warp_base(), call);
  if (f.state == FiberState::kWarp) suspend(false);  // try_complete acquired the warp's sync for this lane
}

void* block_shared(const void* key, std::size_t bytes, std::size_t align, const char* name, Site site) {
  Block& b = *worker->block;
  for (const SharedAllocation& s : b.shared) {
    if (s.key == key) return s.ptr;
  }
  // The array exists before any thread of the block runs: to TSan, neither the allocation, nor the fill, nor the
  // block's bookkeeping is an access of the thread that happens to declare it first (nothing orders that thread
  // before the others' accesses, nor before the scheduler that frees the block).
  if (__tsan_ignore_thread_begin) __tsan_ignore_thread_begin();
  void* p = nullptr;
  if (posix_memalign(&p, std::max<std::size_t>(align, sizeof(void*)), bytes) != 0) std::abort();
  std::memset(p, 0xFF, bytes);
  b.shared.push_back({key, p});
  if (__tsan_ignore_thread_end) __tsan_ignore_thread_end();
  b.static_bytes += bytes;
  if (b.static_bytes > kStaticSmemLimit && !b.launch->static_limit_reported.exchange(true)) {
    report("launch", site, "static shared memory reaches %zu bytes with '%s' (the limit is 48 KB)", b.static_bytes,
                name);
  }
  return p;
}

void* dynamic_shared(Site site) {
  Block& b = *worker->block;
  if (!b.dynamic) report("memcheck", site, "extern __shared__ used by a launch with no dynamic shared memory");
  return b.dynamic;
}

void shuffle_complete(WarpCall* const lanes[32], const WarpCall& first) {
  const auto& f = reinterpret_cast<const ShuffleCall&>(first);
  const int width = f.width;
  if (width <= 0 || width > 32 || (width & (width - 1)) != 0) {
    report("synccheck", first.site, "%s width %d is not a power of two in [1, 32]", first.kind, width);
    return;
  }
  for (int l = 0; l < 32; ++l) {
    if (!lanes[l]) continue;
    const auto* c = reinterpret_cast<const ShuffleCall*>(lanes[l]);
    const int segment = l & ~(width - 1);
    int src = l;
    switch (c->mode) {
      case ShuffleMode::kIdx: src = segment + (c->operand & (width - 1)); break;
      case ShuffleMode::kUp: src = (l - segment) >= c->operand ? l - c->operand : l; break;
      case ShuffleMode::kDown: src = (l - segment) + c->operand < width ? l + c->operand : l; break;
      case ShuffleMode::kXor: {  // shfl.bfly: any lane up to the end of this segment, earlier segments included
        const int j = l ^ (c->operand & 31);
        src = j <= (segment | (width - 1)) ? j : l;
        break;
      }
    }
    if (!lanes[src]) {
      report("synccheck", first.site, "%s: lane %d reads lane %d, which the mask 0x%08x leaves out", first.kind,
                  l, src, first.mask);
      continue;
    }
    std::memcpy(c->out, reinterpret_cast<const ShuffleCall*>(lanes[src])->in, c->bytes);
  }
}

const int* wmma_layout(int n, int kind) {
  // One permutation per fragment kind, tile size and schedule seed, made once (fixed for a process's schedule).
  // Kinds get different permutations, so code that copies elements from one kind of fragment to another (an
  // accumulator into a matrix_a, say) fails too.
  static std::mutex mutex;
  static std::map<std::tuple<int, int, std::uint64_t>, std::vector<int>> layouts;
  const Config c = read_config();
  const std::uint64_t seed = c.order == Order::kRandom ? c.seed : c.order == Order::kReverse ? 2 : 1;
  // To TSan the table is there before any thread runs, and its lock orders nothing: otherwise every block that uses
  // WMMA would be ordered after the blocks that used it before, and TSan would miss races between them.
  if (AnnotateIgnoreSyncBegin) AnnotateIgnoreSyncBegin(__FILE__, __LINE__);
  if (__tsan_ignore_thread_begin) __tsan_ignore_thread_begin();
  const int* layout;
  {
    const std::lock_guard<std::mutex> lock(mutex);
    auto& v = layouts[{n, kind, seed}];
    if (v.empty()) {
      v.resize(n);
      for (int i = 0; i < n; ++i) v[i] = i;
      std::mt19937_64 rng(seed * 7919 + n * 31 + kind);
      std::shuffle(v.begin(), v.end(), rng);
    }
    layout = v.data();
  }
  if (__tsan_ignore_thread_end) __tsan_ignore_thread_end();
  if (AnnotateIgnoreSyncEnd) AnnotateIgnoreSyncEnd(__FILE__, __LINE__);
  return layout;
}

bool wmma_check_pointer(const char* op, const WarpCall& first, const void* ptr, unsigned ldm, std::size_t element,
                        const void* const lane_ptrs[32], const unsigned lane_ldms[32]) {
  // Against lane 0's: `ptr` and `ldm` are the completing lane's, which may be any lane.
  for (int l = 1; l < 32; ++l) {
    if (lane_ptrs[l] != lane_ptrs[0] || lane_ldms[l] != lane_ldms[0]) {
      report("wmma", first.site, "%s: lane %d passes pointer %p ldm %u, lane 0 pointer %p ldm %u", op, l,
                  lane_ptrs[l], lane_ldms[l], lane_ptrs[0], lane_ldms[0]);
      return false;
    }
  }
  if (reinterpret_cast<std::uintptr_t>(ptr) % 32 != 0) {
    report("wmma", first.site, "%s: pointer %p is not 32-byte aligned", op, ptr);
    return false;
  }
  if ((ldm * element) % 16 != 0) {
    report("wmma", first.site, "%s: ldm %u (%zu bytes) is not a multiple of 16 bytes", op, ldm, ldm * element);
    return false;
  }
  return true;
}

void run_grid(const LaunchConfig& config, void (*thread_main)(void*), void* args) {
  static const bool death_callback_set = [] {
    if (__sanitizer_set_death_callback) __sanitizer_set_death_callback(&print_context_at_death);
    return true;
  }();
  (void)death_callback_set;
  const Config settings = read_config();
  const std::uint64_t threads = std::uint64_t(config.block.x) * config.block.y * config.block.z;
  const std::uint64_t blocks = std::uint64_t(config.grid.x) * config.grid.y * config.grid.z;
  const std::string at = " launching " + std::string(config.kernel_name) + " at " + where(config.site);
  if (threads == 0 || blocks == 0 || config.grid.y > 65535 || config.grid.z > 65535 || config.grid.x > 0x7fffffffu) {
    fail_launch(cudaErrorInvalidConfiguration, "subq-emu launch: invalid grid or block dimensions" + at);
    return;
  }
  if (threads > 1024 || config.block.z > 64) {
    fail_launch(cudaErrorInvalidConfiguration,
                "subq-emu launch: " + std::to_string(threads) + " threads per block (at most 1024)" + at);
    return;
  }
  if (config.dynamic_smem > kStaticSmemLimit) {
    int allowed = 0;
    {
      const std::lock_guard<std::mutex> lock(attribute_mutex);
      auto it = max_dynamic_smem.find(config.kernel);
      if (it != max_dynamic_smem.end()) allowed = it->second;
    }
    if (config.dynamic_smem > static_cast<std::size_t>(allowed)) {
      fail_launch(cudaErrorInvalidValue, "subq-emu launch: " + std::to_string(config.dynamic_smem) +
                                             " bytes of dynamic shared memory without cudaFuncSetAttribute "
                                             "(cudaFuncAttributeMaxDynamicSharedMemorySize is " +
                                             std::to_string(allowed) + ")" + at);
      return;
    }
  }
  {
    const std::lock_guard<std::mutex> lock(report_mutex);
    if (launched.size() < 100000) launched.emplace_back(std::string(config.kernel_name) + " at " + where(config.site));
  }
  GridRun launch;
  launch.config = &config;
  launch.thread_main = thread_main;
  launch.args = args;
  launch.settings = settings;
  launch.threads = static_cast<int>(threads);
  launch.launch_start = static_cast<char*>(std::malloc(2));
  launch.launch_end = launch.launch_start + 1;
  std::vector<std::uint64_t> order(blocks);
  for (std::uint64_t i = 0; i < blocks; ++i) order[i] = settings.order == Order::kReverse ? blocks - 1 - i : i;
  if (settings.order == Order::kRandom) {
    std::mt19937_64 rng(settings.seed);
    std::shuffle(order.begin(), order.end(), rng);
  }
  tsan_release(launch.launch_start);
  std::atomic<std::size_t> next{0};
  const int workers = static_cast<int>(std::min<std::uint64_t>(settings.workers, blocks));
  std::vector<std::thread> pool;
  for (int i = 1; i < workers; ++i) pool.emplace_back([&] { run_worker(launch, order, next); });
  run_worker(launch, order, next);
  for (auto& t : pool) t.join();
  tsan_acquire(launch.launch_end);
  std::free(launch.launch_start);
  if (launch.failed) {
    last_error = cudaErrorLaunchFailure;
    last_error_message = "subq-emu found errors" + at + " (see the subq-emu reports)";
  }
}

std::vector<std::string> take_launches() {
  const std::lock_guard<std::mutex> lock(report_mutex);
  std::vector<std::string> out;
  out.swap(launched);
  return out;
}

std::vector<std::string> take_reports() {
  const std::lock_guard<std::mutex> lock(report_mutex);
  std::vector<std::string> out;
  out.swap(reports);
  return out;
}

}  // namespace subq_emu

// ---- the CUDA runtime calls our cores make, on host memory -----------------------------------------------------

using subq_emu::last_error;
using subq_emu::last_error_message;

extern "C" {

cudaError_t cudaGetLastError() {
  const cudaError_t e = last_error;
  last_error = cudaSuccess;
  return e;
}

cudaError_t cudaPeekAtLastError() { return last_error; }

const char* cudaGetErrorString(cudaError_t error) {
  if (error == cudaSuccess) return "no error";
  if (!last_error_message.empty()) return last_error_message.c_str();
  return "subq-emu: CUDA error";
}

const char* cudaGetErrorName(cudaError_t error) { return error == cudaSuccess ? "cudaSuccess" : "cudaErrorUnknown"; }

cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}

cudaError_t cudaSetDevice(int) { return cudaSuccess; }

cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int) {
  const int arch = subq_emu::read_config().arch;
  switch (attr) {
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = static_cast<int>(subq_emu::smem_optin_limit(arch)); break;
    case cudaDevAttrMaxSharedMemoryPerBlock: *value = 48 * 1024; break;
    case cudaDevAttrMultiProcessorCount: *value = arch == 80 ? 108 : arch == 89 ? 128 : 132; break;
    case cudaDevAttrComputeCapabilityMajor: *value = arch / 10; break;
    case cudaDevAttrComputeCapabilityMinor: *value = arch % 10; break;
    case cudaDevAttrMaxThreadsPerBlock: *value = 1024; break;
    case cudaDevAttrWarpSize: *value = 32; break;
    default: return cudaErrorInvalidValue;
  }
  return cudaSuccess;
}

cudaError_t cudaFuncSetAttribute(const void* func, cudaFuncAttribute attr, int value) {
  if (attr == cudaFuncAttributeMaxDynamicSharedMemorySize) {
    const std::size_t limit = subq_emu::smem_optin_limit(subq_emu::read_config().arch);
    if (value < 0 || static_cast<std::size_t>(value) > limit) return cudaErrorInvalidValue;
    const std::lock_guard<std::mutex> lock(subq_emu::attribute_mutex);
    subq_emu::max_dynamic_smem[func] = value;
  }
  return cudaSuccess;
}

cudaError_t cudaMalloc(void** ptr, std::size_t size) {
  if (posix_memalign(ptr, 256, size ? size : 1) != 0) return cudaErrorMemoryAllocation;
  std::memset(*ptr, 0xFF, size);
  return cudaSuccess;
}

cudaError_t cudaFree(void* ptr) {
  std::free(ptr);
  return cudaSuccess;
}

cudaError_t cudaMemsetAsync(void* ptr, int value, std::size_t count, cudaStream_t) {
  std::memset(ptr, value, count);
  return cudaSuccess;
}

cudaError_t cudaMemset(void* ptr, int value, std::size_t count) { return cudaMemsetAsync(ptr, value, count, nullptr); }

cudaError_t cudaMemset2DAsync(void* ptr, std::size_t pitch, int value, std::size_t width, std::size_t height,
                              cudaStream_t) {
  for (std::size_t r = 0; r < height; ++r) std::memset(static_cast<char*>(ptr) + r * pitch, value, width);
  return cudaSuccess;
}

cudaError_t cudaMemcpyAsync(void* dst, const void* src, std::size_t count, cudaMemcpyKind, cudaStream_t) {
  std::memmove(dst, src, count);
  return cudaSuccess;
}

cudaError_t cudaMemcpy(void* dst, const void* src, std::size_t count, cudaMemcpyKind kind) {
  return cudaMemcpyAsync(dst, src, count, kind, nullptr);
}

cudaError_t cudaMemcpy2DAsync(void* dst, std::size_t dpitch, const void* src, std::size_t spitch, std::size_t width,
                              std::size_t height, cudaMemcpyKind, cudaStream_t) {
  for (std::size_t r = 0; r < height; ++r) {
    std::memmove(static_cast<char*>(dst) + r * dpitch, static_cast<const char*>(src) + r * spitch, width);
  }
  return cudaSuccess;
}

cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }
cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }

}  // extern "C"
