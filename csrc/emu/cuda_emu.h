// cuda_emu.h: executes mmrprune's CUDA kernels (csrc/cuda/*.cu, unmodified) on the host CPU.
//
// Used only to build the test module mmrprune._cuda_emu and the C++ harness in tests/emu/;
// see csrc/README.md ("CUDA emulator").  The .cu file first goes through csrc/emu/cu_rewrite.py
// (kernel launches and __shared__ declarations), then g++ compiles it with `-include cuda_emu.h`
// and the flags of csrc/cuda_build.py (EMU_CXX_FLAGS: -ffp-contract=off, -fno-strict-aliasing).
//
// Execution model.  The blocks of a launch run one after another on the calling OS thread;
// the blocks of a thread-block cluster (cudaLaunchKernelEx with a cluster dimension) run together
// as one group.  Inside a block (group), every CUDA thread is a fiber with its own stack; a fiber
// runs until it reaches __syncthreads, a cluster barrier, a full-warp __shfl_*_sync or
// __syncwarp, where it hands control to the group's scheduler.  A barrier opens once every live thread of the block (or warp) has
// arrived; the scheduler then resumes the runnable fibers in the order CUDA_EMU_SCHED asks for.
//
// What aborts (with the source line): threads of one barrier generation arriving from different
// lines (divergent __syncthreads or shuffle), deadlock, a thread exiting while others wait,
// shuffles with a partial mask or exited lanes.  Launch errors go through cudaGetLastError as on
// a GPU: more than 1024 threads, dynamic shared memory above 48 KiB without the
// cudaFuncSetAttribute opt-in, or above the opt-in limit.  Shared memory (static and dynamic)
// is one heap allocation per block filled with a garbage byte (NaN for floats by default), so
// AddressSanitizer reports out-of-bounds shared accesses and uninitialised reads show up.
// Under ThreadSanitizer each CUDA thread is a TSan fiber and only barriers order memory, so two
// threads touching one word between two barriers, one writing, is reported as a race.
//
// Environment: CUDA_EMU_SCHED=linear|reverse|random:SEED (resume order), CUDA_EMU_SMEM_FILL
// (0..255, default 0xff), CUDA_EMU_SMEM_OPTIN (bytes, default 232448 as an H100),
// CUDA_EMU_CC_MAJOR (compute capability, default 9; below 9 no clusters), CUDA_EMU_SMS (SM count,
// default 132),
// CUDA_EMU_STACK_KB (fiber stack, default 256), CUDA_EMU_REPORT_FD=FD:PID (a second
// destination of abort messages: report_fd() below), CUDA_EMU_COUNTS=PATH (per-launch barrier,
// shuffle-level and load counters appended to PATH: "Counters" below, bench/emu_counts.py).
#pragma once

#include <cuda_runtime.h>  // real CUDA headers: types, enums and API declarations only
#include <cuda_fp16.h>     // host-side __half / __half2 conversions (work without nvcc)
#include <cuda_bf16.h>

#include <sys/mman.h>
#include <sys/stat.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/common_interface_defs.h>
#define CUDA_EMU_ASAN 1
#endif
#if defined(__SANITIZE_THREAD__)
// ThreadSanitizer as a race checker: each CUDA thread is a TSan fiber; switches carry no
// happens-before; only __syncthreads (and __syncwarp) add one, so two CUDA threads touching the
// same word (shared or global) in the same barrier interval, one of them writing, is reported.
#include <sanitizer/tsan_interface.h>
#define CUDA_EMU_TSAN 1
extern "C" void AnnotateIgnoreReadsBegin(const char* f, int l);
extern "C" void AnnotateIgnoreReadsEnd(const char* f, int l);
extern "C" void AnnotateIgnoreWritesBegin(const char* f, int l);
extern "C" void AnnotateIgnoreWritesEnd(const char* f, int l);
#endif

// ------------------------------------------------------------------ keywords
// host_defines.h (no __CUDACC__) already maps __global__/__device__/__host__ to nothing and
// __forceinline__ to always_inline.  __shared__ declarations must go through cu_rewrite.py: a
// leftover one would silently become a per-thread variable, so it is a compile error here.
#undef __shared__
#define __shared__ CUDA_EMU_ERROR_shared_declaration_not_rewritten_by_cu2cpp
#ifndef __launch_bounds__
#define __launch_bounds__(...)
#endif

// ------------------------------------------------------------------ context switch
// x86-64: a six-register switch (the System V callee-saved registers and the stack pointer).
// glibc's swapcontext also saves the signal mask with a system call and the FPU environment,
// which made it most of the emulator's run time; nothing here changes either.  Other
// architectures (or -DCUDA_EMU_UCONTEXT) use ucontext.
#if defined(__x86_64__) && !defined(CUDA_EMU_UCONTEXT)
#define CUDA_EMU_FAST_SWITCH 1
extern "C" void cuda_emu_switch(void** save_sp, void* load_sp);
__asm__(
    ".text\n"
    ".weak cuda_emu_switch\n"
    ".hidden cuda_emu_switch\n"
    ".type cuda_emu_switch, @function\n"
    "cuda_emu_switch:\n"
    "  pushq %rbp\n  pushq %rbx\n  pushq %r12\n  pushq %r13\n  pushq %r14\n  pushq %r15\n"
    "  movq %rsp, (%rdi)\n"
    "  movq %rsi, %rsp\n"
    "  popq %r15\n  popq %r14\n  popq %r13\n  popq %r12\n  popq %rbx\n  popq %rbp\n"
    "  ret\n"
    ".size cuda_emu_switch, .-cuda_emu_switch\n");
#endif

namespace cuda_emu {

#ifdef CUDA_EMU_FAST_SWITCH
struct Context {
  void* sp = nullptr;
};
inline void swap_to(Context& save, Context& load) { cuda_emu_switch(&save.sp, load.sp); }
// A fresh stack that "returns" into entry(): six zero registers, then entry's address, then a
// null return address for entry itself (it never returns), 16-byte aligned as after a call.
inline void make_context(Context& c, char* stack, std::size_t size, void (*entry)()) {
  auto top = reinterpret_cast<std::uintptr_t>(stack + size) & ~std::uintptr_t(15);
  auto* sp = reinterpret_cast<std::uintptr_t*>(top);
  *--sp = 0;
  *--sp = reinterpret_cast<std::uintptr_t>(entry);
  for (int i = 0; i < 6; ++i) *--sp = 0;
  c.sp = sp;
}
#else
struct Context {
  ucontext_t uc;
};
inline void swap_to(Context& save, Context& load) { swapcontext(&save.uc, &load.uc); }
inline void make_context(Context& c, char* stack, std::size_t size, void (*entry)()) {
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = stack;
  c.uc.uc_stack.ss_size = size;
  c.uc.uc_link = nullptr;
  makecontext(&c.uc, entry, 0);
}
#endif

// Where a diagnostic goes besides stderr: the descriptor FD of CUDA_EMU_REPORT_FD=FD:PID when
// this is process PID (a forked or exec'd child may hold another file under that number) and FD
// is not stderr's own file (no line twice).  A test runner that captures fd 2 into a temporary
// file shows it only after the test, which an abort never reaches; tests/conftest.py points FD
// at a copy of the runner's own stderr, so the reason for an abort shows in the report.
inline int report_fd() {
  const char* v = std::getenv("CUDA_EMU_REPORT_FD");
  if (!v || !*v) return -1;
  char* end = nullptr;
  const long fd = std::strtol(v, &end, 10);
  if (end == v || *end != ':' || fd < 0 || std::strtol(end + 1, nullptr, 10) != static_cast<long>(getpid()))
    return -1;
  struct stat mine, err;
  if (fstat(static_cast<int>(fd), &mine) != 0) return -1;
  if (fstat(2, &err) == 0 && mine.st_dev == err.st_dev && mine.st_ino == err.st_ino) return -1;
  return static_cast<int>(fd);
}

// One line of a diagnostic, to stderr and to report_fd().
__attribute__((format(printf, 1, 2))) inline void report_line(const char* fmt, ...) {
  char line[1024];
  va_list ap;
  va_start(ap, fmt);
  const int n = std::vsnprintf(line, sizeof line - 1, fmt, ap);
  va_end(ap);
  if (n < 0) return;
  const std::size_t len = std::min<std::size_t>(static_cast<std::size_t>(n), sizeof line - 2);
  line[len] = '\n';
  line[len + 1] = '\0';
  std::fputs(line, stderr);
  std::fflush(stderr);
  const int fd = report_fd();
  if (fd >= 0 && write(fd, line, len + 1) < 0) {
    // nothing left to tell: the line already went to stderr
  }
}

[[noreturn]] __attribute__((format(printf, 1, 2))) inline void fail(const char* fmt, ...) {
  char msg[1024];
  va_list ap;
  va_start(ap, fmt);
  std::vsnprintf(msg, sizeof msg, fmt, ap);
  va_end(ap);
  report_line("cuda_emu: %s", msg);
  std::abort();
}

inline long env_long(const char* name, long dflt) {
  const char* v = std::getenv(name);
  return (v && *v) ? std::strtol(v, nullptr, 0) : dflt;
}

enum FiberState : int { kRunnable, kWaitBlock, kWaitWarp, kWaitCluster, kDone };

// The emulator's own bookkeeping is shared by all fibers of a block; TSan must not see it.
struct Internal {
#ifdef CUDA_EMU_TSAN
  Internal() { AnnotateIgnoreReadsBegin(__FILE__, __LINE__); AnnotateIgnoreWritesBegin(__FILE__, __LINE__); }
  ~Internal() { AnnotateIgnoreWritesEnd(__FILE__, __LINE__); AnnotateIgnoreReadsEnd(__FILE__, __LINE__); }
#endif
};
inline void hb_release(void* a) {
#ifdef CUDA_EMU_TSAN
  __tsan_release(a);
#else
  (void)a;
#endif
}
inline void hb_acquire(void* a) {
#ifdef CUDA_EMU_TSAN
  __tsan_acquire(a);
#else
  (void)a;
#endif
}

struct Warp {
  std::atomic<unsigned> gen{0};
  int arrived = 0;
  int expected = 0;    // live lanes
  int lanes = 0;       // lanes that exist (blockDim may not be a multiple of 32)
  const char* file = nullptr;
  int line = 0;
  char sync_obj[2];  // TSan happens-before objects of __syncwarp, alternating by generation
  std::atomic<std::uint64_t> buf[2][32];  // shuffle exchange, double-buffered by generation parity
  // counters (see "Counters" below)
  long levels = 0;           // shuffle levels of this warp in the current barrier interval
  long shfl_ops = 0;         // shuffle generations of this warp in the current barrier interval
  long level_interval = -1;  // the interval of the last shuffle (a new interval starts a new level)
  int pat_mode = -1, pat_width = 0;  // pattern of the last shuffle generation
  int pat_src[32] = {};
  bool pat_differs = false;  // some lane of the generation being collected differs from pat_src
  int next_src[32] = {};
};

struct Fiber {
  Context ctx;
  uint3 tid;
  int linear = 0;
  std::atomic<int> state{kRunnable};
  unsigned wait_gen = 0;
  const char* file = nullptr;
  int line = 0;
  char* stack = nullptr;
  std::size_t stack_size = 0;
  long ldg = 0;  // __ldg calls of this thread in the current barrier interval
  int ldg_sites[16] = {};  // the source lines of those calls (distinct; see "Counters")
  int nsites = 0;
#ifdef CUDA_EMU_ASAN
  void* fake_stack = nullptr;
#endif
#ifdef CUDA_EMU_TSAN
  void* tsan_fiber = nullptr;
  bool started = false;
#endif
};

struct Cluster;

struct Block {
  uint3 block_idx;
  Cluster* cluster = nullptr;  // the cluster this block runs in (a launch without one: a cluster of one)
  unsigned cluster_rank = 0;
  dim3 block_dim, grid_dim;
  Fiber* fibers = nullptr;
  int nthreads = 0;
  Warp* warps = nullptr;
  int nwarps = 0;
  int live = 0;
  // block barrier
  std::atomic<unsigned> bar_gen{0};
  int bar_arrived = 0;
  const char* bar_file = nullptr;
  int bar_line = 0;
  char bar_sync[2];           // TSan happens-before objects of __syncthreads, alternating by generation
  void* exit_sync = nullptr;  // every thread's exit happens before the launch returns
#ifdef CUDA_EMU_TSAN
  void* tsan_sched = nullptr;
#endif
  // scheduler
  Context sched;
  std::atomic<Fiber*> cur{nullptr};  // atomic: written by the scheduler, read by the fibers
  const std::function<void()>* body = nullptr;
#ifdef CUDA_EMU_ASAN
  const void* sched_stack_bottom = nullptr;
  std::size_t sched_stack_size = 0;
#endif
  // shared memory
  unsigned char* dyn_smem = nullptr;
  std::size_t dyn_bytes = 0;
  std::map<const void*, std::pair<void*, std::size_t>> static_smem;
  std::size_t static_bytes = 0;
  std::size_t smem_limit = 0;  // static + dynamic may not exceed this
  // counters (see "Counters" below)
  long interval = 0;     // barrier intervals closed so far
  long barriers = 0;     // __syncthreads generations that opened
  long shfl_path = 0;    // sum over intervals of the max over warps of shuffle levels
  long shfl_ops_path = 0;  // same, counting every shuffle generation
  long shfl_ops = 0;     // shuffle generations of all warps
  long ldg_path = 0;     // sum over intervals of the max over threads of __ldg calls
  long ldg_total = 0;    // __ldg calls of all threads
  long ldg_site_path = 0;  // sum over intervals of the max over threads of distinct __ldg sites
  long cluster_barriers = 0;  // cluster barriers (cluster.sync()) that opened
};

// The blocks of one thread-block cluster run as one group of fibers (run_group): a cluster
// barrier opens once every thread of every block of the cluster has arrived, and each block's
// shared memory is reachable from the others (map_shared_rank) until the whole cluster is done.
struct Cluster {
  std::vector<Block*> blocks;  // by rank
  dim3 dim{1, 1, 1};
  std::atomic<unsigned> gen{0};
  int arrived = 0;
  const char* file = nullptr;
  int line = 0;
  char sync[2];  // TSan happens-before objects of the cluster barrier, alternating by generation
};

// ------------------------------------------------------------------ counters
// Per block of every launch, for the cost model (bench/emu_counts.py):
//   barriers   : __syncthreads generations (each one every thread of the block waits at).
//   shfl_path  : shuffle levels on the critical path.  A *shuffle level* of a warp is a maximal
//                run of consecutive full-warp __shfl_*_sync generations of that warp, inside one
//                barrier interval, with the same pattern (mode, width, and the source lane of
//                every lane): the (score, index) pair of one butterfly step is one level, the
//                next xor offset starts another.  Barriers cut the launch into intervals; in
//                each, the warps run in parallel, so the path adds the largest level count of
//                any warp in the interval.  (A run of identical-pattern shuffles that do depend
//                on each other would be under-counted; the kernels have none.)
//   shfl_ops_path: the same sum counting every shuffle generation (no grouping).
//   cluster_barriers: cluster barriers (cg::this_cluster().sync()), each one also a barrier of
//                every block of the cluster (it closes an interval in each).
//   ldg_path   : the sum over intervals of the largest number of __ldg calls of one thread:
//                an UPPER bound on dependent global-memory trips (the emulator cannot see
//                whether the hardware overlaps a thread's independent loads).  Plain
//                pointer reads of global memory are not counted.
//   ldg_site_path: the same sum counting a thread's distinct __ldg call sites (source lines) per
//                interval: the loads of one site in one interval count as one trip.  That is the
//                dependent-trip count when a site's loads are independent of each other (an
//                unrolled batch of loads into registers, a strided loop) and each site depends on
//                the one before; it under-counts a site whose loads chain (a pointer chase, or a
//                short-circuit loop whose next load waits for the previous compare, as the
//                before kernels' lane-0 commit check), so it is used only for kernels read to
//                have none (bench/gpu_model.py says which).
// CUDA_EMU_COUNTS=PATH appends one JSON line per launch to PATH (see write_counts).
inline void close_interval(Block& b) {
  long lv = 0, ops = 0;
  for (int w = 0; w < b.nwarps; ++w) {
    lv = std::max(lv, b.warps[w].levels);
    ops = std::max(ops, b.warps[w].shfl_ops);
    b.warps[w].levels = 0;
    b.warps[w].shfl_ops = 0;
  }
  long ld = 0, sites = 0;
  for (int i = 0; i < b.nthreads; ++i) {
    ld = std::max(ld, b.fibers[i].ldg);
    sites = std::max<long>(sites, b.fibers[i].nsites);
    b.fibers[i].ldg = 0;
    b.fibers[i].nsites = 0;
  }
  b.shfl_path += lv;
  b.shfl_ops_path += ops;
  b.ldg_path += ld;
  b.ldg_site_path += sites;
  ++b.interval;
}

inline thread_local Block* tl_block = nullptr;

inline Block& block() {
  if (!tl_block) fail("device code called outside a kernel launch");
  return *tl_block;
}
inline Fiber& self() { return *block().cur.load(std::memory_order_relaxed); }

// ------------------------------------------------------------------ fiber switching
inline void switch_to_scheduler(Fiber& f, bool exiting) {
  Block& b = *tl_block;
#ifdef CUDA_EMU_ASAN
  __sanitizer_start_switch_fiber(exiting ? nullptr : &f.fake_stack, b.sched_stack_bottom, b.sched_stack_size);
#else
  (void)exiting;
#endif
#ifdef CUDA_EMU_TSAN
  __tsan_switch_to_fiber(b.tsan_sched, __tsan_switch_to_fiber_no_sync);
#endif
  swap_to(f.ctx, b.sched);
#ifdef CUDA_EMU_ASAN
  __sanitizer_finish_switch_fiber(f.fake_stack, &tl_block->sched_stack_bottom, &tl_block->sched_stack_size);
#endif
}

inline void resume(Block& b, Fiber& f) {
  b.cur = &f;
#ifdef CUDA_EMU_ASAN
  void* fake = nullptr;
  __sanitizer_start_switch_fiber(&fake, f.stack, f.stack_size);
#endif
#ifdef CUDA_EMU_TSAN
  // only the first switch into a fiber synchronises: what the host wrote before the launch
  const unsigned tsan_flags = f.started ? __tsan_switch_to_fiber_no_sync : 0;
  f.started = true;
  __tsan_switch_to_fiber(f.tsan_fiber, tsan_flags);
#endif
  swap_to(b.sched, f.ctx);
#ifdef CUDA_EMU_ASAN
  __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#endif
  b.cur = nullptr;
}

// ------------------------------------------------------------------ barriers
inline void syncthreads(const char* file, int line) {
  Internal guard;
  Block& b = block();
  Fiber& f = *b.cur;
  if (b.live != b.nthreads)
    fail("__syncthreads at %s:%d reached after %d thread(s) of block (%u,%u,%u) exited", file, line,
         b.nthreads - b.live, b.block_idx.x, b.block_idx.y, b.block_idx.z);
  if (b.bar_arrived == 0) {
    b.bar_file = file;
    b.bar_line = line;
  } else if (b.bar_line != line || std::strcmp(b.bar_file, file) != 0) {
    fail("divergent __syncthreads in block (%u,%u,%u): thread %d at %s:%d, another thread at %s:%d",
         b.block_idx.x, b.block_idx.y, b.block_idx.z, f.linear, file, line, b.bar_file, b.bar_line);
  }
  const unsigned gen = b.bar_gen.load(std::memory_order_relaxed);
  hb_release(&b.bar_sync[gen & 1]);
  if (++b.bar_arrived == b.live) {  // last one opens the barrier, then yields like the others so
    b.bar_arrived = 0;              // that the order after the barrier follows CUDA_EMU_SCHED
    ++b.barriers;
    close_interval(b);
    b.bar_gen.store(gen + 1, std::memory_order_relaxed);
    f.state.store(kRunnable, std::memory_order_relaxed);
  } else {
    f.wait_gen = gen;
    f.file = file;
    f.line = line;
    f.state.store(kWaitBlock, std::memory_order_relaxed);
  }
  switch_to_scheduler(f, false);
  hb_acquire(&b.bar_sync[gen & 1]);
}

// cluster.sync(): every live thread of every block of the cluster.  Release/acquire, like the
// hardware's barrier.cluster.arrive.release / wait.acquire (the default of cluster.sync()).
inline void cluster_sync(const char* file, int line) {
  Internal guard;
  Block& b = block();
  Fiber& f = *b.cur;
  Cluster& c = *b.cluster;
  int total = 0;
  for (Block* o : c.blocks) {
    if (o->live != o->nthreads)
      fail("cluster barrier at %s:%d reached after %d thread(s) of block (%u,%u,%u) of the cluster exited", file,
           line, o->nthreads - o->live, o->block_idx.x, o->block_idx.y, o->block_idx.z);
    total += o->nthreads;
  }
  if (c.arrived == 0) {
    c.file = file;
    c.line = line;
  } else if (c.line != line || std::strcmp(c.file, file) != 0) {
    fail("divergent cluster barrier: thread %d of block (%u,%u,%u) at %s:%d, another thread of the cluster at %s:%d",
         f.linear, b.block_idx.x, b.block_idx.y, b.block_idx.z, file, line, c.file, c.line);
  }
  const unsigned gen = c.gen.load(std::memory_order_relaxed);
  hb_release(&c.sync[gen & 1]);
  if (++c.arrived == total) {
    c.arrived = 0;
    for (Block* o : c.blocks) {
      ++o->cluster_barriers;
      close_interval(*o);
    }
    c.gen.store(gen + 1, std::memory_order_relaxed);
    f.state.store(kRunnable, std::memory_order_relaxed);
  } else {
    f.wait_gen = gen;
    f.file = file;
    f.line = line;
    f.state.store(kWaitCluster, std::memory_order_relaxed);
  }
  switch_to_scheduler(f, false);
  hb_acquire(&c.sync[gen & 1]);
}

inline void warp_barrier(Warp& w, Fiber& f, const char* what, const char* file, int line, bool ordering) {
  if (w.expected != w.lanes)
    fail("%s at %s:%d (thread %d): %d lane(s) of the warp have exited or do not exist", what, file, line,
         f.linear, w.lanes - w.expected);
  if (w.arrived == 0) {
    w.file = file;
    w.line = line;
  } else if (w.line != line || std::strcmp(w.file, file) != 0) {
    fail("divergent %s: thread %d at %s:%d, another lane of its warp at %s:%d", what, f.linear, file, line,
         w.file, w.line);
  }
  const unsigned gen = w.gen.load(std::memory_order_relaxed);
  if (ordering) hb_release(&w.sync_obj[gen & 1]);  // __syncwarp orders memory; shuffles do not
  if (++w.arrived == w.expected) {
    w.arrived = 0;
    w.gen.store(gen + 1, std::memory_order_relaxed);
    if (ordering) hb_acquire(&w.sync_obj[gen & 1]);
    return;
  }
  f.wait_gen = gen;
  f.file = file;
  f.line = line;
  f.state.store(kWaitWarp, std::memory_order_relaxed);
  switch_to_scheduler(f, false);
  if (ordering) hb_acquire(&w.sync_obj[gen & 1]);
}

inline void syncwarp(const char* file, int line, unsigned mask = 0xffffffffu) {
  Internal guard;
  Block& b = block();
  Fiber& f = *b.cur;
  Warp& w = b.warps[f.linear >> 5];
  const unsigned want = w.lanes == 32 ? 0xffffffffu : ((1u << w.lanes) - 1u);
  if (mask != want) fail("__syncwarp(0x%08x) at %s:%d: only full-warp masks are emulated", mask, file, line);
  warp_barrier(w, f, "__syncwarp", file, line, true);
}

enum ShflMode { kIdx, kUp, kDown, kXor };

template <typename T>
inline T shfl(ShflMode mode, const char* file, int line, unsigned mask, T v, int arg, int width) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "shuffle of a type wider than 8 bytes");
  Internal guard;
  Block& b = block();
  Fiber& f = *b.cur;
  Warp& w = b.warps[f.linear >> 5];
  const unsigned want = w.lanes == 32 ? 0xffffffffu : ((1u << w.lanes) - 1u);
  if (mask != want) fail("__shfl_*_sync(0x%08x) at %s:%d: only full-warp masks are emulated", mask, file, line);
  if (width <= 0 || width > 32 || (width & (width - 1)))
    fail("__shfl_*_sync at %s:%d: width %d is not a power of two <= 32", file, line, width);
  const int lane = f.linear & 31;
  const int parity = static_cast<int>(w.gen.load(std::memory_order_relaxed) & 1u);
  std::uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  w.buf[parity][lane].store(bits, std::memory_order_relaxed);
  const int seg = lane & ~(width - 1);
  {  // counters: this lane's source, compared with the warp's last shuffle (see close_interval)
    int s0 = lane;
    switch (mode) {
      case kIdx: s0 = seg + (arg & (width - 1)); break;
      case kUp: s0 = (lane - arg >= seg) ? lane - arg : lane; break;
      case kDown: s0 = (lane + arg < seg + width) ? lane + arg : lane; break;
      case kXor: s0 = ((lane ^ arg) < seg + width) ? (lane ^ arg) : lane; break;
    }
    if (w.arrived == 0) w.pat_differs = w.level_interval != b.interval || w.pat_mode != mode || w.pat_width != width;
    if (w.pat_src[lane] != s0) w.pat_differs = true;
    w.next_src[lane] = s0;
    if (w.arrived + 1 == w.expected) {  // the last lane completes the generation
      ++w.shfl_ops;
      ++b.shfl_ops;
      if (w.pat_differs) ++w.levels;
      w.level_interval = b.interval;
      w.pat_mode = mode;
      w.pat_width = width;
      std::memcpy(w.pat_src, w.next_src, sizeof w.pat_src);
    }
  }
  warp_barrier(w, f, "__shfl_*_sync", file, line, false);
  int src = lane;
  switch (mode) {  // (the same mapping as the counters' above)
    case kIdx: src = seg + (arg & (width - 1)); break;
    case kUp: src = (lane - arg >= seg) ? lane - arg : lane; break;
    case kDown: src = (lane + arg < seg + width) ? lane + arg : lane; break;
    case kXor: src = ((lane ^ arg) < seg + width) ? (lane ^ arg) : lane; break;
  }
  if (src >= w.lanes) src = lane;
  bits = w.buf[parity][src].load(std::memory_order_relaxed);
  T r;
  std::memcpy(&r, &bits, sizeof(T));
  return r;
}

// Warp-wide reductions and votes (__reduce_*_sync, __ballot_sync): every lane stores its value,
// the warp meets as for a shuffle, then every lane combines all lanes' values.  Each one is its
// own shuffle level in the counters (one REDUX or VOTE instruction on the GPU).
enum WarpOp { kRedMax, kRedMin, kRedAdd, kRedAnd, kRedOr, kBallot };

inline unsigned warp_collective(WarpOp op, const char* file, int line, unsigned mask, unsigned v) {
  Internal guard;
  Block& b = block();
  Fiber& f = *b.cur;
  Warp& w = b.warps[f.linear >> 5];
  const unsigned want = w.lanes == 32 ? 0xffffffffu : ((1u << w.lanes) - 1u);
  if (mask != want) fail("warp reduction/vote (0x%08x) at %s:%d: only full-warp masks are emulated", mask, file, line);
  const int lane = f.linear & 31;
  const int parity = static_cast<int>(w.gen.load(std::memory_order_relaxed) & 1u);
  w.buf[parity][lane].store(v, std::memory_order_relaxed);
  if (w.arrived + 1 == w.expected) {  // the last lane completes the generation: a new level
    ++w.shfl_ops;
    ++b.shfl_ops;
    ++w.levels;
    w.level_interval = b.interval;
    w.pat_mode = -1;  // the next shuffle starts a level too
  }
  warp_barrier(w, f, "warp reduction/vote", file, line, false);
  unsigned r = op == kRedMin || op == kRedAnd ? 0xffffffffu : 0u;
  for (int l = 0; l < w.lanes; ++l) {
    const unsigned x = static_cast<unsigned>(w.buf[parity][l].load(std::memory_order_relaxed));
    switch (op) {
      case kRedMax: r = std::max(r, x); break;
      case kRedMin: r = std::min(r, x); break;
      case kRedAdd: r += x; break;
      case kRedAnd: r &= x; break;
      case kRedOr: r |= x; break;
      case kBallot: r |= (x != 0u ? 1u : 0u) << l; break;
    }
  }
  return r;
}

// ------------------------------------------------------------------ shared memory
inline void fill_garbage(void* p, std::size_t n) { std::memset(p, static_cast<int>(env_long("CUDA_EMU_SMEM_FILL", 0xff)), n); }

template <typename T>
inline T* dynamic_smem() {
  Block& b = block();
  return reinterpret_cast<T*>(b.dyn_smem);
}

// One allocation per (declaration, instantiation) per block; `key` is the address of a static
// object next to the declaration.
template <typename A>
inline A& static_smem(const void* key) {
  Internal guard;  // allocation and garbage fill are not accesses of the kernel
  Block& b = block();
  auto it = b.static_smem.find(key);
  if (it == b.static_smem.end()) {
    void* p = std::malloc(sizeof(A));
    fill_garbage(p, sizeof(A));
    b.static_bytes += sizeof(A);
    if (b.static_bytes + b.dyn_bytes > b.smem_limit)
      fail("shared memory: %zu static + %zu dynamic bytes exceed the %zu-byte limit of this launch", b.static_bytes,
           b.dyn_bytes, b.smem_limit);
    it = b.static_smem.emplace(key, std::make_pair(p, sizeof(A))).first;
  }
  return *reinterpret_cast<A*>(it->second.first);
}

// Distributed shared memory: the address in block `rank` of the cluster that corresponds to the
// calling block's shared-memory address p (same variable, same offset).  A rank outside the
// cluster, an address that is not shared memory, or a block that has exited aborts.
inline void* map_shared(const void* p, unsigned rank, const char* file, int line) {
  Internal guard;
  Block& b = block();
  Cluster& c = *b.cluster;
  if (rank >= c.blocks.size())
    fail("map_shared_rank(%p, %u) at %s:%d: the cluster has %zu block(s)", p, rank, file, line, c.blocks.size());
  Block& t = *c.blocks[rank];
  if (t.live == 0)
    fail("map_shared_rank at %s:%d: block %u of the cluster has exited (its shared memory is gone)", file, line,
         rank);
  const auto* a = static_cast<const unsigned char*>(p);
  if (a >= b.dyn_smem && a < b.dyn_smem + b.dyn_bytes) return t.dyn_smem + (a - b.dyn_smem);
  for (auto& kv : b.static_smem) {
    const auto* base = static_cast<const unsigned char*>(kv.second.first);
    if (a >= base && a < base + kv.second.second) {
      auto it = t.static_smem.find(kv.first);
      if (it == t.static_smem.end()) {  // not yet declared by a thread of that block: garbage, as on a GPU
        void* q = std::malloc(kv.second.second);
        fill_garbage(q, kv.second.second);
        t.static_bytes += kv.second.second;
        it = t.static_smem.emplace(kv.first, std::make_pair(q, kv.second.second)).first;
      }
      return static_cast<unsigned char*>(it->second.first) + (a - base);
    }
  }
  fail("map_shared_rank(%p) at %s:%d: not a shared-memory address of this block", p, file, line);
}

// ------------------------------------------------------------------ runtime state
struct BlockCounts {
  long barriers, shfl_path, shfl_ops_path, shfl_ops, ldg_path, ldg_total, ldg_site_path, cluster_barriers;
};
struct Runtime {
  std::vector<BlockCounts> blocks;  // counters of the blocks of the current launch
  cudaError_t last_error = cudaSuccess;
  std::map<const void*, int> max_dyn_smem;  // cudaFuncAttributeMaxDynamicSharedMemorySize per kernel
  std::map<const void*, int> nonportable_cluster;  // cudaFuncAttributeNonPortableClusterSizeAllowed per kernel
  std::vector<std::pair<char*, std::size_t>> stacks;  // reused across launches
  long launches = 0;
};
inline Runtime& rt() {
  static Runtime r;
  return r;
}
inline int smem_optin() { return static_cast<int>(env_long("CUDA_EMU_SMEM_OPTIN", 232448)); }
// Compute capability major (CUDA_EMU_CC_MAJOR, default 9 as an H100): below 9 the device has no
// thread-block clusters (the launchers then keep one block per image, as on an A100).
inline int cc_major() { return static_cast<int>(env_long("CUDA_EMU_CC_MAJOR", 9)); }
inline int sm_count() { return static_cast<int>(env_long("CUDA_EMU_SMS", 132)); }

inline char* get_stack(int i, std::size_t* size) {
  auto& st = rt().stacks;
#ifdef CUDA_EMU_TSAN
  if (i == 0) {  // a new block: unmap the previous block's stacks (munmap resets TSan's shadow)
    const std::size_t page = static_cast<std::size_t>(sysconf(_SC_PAGESIZE));
    for (auto& s : st) munmap(s.first - page, s.second + page);
    st.clear();
  }
#endif
  const std::size_t want = static_cast<std::size_t>(env_long("CUDA_EMU_STACK_KB", 256)) * 1024;
  const std::size_t page = static_cast<std::size_t>(sysconf(_SC_PAGESIZE));
  while (static_cast<int>(st.size()) <= i) {
    // guard page below the stack: an overflow faults instead of corrupting a neighbour
    char* p = static_cast<char*>(mmap(nullptr, want + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0));
    if (p == MAP_FAILED) fail("mmap of a fiber stack failed");
    mprotect(p, page, PROT_NONE);
    st.emplace_back(p + page, want);
  }
  *size = st[i].second;
  return st[i].first;
}

inline void trampoline() {
  Block& b = *tl_block;
  Fiber& f = *b.cur;
#ifdef CUDA_EMU_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &b.sched_stack_bottom, &b.sched_stack_size);
#endif
  // Every thread starts (and synchronises with the host) before any runs kernel code, so an
  // early exit of one thread cannot happen-before the start of another.
  f.state.store(kRunnable, std::memory_order_relaxed);
  switch_to_scheduler(f, false);
  (*b.body)();
  {
    Internal guard;  // thread exit (the guard must end before the fiber does)
    Warp& w = b.warps[f.linear >> 5];
    --b.live;
    --w.expected;
    if (b.bar_arrived > 0)
      fail("thread %d of block (%u,%u,%u) exited while others wait at __syncthreads (%s:%d)", f.linear, b.block_idx.x,
           b.block_idx.y, b.block_idx.z, b.bar_file, b.bar_line);
    if (w.arrived > 0) fail("thread %d exited while lanes of its warp wait at %s:%d", f.linear, w.file, w.line);
    f.state.store(kDone, std::memory_order_relaxed);
  }
  hb_release(b.exit_sync);
  switch_to_scheduler(f, true);
  fail("a finished fiber was resumed");
}

// Runs the blocks `bids` (one cluster, by rank) as one group of fibers on the calling OS thread.
inline void run_group(const std::vector<uint3>& bids, dim3 cdim, dim3 bdim, dim3 gdim, std::size_t dyn_bytes,
                      std::size_t smem_limit, const std::function<void()>& body, void* exit_sync) {
  Internal guard;  // the scheduler's own accesses (it never runs kernel code) are not checked
  const int n = static_cast<int>(bdim.x * bdim.y * bdim.z);
  const int nw = (n + 31) / 32;
  const int nb = static_cast<int>(bids.size());
  std::vector<std::vector<Fiber>> fibers(nb);
  std::vector<std::vector<Warp>> warps(nb);
  // on the heap, not on this stack: exiting fibers read them after their last happens-before edge
  std::vector<std::unique_ptr<Block>> blocks(nb);
  std::unique_ptr<Cluster> cluster(new Cluster);
  cluster->dim = cdim;
  for (int k = 0; k < nb; ++k) {
    fibers[k] = std::vector<Fiber>(n);
    warps[k] = std::vector<Warp>(nw);
    blocks[k].reset(new Block);
    Block& b = *blocks[k];
    cluster->blocks.push_back(&b);
    b.block_idx = bids[k];
    b.cluster = cluster.get();
    b.cluster_rank = static_cast<unsigned>(k);
    b.block_dim = bdim;
    b.grid_dim = gdim;
    b.fibers = fibers[k].data();
    b.nthreads = n;
    b.warps = warps[k].data();
    b.nwarps = nw;
    b.live = n;
    b.body = &body;
    b.dyn_bytes = dyn_bytes;
    b.smem_limit = smem_limit;
    b.exit_sync = exit_sync;
#ifdef CUDA_EMU_TSAN
    b.tsan_sched = __tsan_get_current_fiber();
#endif
    b.dyn_smem = static_cast<unsigned char*>(std::malloc(dyn_bytes ? dyn_bytes : 1));
    fill_garbage(b.dyn_smem, dyn_bytes);
    for (int w = 0; w < nw; ++w) {
      warps[k][w].lanes = std::min(32, n - 32 * w);
      warps[k][w].expected = warps[k][w].lanes;
    }
    for (int i = 0; i < n; ++i) {
      Fiber& f = fibers[k][i];
      f.linear = i;
      f.tid = make_uint3(i % bdim.x, (i / bdim.x) % bdim.y, i / (bdim.x * bdim.y));
      f.stack = get_stack(k * n + i, &f.stack_size);
      make_context(f.ctx, f.stack, f.stack_size, trampoline);
#ifdef CUDA_EMU_TSAN
      f.tsan_fiber = __tsan_create_fiber(0);
#endif
    }
  }
  Block* prev = tl_block;

  // scheduling order over every fiber of the group: (block, thread)
  const int total = nb * n;
  std::vector<int> order(total);
  for (int i = 0; i < total; ++i) order[i] = i;
  const char* sched = std::getenv("CUDA_EMU_SCHED");
  std::string mode = sched ? sched : "linear";
  std::mt19937_64 rng;
  bool random = false;
  const uint3 bid = bids[0];
  if (mode == "reverse") {
    std::reverse(order.begin(), order.end());
  } else if (mode.rfind("random", 0) == 0) {
    random = true;
    const auto colon = mode.find(':');
    rng.seed((colon == std::string::npos ? 1 : std::strtoull(mode.c_str() + colon + 1, nullptr, 0)) * 1000003u +
             bid.x + 7919u * bid.y + 104729u * bid.z + 15485863u * static_cast<unsigned long long>(rt().launches));
  } else if (mode != "linear") {
    fail("CUDA_EMU_SCHED=%s: use linear, reverse or random:SEED", mode.c_str());
  }

  // One sweep resumes each runnable fiber of `span` (positions of `order`) once.  linear and
  // reverse run a cluster one block at a time: a block's fibers are swept until none of them can
  // progress (a cluster barrier, or the end), then the next block's, so one block runs as far
  // ahead of the others as CUDA allows (e.g. to its exit before another reads its shared memory
  // through map_shared_rank); random interleaves every fiber of the group.
  int done = 0;
  auto sweep = [&](int lo, int hi) {
    bool progress = false;
    for (int p = lo; p < hi; ++p) {
      const int gi = order[p];
      Block& b = *blocks[gi / n];
      Fiber& f = b.fibers[gi % n];
      const int s = f.state.load(std::memory_order_relaxed);
      if (s == kDone) continue;
      if (s == kWaitBlock && b.bar_gen.load(std::memory_order_relaxed) == f.wait_gen) continue;
      if (s == kWaitWarp && b.warps[(gi % n) >> 5].gen.load(std::memory_order_relaxed) == f.wait_gen) continue;
      if (s == kWaitCluster && cluster->gen.load(std::memory_order_relaxed) == f.wait_gen) continue;
      f.state.store(kRunnable, std::memory_order_relaxed);
      tl_block = &b;
      resume(b, f);
      progress = true;
      if (f.state.load(std::memory_order_relaxed) == kDone) {
        ++done;
        if (b.live == 0 && nb > 1) {  // its shared memory is gone: later DSMEM reads see garbage
          fill_garbage(b.dyn_smem, b.dyn_bytes);
          for (auto& kv : b.static_smem) fill_garbage(kv.second.first, kv.second.second);
        }
      }
    }
    return progress;
  };
  while (done < total) {
    if (random) std::shuffle(order.begin(), order.end(), rng);
    bool progress = false;
    if (random || nb == 1) {
      progress = sweep(0, total);
    } else {
      for (int k = 0; k < nb; ++k)
        while (sweep(k * n, (k + 1) * n)) progress = true;
    }
    if (!progress && done < total) {
      report_line("cuda_emu: deadlock in block (%u,%u,%u)%s; waiting threads:", bid.x, bid.y, bid.z,
                  nb > 1 ? " and the rest of its cluster" : "");
      int shown = 0;
      for (int gi = 0; gi < total && shown < 16; ++gi) {
        const Fiber& f = blocks[gi / n]->fibers[gi % n];
        const int s = f.state.load();
        if (s == kDone) continue;
        report_line("  block %d thread %d: %s at %s:%d", gi / n, gi % n,
                    s == kWaitBlock ? "__syncthreads" : s == kWaitCluster ? "cluster barrier" : "warp collective",
                    f.file, f.line);
        ++shown;
      }
      fail("deadlock (barrier divergence)");
    }
  }
  tl_block = prev;
  for (int k = 0; k < nb; ++k) {
    Block& b = *blocks[k];
    close_interval(b);
    rt().blocks.push_back(
        {b.barriers, b.shfl_path, b.shfl_ops_path, b.shfl_ops, b.ldg_path, b.ldg_total, b.ldg_site_path,
         b.cluster_barriers});
  }
#ifdef CUDA_EMU_TSAN
  for (int k = 0; k < nb; ++k)
    for (int i = 0; i < n; ++i) __tsan_destroy_fiber(fibers[k][i].tsan_fiber);
  AnnotateIgnoreWritesBegin(__FILE__, __LINE__);  // freeing smem is not a kernel access
#endif
  for (int k = 0; k < nb; ++k) {
    for (auto& kv : blocks[k]->static_smem) std::free(kv.second.first);
    std::free(blocks[k]->dyn_smem);
  }
#ifdef CUDA_EMU_TSAN
  AnnotateIgnoreWritesEnd(__FILE__, __LINE__);
#endif
}

// ------------------------------------------------------------------ launch
struct LaunchCfg {
  dim3 grid, block;
  std::size_t smem;
  cudaStream_t stream;
  dim3 cluster{1, 1, 1};
};

template <typename... A>
struct PendingLaunch {
  LaunchCfg cfg;
  std::tuple<A...> args;
};

struct CfgBuilder {
  LaunchCfg cfg;
  template <typename... A>
  PendingLaunch<std::decay_t<A>...> args(A&&... a) const {
    return {cfg, std::tuple<std::decay_t<A>...>(std::forward<A>(a)...)};
  }
};

inline CfgBuilder launch_config(dim3 grid, dim3 block, std::size_t smem = 0, cudaStream_t stream = nullptr) {
  return CfgBuilder{LaunchCfg{grid, block, smem, stream, dim3(1, 1, 1)}};
}

// One JSON line per launch to CUDA_EMU_COUNTS (read at every launch, so a process may switch it
// on and off): grid, block, dynamic smem, parameter count (tells the kernels apart), and the
// counters of every block (close_interval).
inline void write_counts(const LaunchCfg& c, std::size_t nparams) {
  const char* path = std::getenv("CUDA_EMU_COUNTS");
  if (!path || !*path) return;
  FILE* f = std::fopen(path, "a");
  if (!f) fail("CUDA_EMU_COUNTS=%s: cannot open for appending", path);
  std::fprintf(f, "{\"grid\": [%u, %u, %u], \"block\": [%u, %u, %u], \"cluster\": [%u, %u, %u], \"smem\": %zu, "
               "\"params\": %zu, \"blocks\": [", c.grid.x, c.grid.y, c.grid.z, c.block.x, c.block.y, c.block.z,
               c.cluster.x, c.cluster.y, c.cluster.z, c.smem, nparams);
  const auto& bl = rt().blocks;
  for (std::size_t i = 0; i < bl.size(); ++i)
    std::fprintf(f, "%s{\"barriers\": %ld, \"shfl_path\": %ld, \"shfl_ops_path\": %ld, \"shfl_ops\": %ld, "
                 "\"ldg_path\": %ld, \"ldg_total\": %ld, \"ldg_site_path\": %ld, \"cluster_barriers\": %ld}",
                 i ? ", " : "", bl[i].barriers, bl[i].shfl_path, bl[i].shfl_ops_path, bl[i].shfl_ops, bl[i].ldg_path,
                 bl[i].ldg_total, bl[i].ldg_site_path, bl[i].cluster_barriers);
  std::fprintf(f, "]}\n");
  std::fclose(f);
}

template <typename... P>
void launch(void (*kernel)(P...), const LaunchCfg& c, std::tuple<std::decay_t<P>...> params) {
  Runtime& r = rt();
  ++r.launches;
  const unsigned long long threads = 1ull * c.block.x * c.block.y * c.block.z;
  if (threads == 0 || threads > 1024 || c.block.z > 64 || c.grid.x == 0 || c.grid.y == 0 || c.grid.z == 0 ||
      c.grid.y > 65535 || c.grid.z > 65535) {
    r.last_error = cudaErrorInvalidConfiguration;
    return;
  }
  const auto it = r.max_dyn_smem.find(reinterpret_cast<const void*>(kernel));
  const std::size_t dyn_limit = it != r.max_dyn_smem.end() ? static_cast<std::size_t>(it->second) : 48 * 1024;
  if (c.smem > dyn_limit) {
    r.last_error = cudaErrorInvalidValue;  // what the runtime reports for too much dynamic smem
    return;
  }
  const std::size_t limit = std::max<std::size_t>(48 * 1024, static_cast<std::size_t>(smem_optin()));
  std::function<void()> body = [&]() { std::apply(kernel, params); };
  // Blocks run one after another, but no happens-before joins them until the launch ends: a
  // race between two blocks (e.g. overlapping scratch) is reported under TSan.
  char exit_sync = 0;
  r.blocks.clear();
  // clusters one after another; inside one, its blocks by rank (x fastest), as one group
  const dim3 cl = c.cluster;
  std::vector<uint3> ids;
  for (unsigned cz = 0; cz < c.grid.z; cz += cl.z)
    for (unsigned cy = 0; cy < c.grid.y; cy += cl.y)
      for (unsigned cx = 0; cx < c.grid.x; cx += cl.x) {
        ids.clear();
        for (unsigned z = 0; z < cl.z; ++z)
          for (unsigned y = 0; y < cl.y; ++y)
            for (unsigned x = 0; x < cl.x; ++x) ids.push_back(make_uint3(cx + x, cy + y, cz + z));
        run_group(ids, cl, c.block, c.grid, c.smem, limit, body, &exit_sync);
      }
  hb_acquire(&exit_sync);
  write_counts(c, sizeof...(P));
}

// cudaLaunchKernelEx (a macro below: the runtime header's template would go through the untyped
// C API): the launch attributes the kernels use, the cluster dimension only.  Errors as the
// runtime reports them: cudaErrorInvalidClusterSize for a grid that is not a whole number of
// clusters or a cluster above 8 blocks (16 with cudaFuncAttributeNonPortableClusterSizeAllowed),
// cudaErrorInvalidValue for any other attribute.
template <typename... P, typename... A>
cudaError_t launch_ex(const cudaLaunchConfig_t* cfg, void (*kernel)(P...), A&&... a) {
  static_assert(sizeof...(P) == sizeof...(A), "kernel launched with the wrong number of arguments");
  Runtime& r = rt();
  LaunchCfg c{cfg->gridDim, cfg->blockDim, cfg->dynamicSmemBytes, cfg->stream, dim3(1, 1, 1)};
  for (unsigned i = 0; i < cfg->numAttrs; ++i) {
    if (cfg->attrs[i].id != cudaLaunchAttributeClusterDimension) return r.last_error = cudaErrorInvalidValue;
    c.cluster = dim3(cfg->attrs[i].val.clusterDim.x, cfg->attrs[i].val.clusterDim.y, cfg->attrs[i].val.clusterDim.z);
  }
  const unsigned long long size = 1ull * c.cluster.x * c.cluster.y * c.cluster.z;
  const auto np = r.nonportable_cluster.find(reinterpret_cast<const void*>(kernel));
  const unsigned long long most = np != r.nonportable_cluster.end() && np->second ? 16 : 8;
  if (size == 0 || size > most || (size > 1 && cc_major() < 9) || c.grid.x % c.cluster.x || c.grid.y % c.cluster.y ||
      c.grid.z % c.cluster.z)
    return r.last_error = cudaErrorInvalidClusterSize;
  launch(kernel, c, std::tuple<std::decay_t<P>...>(std::forward<A>(a)...));
  return r.last_error;
}

// `kernel<<<cfg>>>(args)` is rewritten by cu_rewrite.py to `kernel | launch_config(cfg).args(args)`.
template <typename... P, typename... A>
void operator|(void (*kernel)(P...), PendingLaunch<A...>&& pl) {
  static_assert(sizeof...(P) == sizeof...(A), "kernel launched with the wrong number of arguments");
  launch(kernel, pl.cfg,
         std::apply([](auto&... a) { return std::tuple<std::decay_t<P>...>(a...); }, pl.args));
}

}  // namespace cuda_emu

// ------------------------------------------------------------------ built-in variables
#define threadIdx (::cuda_emu::self().tid)
#define blockIdx (::cuda_emu::block().block_idx)
#define blockDim (::cuda_emu::block().block_dim)
#define gridDim (::cuda_emu::block().grid_dim)
#ifndef warpSize
#define warpSize 32
#endif

#define cudaLaunchKernelEx(cfg, kernel, ...) ::cuda_emu::launch_ex(cfg, kernel, __VA_ARGS__)

// ------------------------------------------------------------------ cooperative groups (clusters)
// The subset of cooperative_groups the kernels use for thread-block clusters (greedy.cu includes
// the real header only under nvcc): sync() is the emulator's cluster barrier, map_shared_rank()
// its distributed shared memory (cluster_sync, map_shared); both report the caller's line.
namespace cooperative_groups {
struct cluster_group {
  void sync(const char* file = __builtin_FILE(), int line = __builtin_LINE()) const {
    ::cuda_emu::cluster_sync(file, line);
  }
  unsigned block_rank() const { return ::cuda_emu::block().cluster_rank; }
  unsigned num_blocks() const { return static_cast<unsigned>(::cuda_emu::block().cluster->blocks.size()); }
  dim3 dim_blocks() const { return ::cuda_emu::block().cluster->dim; }
  template <typename T>
  T* map_shared_rank(T* p, unsigned rank, const char* file = __builtin_FILE(), int line = __builtin_LINE()) const {
    return static_cast<T*>(::cuda_emu::map_shared(p, rank, file, line));
  }
};
inline cluster_group this_cluster() { return cluster_group{}; }
}  // namespace cooperative_groups

// ------------------------------------------------------------------ intrinsics
#define __syncthreads() ::cuda_emu::syncthreads(__FILE__, __LINE__)
#define __syncwarp(...) ::cuda_emu::syncwarp(__FILE__, __LINE__, ##__VA_ARGS__)
namespace cuda_emu {
template <typename T> inline T shfl_w(ShflMode m, const char* f, int l, unsigned mask, T v, int a, int width = 32) {
  return shfl<T>(m, f, l, mask, v, a, width);
}
}  // namespace cuda_emu
#define __shfl_sync(mask, v, ...) ::cuda_emu::shfl_w(::cuda_emu::kIdx, __FILE__, __LINE__, mask, v, __VA_ARGS__)
#define __shfl_up_sync(mask, v, ...) ::cuda_emu::shfl_w(::cuda_emu::kUp, __FILE__, __LINE__, mask, v, __VA_ARGS__)
#define __shfl_down_sync(mask, v, ...) ::cuda_emu::shfl_w(::cuda_emu::kDown, __FILE__, __LINE__, mask, v, __VA_ARGS__)
#define __shfl_xor_sync(mask, v, ...) ::cuda_emu::shfl_w(::cuda_emu::kXor, __FILE__, __LINE__, mask, v, __VA_ARGS__)

// unsigned operands only (the kernels use no other overload)
#define __reduce_max_sync(mask, v) \
  ::cuda_emu::warp_collective(::cuda_emu::kRedMax, __FILE__, __LINE__, mask, static_cast<unsigned>(v))
#define __reduce_min_sync(mask, v) \
  ::cuda_emu::warp_collective(::cuda_emu::kRedMin, __FILE__, __LINE__, mask, static_cast<unsigned>(v))
#define __ballot_sync(mask, pred) \
  ::cuda_emu::warp_collective(::cuda_emu::kBallot, __FILE__, __LINE__, mask, (pred) ? 1u : 0u)
inline int __popc(unsigned v) { return __builtin_popcount(v); }
inline int __ffs(int v) { return __builtin_ffs(v); }
template <typename T>
inline T __ldg(const T* p, int line = __builtin_LINE()) {
  {
    ::cuda_emu::Internal guard;
    ::cuda_emu::Block& b = ::cuda_emu::block();
    ::cuda_emu::Fiber& f = *b.cur.load(std::memory_order_relaxed);
    ++f.ldg;
    ++b.ldg_total;
    bool seen = false;
    for (int j = 0; j < f.nsites && j < 16; ++j) seen = seen || f.ldg_sites[j] == line;
    if (!seen) {
      if (f.nsites < 16) f.ldg_sites[f.nsites] = line;
      ++f.nsites;
    }
  }
  return *p;
}
inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
inline int __float_as_int(float f) { int u; std::memcpy(&u, &f, 4); return u; }
inline float __int_as_float(int u) { float f; std::memcpy(&f, &u, 4); return f; }
// Correctly rounded, never contracted into an FMA (build with -ffp-contract=off; no -mfma needed).
inline float __fmul_rn(float a, float b) { volatile float r = a * b; return r; }
inline float __fadd_rn(float a, float b) { volatile float r = a + b; return r; }
inline float __fsub_rn(float a, float b) { volatile float r = a - b; return r; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }
// Atomics: fibers of a block run on one OS thread and blocks run one after another, so a plain
// read-modify-write is atomic here.
template <typename T> inline T atomicAdd(T* p, T v) { T o = *p; *p = o + v; return o; }
template <typename T> inline T atomicMax(T* p, T v) { T o = *p; *p = o < v ? v : o; return o; }
template <typename T> inline T atomicMin(T* p, T v) { T o = *p; *p = v < o ? v : o; return o; }
template <typename T> inline T atomicExch(T* p, T v) { T o = *p; *p = v; return o; }
template <typename T> inline T atomicCAS(T* p, T cmp, T v) { T o = *p; if (o == cmp) *p = v; return o; }
inline void __threadfence() {}
inline void __threadfence_block() {}

// Declarations rewritten by cu_rewrite.py.
#define CUDA_EMU_SHARED(T, name, dims)     \
  static char name##_cuda_emu_key;         \
  auto& name = ::cuda_emu::static_smem<T dims>(&name##_cuda_emu_key)
#define CUDA_EMU_EXTERN_SHARED(T, name) T* name = ::cuda_emu::dynamic_smem<T>()

// ------------------------------------------------------------------ runtime API subset
// Weak definitions: no libcudart is linked; the header may be included in several objects.
extern "C" {
__attribute__((weak)) cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
__attribute__((weak)) cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  if (device != 0) return cudaErrorInvalidDevice;
  switch (attr) {
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = ::cuda_emu::smem_optin(); return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlock: *value = 48 * 1024; return cudaSuccess;
    case cudaDevAttrMaxThreadsPerBlock: *value = 1024; return cudaSuccess;
    case cudaDevAttrWarpSize: *value = 32; return cudaSuccess;
    case cudaDevAttrMultiProcessorCount: *value = ::cuda_emu::sm_count(); return cudaSuccess;
    case cudaDevAttrComputeCapabilityMajor: *value = ::cuda_emu::cc_major(); return cudaSuccess;
    case cudaDevAttrComputeCapabilityMinor: *value = 0; return cudaSuccess;
    case cudaDevAttrClusterLaunch: *value = ::cuda_emu::cc_major() >= 9 ? 1 : 0; return cudaSuccess;
    default: return cudaErrorInvalidValue;
  }
}
__attribute__((weak)) cudaError_t cudaFuncSetAttribute(const void* func, cudaFuncAttribute attr, int value) {
  if (attr == cudaFuncAttributeNonPortableClusterSizeAllowed) {
    if (::cuda_emu::cc_major() < 9) return cudaErrorInvalidValue;
    ::cuda_emu::rt().nonportable_cluster[func] = value;
    return cudaSuccess;
  }
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaErrorInvalidValue;
  if (value < 0 || value > ::cuda_emu::smem_optin()) return cudaErrorInvalidValue;
  ::cuda_emu::rt().max_dyn_smem[func] = value;
  return cudaSuccess;
}
// Clusters that fit at once: one block per SM (the kernels' 1024-thread blocks), so SMs / size; an
// H100's GPCs (16-18 SMs) hold one 16-block cluster each.  Size 0 or above the kernel's limit: 0.
__attribute__((weak)) cudaError_t cudaOccupancyMaxActiveClusters(int* num, const void* func,
                                                                  const cudaLaunchConfig_t* cfg) {
  unsigned size = 1;
  for (unsigned i = 0; i < cfg->numAttrs; ++i)
    if (cfg->attrs[i].id == cudaLaunchAttributeClusterDimension)
      size = cfg->attrs[i].val.clusterDim.x * cfg->attrs[i].val.clusterDim.y * cfg->attrs[i].val.clusterDim.z;
  const auto np = ::cuda_emu::rt().nonportable_cluster.find(func);
  const unsigned most = np != ::cuda_emu::rt().nonportable_cluster.end() && np->second ? 16 : 8;
  *num = size == 0 || size > most || ::cuda_emu::cc_major() < 9 ? 0 : ::cuda_emu::sm_count() / static_cast<int>(size);
  return cudaSuccess;
}
__attribute__((weak)) cudaError_t cudaGetLastError(void) {
  const cudaError_t e = ::cuda_emu::rt().last_error;
  ::cuda_emu::rt().last_error = cudaSuccess;
  return e;
}
__attribute__((weak)) cudaError_t cudaPeekAtLastError(void) { return ::cuda_emu::rt().last_error; }
__attribute__((weak)) cudaError_t cudaDeviceSynchronize(void) { return cudaSuccess; }
__attribute__((weak)) cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }
__attribute__((weak)) const char* cudaGetErrorName(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    case cudaErrorInvalidDevice: return "cudaErrorInvalidDevice";
    case cudaErrorInvalidClusterSize: return "cudaErrorInvalidClusterSize";
    default: return "cudaErrorUnknown(emulated)";
  }
}
__attribute__((weak)) const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorInvalidDevice: return "invalid device ordinal";
    case cudaErrorInvalidClusterSize: return "invalid cluster size";
    default: return "unknown error (cuda_emu)";
  }
}
}  // extern "C"

// C++ overload of the runtime (cuda_runtime.h declares it only under nvcc).
template <class T>
inline cudaError_t cudaFuncSetAttribute(T* func, cudaFuncAttribute attr, int value) {
  return cudaFuncSetAttribute(reinterpret_cast<const void*>(func), attr, value);
}
