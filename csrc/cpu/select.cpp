// Greedy selection kernels, one image per task, images spread over threads
// (OpenMP: torch's own intra-op threads, see run_crews).
//
// Similarity strategy: Gram-free.  A greedy step only needs sim(pick, i) for
// the tokens still in play, so each step computes one row of dot products
// (n_active x D, from the per-thread cache) instead of materialising the N x N
// Gram matrix up front: K*N*D instead of N^2*D work, and the working set is the
// normalised image (N*D) rather than N^2.  DivPrune's first step needs
// max_{j != i} sim(i, j) only for its argmin: a band lower bound prunes the
// tokens that cannot win, the rest get exact rows (fallback: the triangular
// Gram pass in cache-sized blocks with a register-tiled kernel, never
// stored).  See csrc/README.md for the measurement.
#include "select.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <limits>
#include <mutex>
#include <new>
#include <numeric>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include <omp.h>
#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "dots.h"

namespace mmrprune {
namespace {

constexpr double NORM_EPS = 1e-12;  // reference.NORM_EPS
constexpr double DPP_EPS = 1e-6;    // reference.DPP_EPS

float half_to_float(uint16_t h) {
  const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t man = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0) {
    if (man == 0) {
      bits = sign;
    } else {  // subnormal: renormalise
      exp = 127 - 15 + 1;
      while (!(man & 0x400u)) {
        man <<= 1;
        --exp;
      }
      bits = sign | (exp << 23) | ((man & 0x3ffu) << 13);
    }
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | (man << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

float bf16_to_float(uint16_t h) {
  const uint32_t bits = (uint32_t)h << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// RowBuffer storage kept between calls, up to SCRATCH_CACHE_LIMIT bytes: a
// block whose pages are already mapped costs nothing to reuse, while a fresh
// one is faulted in and zeroed by the kernel on first touch.  Measured at
// B = 1, N = 2691, D = 3584, bf16, k = 673 (2-core machine, both builds in one
// run): without the cache 110 ms with 1 thread and 72 ms with 2 (1.53x); with
// it 93 ms and 49 ms (1.89x).  release_scratch() hands the blocks back.
class BlockCache {
 public:
  static BlockCache& get() {
    static BlockCache cache;
    return cache;
  }
  // the smallest cached block of at least `bytes` (its size written to `bytes`), or nullptr
  void* take(size_t& bytes) {
    std::lock_guard<std::mutex> lock(mu_);
    size_t best = blocks_.size();
    for (size_t b = 0; b < blocks_.size(); ++b)
      if (blocks_[b].second >= bytes && (best == blocks_.size() || blocks_[b].second < blocks_[best].second)) best = b;
    if (best == blocks_.size()) return nullptr;
    void* p = blocks_[best].first;
    bytes = blocks_[best].second;
    blocks_.erase(blocks_.begin() + (std::ptrdiff_t)best);
    held_ -= bytes;
    return p;
  }
  // keeps the block if it fits under the limit, else frees it
  void give(void* p, size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (held_ + bytes <= SCRATCH_CACHE_LIMIT) {
        blocks_.emplace_back(p, bytes);
        held_ += bytes;
        return;
      }
    }
    std::free(p);
  }
  size_t held() {
    std::lock_guard<std::mutex> lock(mu_);
    return held_;
  }
  size_t release() {
    std::vector<std::pair<void*, size_t>> blocks;
    size_t freed;
    {
      std::lock_guard<std::mutex> lock(mu_);
      blocks.swap(blocks_);
      freed = held_;
      held_ = 0;
    }
    for (auto& b : blocks) std::free(b.first);
    return freed;
  }

 private:
  std::mutex mu_;
  std::vector<std::pair<void*, size_t>> blocks_;
  size_t held_ = 0;
};

// The [n, D] normalised image: the one large buffer (38 MB for 2691 x 3584
// float32).  A zero-filled std::vector spent ~19 ms of system time per call at
// that shape in ~9,400 serial 4 KiB page faults, a fifth of a whole 673-pick
// selection.  So the buffer is left uninitialised (its first touch is the
// parallel row load, which writes every element once), comes from the
// BlockCache, and is 2 MiB-aligned and marked for transparent huge pages on
// Linux (a few faults instead of thousands where THP is on, and fewer TLB
// misses when the greedy loop reads rows at random).
template <class T>
class RowBuffer {
 public:
  RowBuffer() = default;
  RowBuffer(const RowBuffer&) = delete;
  RowBuffer& operator=(const RowBuffer&) = delete;
  ~RowBuffer() {
    if (data_) BlockCache::get().give(data_, capacity_ * sizeof(T));
  }
  T* data() { return data_; }
  // room for `count` elements; the contents are undefined after a growth.  The outgrown
  // block is freed first, not cached: a thread then holds one block at a time, so a call
  // over images of growing sizes needs one block of the largest per thread (the workspace
  // estimate, mmrprune/workspace.py), not the sum of every size it passed through.
  void reserve(size_t count) {
    if (count <= capacity_) return;
    std::free(data_);
    data_ = nullptr;
    capacity_ = 0;
    size_t bytes = (count * sizeof(T) + SCRATCH_ALIGN - 1) / SCRATCH_ALIGN * SCRATCH_ALIGN;
    void* p = BlockCache::get().take(bytes);
    if (!p) {
      p = std::aligned_alloc(SCRATCH_ALIGN, bytes);
      if (!p) throw std::bad_alloc();
#if defined(__linux__) && defined(MADV_HUGEPAGE)
      madvise(p, bytes, MADV_HUGEPAGE);  // advice only: a kernel without THP ignores it
#endif
    }
    data_ = static_cast<T*>(p);
    capacity_ = bytes / sizeof(T);
  }

 private:
  T* data_ = nullptr;
  size_t capacity_ = 0;
};

// Per-thread scratch, reused across the images a thread handles.
template <class T>
struct Workspace {
  RowBuffer<T> xn;         // [n, D] normalised rows of the image (x̂)
  std::vector<T> sim;      // [n] sims of the current pick to the active tokens (by active slot)
  std::vector<T> m;        // [n] MMR: max sim to the picked set; DPP: d^2
  std::vector<T> cis;      // DPP: [n, k] Cholesky rows c_i, token-major
  std::vector<int32_t> active;  // tokens still in play, ascending
  std::vector<int32_t> order;   // importance ranking
  std::vector<uint8_t> flag;    // d2pruner pool / selected
  std::vector<uint8_t> flag2;
};

// x̂_i = x_i / max(||x_i||, 1e-12), converted to T on the way (no full-batch upcast).
template <class T>
void load_normalized(const SelectArgs& a, int64_t first_row, int64_t n, T* dst, DotsFn<T> dots) {
  const int64_t D = a.dim;
  for (int64_t i = 0; i < n; ++i) {
    T* out = dst + i * D;
    const int64_t r = first_row + i;
    switch (a.dtype) {
      case DType::F32: {
        const float* src = static_cast<const float*>(a.rows) + r * D;
        for (int64_t d = 0; d < D; ++d) out[d] = (T)src[d];
        break;
      }
      case DType::F64: {
        const double* src = static_cast<const double*>(a.rows) + r * D;
        for (int64_t d = 0; d < D; ++d) out[d] = (T)src[d];
        break;
      }
      case DType::F16: {
        const uint16_t* src = static_cast<const uint16_t*>(a.rows) + r * D;
        for (int64_t d = 0; d < D; ++d) out[d] = (T)half_to_float(src[d]);
        break;
      }
      case DType::BF16: {
        const uint16_t* src = static_cast<const uint16_t*>(a.rows) + r * D;
        for (int64_t d = 0; d < D; ++d) out[d] = (T)bf16_to_float(src[d]);
        break;
      }
    }
    T ss;
    dots(out, out, D, D, nullptr, 1, &ss);  // ||x||^2 in the compute type, vectorised
    const T norm = (T)std::max(std::sqrt((double)ss), NORM_EPS);
    for (int64_t d = 0; d < D; ++d) out[d] = out[d] / norm;
  }
}

// Token indices by decreasing Imp, ties to the lowest index (reference._importance_order).
template <class T>
void importance_order(const T* imp, int64_t n, std::vector<int32_t>& order) {
  order.resize(n);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [imp](int32_t x, int32_t y) { return imp[x] > imp[y]; });
}

template <class T>
struct ImageJob {
  const T* xn;
  int64_t n, D, k;
  const T* imp;
  const T* q;
  int64_t* out;
  DotsFn<T> dots;
  GramFn<T> gram;
};

void remove_sorted(std::vector<int32_t>& v, int32_t x) {
  v.erase(std::lower_bound(v.begin(), v.end(), x));
}

// Helper threads for one image (B = 1 with spare threads): parallel loops over
// small task lists, run many times per image (once per lazy-refresh batch).
// Helpers spin on a ticket between calls -- a call costs a cache-line round trip,
// not a thread start -- and yield while they wait.  Tasks are claimed from the
// ticket (generation | task count | next task) by compare-and-swap, and the
// caller runs tasks too: a helper that is not scheduled in time (a loaded
// machine) delays nothing, the caller just takes its tasks.  run() returns when
// every task of its call is done.  With no helpers, run() is a plain loop.
// The threads come from run_crews() below; a helper serves until stop().
class SpinCrew {
 public:
  SpinCrew() = default;
  SpinCrew(const SpinCrew&) = delete;
  SpinCrew& operator=(const SpinCrew&) = delete;
  int size() const { return helpers_ + 1; }
  void set_helpers(int helpers) { helpers_ = helpers; }  // by the caller, before its first run()

  // fn(task) for task in [0, n), n <= MAX_TASKS, the caller taking part; fn must not throw.
  template <class F>
  void run(int64_t n, F&& fn) {
    if (helpers_ == 0 || n <= 1) {
      for (int64_t i = 0; i < n; ++i) fn(i);
      return;
    }
    ctx_ = &fn;
    call_ = [](void* ctx, int64_t i) { (*static_cast<F*>(ctx))(i); };
    done_.store(0, std::memory_order_relaxed);
    const uint64_t gen = (ticket_.load(std::memory_order_relaxed) / GEN + 1) * GEN;
    ticket_.store(gen | ((uint64_t)n << 20), std::memory_order_release);  // publishes ctx_, call_
    work(gen);
    while (done_.load(std::memory_order_acquire) < n) std::this_thread::yield();
  }
  // a helper's loop: take tasks of every run() until stop()
  void serve() {
    uint64_t seen = 0;
    while (true) {
      uint64_t gen;
      while ((gen = ticket_.load(std::memory_order_acquire) & ~(GEN - 1)) == seen) std::this_thread::yield();
      seen = gen;
      if (stop_.load(std::memory_order_relaxed)) return;
      work(gen);
    }
  }
  // by the caller, once it has no more work for the helpers: their serve() returns (they
  // leave the busy-wait for the OpenMP region's end, where libgomp puts them to sleep), and
  // later run() calls are plain loops.  Idempotent.
  void stop() {
    helpers_ = 0;
    stop_.store(true, std::memory_order_relaxed);
    ticket_.fetch_add(GEN, std::memory_order_release);  // a new generation with no tasks wakes them
  }
  static constexpr int64_t MAX_TASKS = (1 << 20) - 1;

 private:
  static constexpr uint64_t GEN = 1ull << 40;  // ticket = generation * GEN | n_tasks << 20 | next task
  static constexpr uint64_t MASK = (1ull << 20) - 1;

  void work(uint64_t gen) {
    uint64_t t = ticket_.load(std::memory_order_acquire);
    while ((t & ~(GEN - 1)) == gen && (t & MASK) < ((t >> 20) & MASK)) {
      if (ticket_.compare_exchange_weak(t, t + 1, std::memory_order_acquire)) {
        call_(ctx_, (int64_t)(t & MASK));  // the caller waits for this task: ctx_ stays valid
        done_.fetch_add(1, std::memory_order_release);
        t = ticket_.load(std::memory_order_acquire);
      }
    }
  }
  int helpers_ = 0;
  std::atomic<uint64_t> ticket_{0};
  std::atomic<int64_t> done_{0};
  std::atomic<bool> stop_{false};
  void* ctx_ = nullptr;
  void (*call_)(void*, int64_t) = nullptr;
};

// body(crew) on `groups` callers at once, each caller with a crew of up to
// `per_group - 1` helpers; returns when every caller is done, rethrowing the
// first exception a caller threw.
//
// The threads are one OpenMP parallel region.  OpenMP, not std::thread: the
// extension links libgomp.so.1, which resolves to the copy torch has already
// loaded, so these are torch's own intra-op threads.  After any torch op those
// threads busy-wait for a few ms; threads of our own would compete with them
// for the cores instead of reusing them.  Measured at B = 1, N = 2691,
// D = 3584, bf16, k = 673 on the 2-core machine, right after torch's aminmax
// (the validation scan): std::thread helpers took ~9 ms longer than with
// OMP_WAIT_POLICY=passive, which stops the busy-waiting.
//
// Thread t serves group t / per_group; rank 0 of a group is its caller.  The
// runtime may give fewer threads than asked (a nested call gets one): a group
// then has fewer helpers or no caller, and the callers that exist share the
// work (they take it from a shared counter).
template <class F>
void run_crews(int groups, int per_group, F&& body) {
  std::vector<SpinCrew> crews(groups);
  std::exception_ptr error;
  std::mutex error_mu;
#pragma omp parallel num_threads(groups * per_group)
  {
    const int tid = omp_get_thread_num(), nth = omp_get_num_threads();
    SpinCrew& crew = crews[tid / per_group];
    if (tid % per_group == 0) {
      crew.set_helpers(std::min(per_group, nth - tid) - 1);
      try {
        body(crew);
      } catch (...) {
        std::lock_guard<std::mutex> lock(error_mu);
        if (!error) error = std::current_exception();
      }
      crew.stop();
    } else {
      crew.serve();
    }
  }
  if (error) std::rethrow_exception(error);
}

// MMR / FPS / hybrid / DivPrune (reference.select_mmr, select_hybrid, select_divprune).
// Step 1 maximises first_score (Imp when null) over the eligible tokens; step t
// maximises lam * Imp_i - (1 - lam) * m_i, m_i = max_{j in S} sim(i, j).
// `ws.active` holds the eligible tokens on entry.
//
// Lazy greedy (Minoux): m_i only grows, so a token's score computed against
// the first few picks is an upper bound of its current score.  Tokens sit in a
// max-heap by (stale score, lowest index); the top is brought up to date with
// the picks it has not seen yet, and is the step's argmax as soon as its fresh
// score still beats the next stale bound.  Every sim is the same dot product
// (same kernel, same summation order) as in the eager loop and max is
// order-free, so the picks are bit-identical to computing all N sims per step;
// most tokens are never refreshed against most picks.
template <class T>
void greedy_max_similarity(const ImageJob<T>& J, Workspace<T>& ws, SpinCrew& crew, T lam, const T* first_score,
                           int32_t first_pick = -1) {
  auto& active = ws.active;
  T* m = ws.m.data();
  T* sim = ws.sim.data();
  const T* imp = J.imp;
  const T one_minus_lam = (T)1 - lam;
  // step 1: first_pick if given, else plain argmax of first_score; then every eligible token sees it
  int32_t first = first_pick;
  if (first < 0) {
    const T* s0 = first_score ? first_score : imp;
    T best = -std::numeric_limits<T>::infinity();
    for (int32_t i : active) {
      if (first < 0 || s0[i] > best) {  // strict >, ascending scan: ties go to the lowest index
        best = s0[i];
        first = i;
      }
    }
  }
  J.out[0] = first;
  remove_sorted(active, first);
  if (J.k == 1) return;
  {
    // sim(first, i) for every eligible token, in slices over the crew (each sim is one
    // independent dot product: the same bits however the slices fall)
    const int64_t na = (int64_t)active.size(), slices = std::min<int64_t>(na, 4 * crew.size());
    crew.run(slices, [&](int64_t c) {
      const int64_t a0 = na * c / slices, a1 = na * (c + 1) / slices;
      J.dots(J.xn + (int64_t)first * J.D, J.xn, J.D, J.D, active.data() + a0, a1 - a0, sim + a0);
    });
  }
  std::vector<int32_t> picks{first};
  std::vector<int32_t> seen(J.n, 0);  // picks[0 .. seen[i]) already folded into m_i
  struct Entry {
    T score;
    int32_t i;
  };
  // heap order: higher score first, then lower index (the contract's tie rule)
  auto below = [](const Entry& x, const Entry& y) { return x.score < y.score || (x.score == y.score && x.i > y.i); };
  std::vector<Entry> heap;
  heap.reserve(active.size());
  for (size_t a = 0; a < active.size(); ++a) {
    const int32_t i = active[a];
    m[i] = sim[a];
    seen[i] = 1;
    heap.push_back({lam * imp[i] - one_minus_lam * m[i], i});
  }
  std::make_heap(heap.begin(), heap.end(), below);
  // Stale tops are refreshed in batches: one per crew member (just the top with no
  // crew).  A refresh is exact whichever thread does it, and a token refreshed
  // early only has a tighter bound, so the picks do not depend on the batching.
  const int64_t batch_max = crew.size() == 1 ? 1 : 2 * crew.size();
  std::vector<Entry> batch;
  struct Chunk {
    int32_t entry, u0, u1;  // batch entry, and the range [u0, u1) of the picks it has not seen
  };
  // 32 sims ~ 6 us of work at D = 3584: claiming a piece costs ~0.1 us.  Measured at
  // B = 1, N = 2691, D = 3584, k = 673 (C++ call alone, 2 threads vs 1): whole tokens as
  // tasks 1.52x; pieces of 16 / 32 / 64 sims 1.78x / 1.86x / 1.89x.  No crew: no cutting.
  // A batch owes at most batch_max * k sims, so with pieces of at least
  // batch_max * k / (MAX_TASKS / 2) there are at most MAX_TASKS / 2 + batch_max of them.
  const int64_t half = SpinCrew::MAX_TASKS / 2;
  const int64_t chunk = crew.size() == 1 ? std::max<int64_t>(J.k, 1)
                                         : std::max<int64_t>(32, (batch_max * J.k + half - 1) / half);
  std::vector<Chunk> chunks;
  std::vector<T> batch_sims((size_t)batch_max * (size_t)J.k);  // a refresh's sims, one slice per batch entry
  for (int64_t t = 1; t < J.k; ++t) {
    const int32_t fresh = (int32_t)picks.size();
    // an up-to-date top has an exact score that beats every other token's bound
    // (ties: the heap orders equal scores by lowest index): it is the step's argmax
    while (seen[heap.front().i] < fresh) {
      batch.clear();
      while ((int64_t)batch.size() < batch_max && !heap.empty() && seen[heap.front().i] < fresh) {
        std::pop_heap(heap.begin(), heap.end(), below);
        batch.push_back(heap.back());
        heap.pop_back();
      }
      // the batch's dot products, cut into pieces of at most CHUNK: one token can owe
      // hundreds of sims and its neighbour three, so whole tokens balance badly
      chunks.clear();
      for (size_t e = 0; e < batch.size(); ++e) {
        const int64_t todo = fresh - seen[batch[e].i];
        for (int64_t u0 = 0; u0 < todo; u0 += chunk)
          chunks.push_back({(int32_t)e, (int32_t)u0, (int32_t)std::min(todo, u0 + chunk)});
      }
      crew.run((int64_t)chunks.size(), [&](int64_t c) {
        // sim(i, pick) for the picks token i has not seen; x̂_i · x̂_pick and x̂_pick · x̂_i
        // are the same bits (commuted products, same lanes, same summation order)
        const Chunk& ch = chunks[c];
        const int32_t i = batch[ch.entry].i;
        J.dots(J.xn + (int64_t)i * J.D, J.xn, J.D, J.D, picks.data() + seen[i] + ch.u0, ch.u1 - ch.u0,
               batch_sims.data() + ch.entry * J.k + ch.u0);
      });
      for (size_t e = 0; e < batch.size(); ++e) {
        const int32_t i = batch[e].i;
        const T* out = batch_sims.data() + e * J.k;
        for (int64_t u = 0, todo = fresh - seen[i]; u < todo; ++u) m[i] = std::max(m[i], out[u]);
        seen[i] = fresh;
        batch[e].score = lam * imp[i] - one_minus_lam * m[i];
      }
      for (const Entry& e : batch) {
        heap.push_back(e);
        std::push_heap(heap.begin(), heap.end(), below);
      }
    }
    std::pop_heap(heap.begin(), heap.end(), below);
    const int32_t i = heap.back().i;
    heap.pop_back();
    J.out[t] = i;
    picks.push_back(i);
  }
}

// max_{j != i} sim(i, j) for every token of an image, max-merged into best[]
// (reference.select_divprune, step 1), restricted to the row blocks this
// caller takes from `next_block`.
//
// The upper triangle of the Gram matrix, in bs x bs blocks: row block ib
// against column blocks jb >= ib.  A column block (bs rows of x̂) is sized to
// stay in L2 while the register-tiled gram kernel sweeps the row block over
// it; each block lands in the small buffer C and is folded into best[] on
// both sides of the diagonal (sim(i, j) == sim(j, i) bit for bit), then
// dropped -- the N x N Gram is never stored.  In a diagonal block only
// strips at or above the diagonal are computed.  Every sim has the same bits
// as the 1 x 4 dots kernel gives and max is order-free, so the result does
// not depend on bs, on the tile shape, or on how blocks are split over threads.
template <class T>
void gram_max_blocks(const T* xn, int64_t n, int64_t D, GramFn<T> gram, int64_t bs, std::atomic<int64_t>& next_block,
                     T* C, T* best) {
  constexpr int64_t STRIP = 12;  // a multiple of every tile height (3, 4): full tiles along the diagonal
  const int64_t nblk = (n + bs - 1) / bs;
  for (int64_t ib; (ib = next_block.fetch_add(1)) < nblk;) {
    const int64_t i0 = ib * bs, ni = std::min(bs, n - i0);
    for (int64_t jb = ib; jb < nblk; ++jb) {
      const int64_t j0 = jb * bs, nj = std::min(bs, n - j0);
      if (jb == ib) {
        for (int64_t a = 0; a < ni; a += STRIP)  // rows a.. against columns a..: C[a][a..] onwards
          gram(xn + (i0 + a) * D, std::min(STRIP, ni - a), xn + (i0 + a) * D, ni - a, D, D, C + a * bs + a, bs);
      } else {
        gram(xn + i0 * D, ni, xn + j0 * D, nj, D, D, C, bs);
      }
      T* bj = best + j0;
      for (int64_t a = 0; a < ni; ++a) {
        const T* c = C + a * bs;
        const int64_t b0 = jb == ib ? a + 1 : 0;  // diagonal block: pairs j > i only
        T bi = best[i0 + a];
        for (int64_t b = b0; b < nj; ++b) {
          bi = std::max(bi, c[b]);
          bj[b] = std::max(bj[b], c[b]);
        }
        best[i0 + a] = bi;
      }
    }
  }
}

// Column block of the triangular pass: ~256 KiB of x̂ (stays in L2 next to the
// row strip being swept), 12..240 rows.
template <class T>
int64_t gram_block_rows(int64_t D) {
  return std::max<int64_t>(12, std::min<int64_t>(240, (256 << 10) / (D * (int64_t)sizeof(T)) / 12 * 12));
}

// best[i] = max_{j != i} sim(i, j) for all i: the full triangular pass.
// With helpers (an image with idle threads beside it, e.g. B = 1) the row
// blocks are shared over the crew, each task with its own max accumulator,
// max-merged at the end (exact: max is order-free).
template <class T>
void max_offdiag_sim(const ImageJob<T>& J, SpinCrew& crew, T* best) {
  const int64_t n = J.n, D = J.D, bs = gram_block_rows<T>(D);
  const int64_t nblk = (n + bs - 1) / bs;
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(crew.size(), nblk));
  constexpr T NEG_INF = -std::numeric_limits<T>::infinity();
  std::fill(best, best + n, NEG_INF);
  std::atomic<int64_t> next_block{0};
  // every buffer is allocated here: a task must not throw
  std::vector<T> part((size_t)(parts - 1) * (size_t)n, NEG_INF), C((size_t)parts * (size_t)bs * (size_t)bs);
  crew.run(parts, [&](int64_t t) {
    gram_max_blocks<T>(J.xn, n, D, J.gram, bs, next_block, C.data() + t * bs * bs,
                       t == 0 ? best : part.data() + (t - 1) * n);
  });
  for (int64_t t = 1; t < parts; ++t) {
    const T* p = part.data() + (t - 1) * n;
    for (int64_t i = 0; i < n; ++i) best[i] = std::max(best[i], p[i]);
  }
}

// DivPrune's first pick: argmax_i 1 - max_{j != i} sim(i, j) = argmin_i best_i,
// best_i = max_{j != i} sim(i, j), ties to the lowest index (N = 1: token 0).
//
// Only this argmin is needed (step 1 uses nothing else), so most of the
// N^2 D / 2 triangle can be skipped, exactly:
//  1. lb_i = max of sim(i, j) over a band |i - j| <= BAND (tokens close in
//     sequence order, i.e. spatial neighbours for patch tokens) is a lower
//     bound of best_i, for N * BAND * D work.
//  2. Tokens in increasing (lb, index) order get their exact best_i from a
//     full row, 4 at a time with the tiled kernel; v = the smallest exact
//     best so far.  A token with lb_i > v has best_i >= lb_i > v and cannot
//     win, and neither can any token after it in that order: stop.
// Every sim is bit-identical to the full pass (same kernel arithmetic), so the
// pick is exactly the full pass's argmin.  Where the bound prunes badly
// (near-uniform sims: e.g. isotropic random tokens), fall back to the full
// triangle once the exact rows would cost more than half of it.
template <class T>
int32_t divprune_first_pick(const ImageJob<T>& J, Workspace<T>& ws, SpinCrew& crew) {
  const int64_t n = J.n, D = J.D;
  if (n == 1) return 0;
  constexpr T NEG_INF = -std::numeric_limits<T>::infinity();
  T* best = ws.m.data();  // reused as max-sim accumulator before the greedy loop
  auto full_pass = [&] {
    max_offdiag_sim<T>(J, crew, best);
    return (int32_t)(std::min_element(best, best + n) - best);  // first minimum: lowest index
  };
  constexpr int64_t BAND = 48, STRIP = 12, GROUP = 4;
  if (n <= 4 * BAND) return full_pass();
  // 1. band lower bounds (the same strip-above-the-diagonal sweep as a diagonal block)
  std::vector<T> C((size_t)STRIP * (STRIP + BAND));
  std::fill(best, best + n, NEG_INF);
  for (int64_t i0 = 0; i0 < n; i0 += STRIP) {
    const int64_t ni = std::min(STRIP, n - i0), nj = std::min(STRIP + BAND, n - i0);
    const int64_t ldc = STRIP + BAND;
    J.gram(J.xn + i0 * D, ni, J.xn + i0 * D, nj, D, D, C.data(), ldc);
    for (int64_t a = 0; a < ni; ++a)
      for (int64_t b = a + 1; b < nj; ++b) {
        const T s = C[a * ldc + b];
        best[i0 + a] = std::max(best[i0 + a], s);
        best[i0 + b] = std::max(best[i0 + b], s);
      }
  }
  // 2. exact rows in (lb, index) order until the bound rules out the rest
  std::vector<int32_t>& order = ws.order;
  order.resize(n);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [best](int32_t x, int32_t y) { return best[x] < best[y]; });
  std::vector<T> rows((size_t)GROUP * D), row_best(GROUP);
  std::vector<T>& sims = ws.cis;
  sims.resize((size_t)GROUP * n);
  T v = std::numeric_limits<T>::infinity();
  int32_t pick = -1;
  const int64_t max_rows = n / 2;  // n / 2 full rows ~ the whole triangle's work
  for (int64_t o = 0; o < n && best[order[o]] <= v; o += GROUP) {
    if (o >= max_rows) return full_pass();
    const int64_t g = std::min(GROUP, n - o);
    for (int64_t r = 0; r < g; ++r) std::memcpy(&rows[r * D], J.xn + (int64_t)order[o + r] * D, D * sizeof(T));
    J.gram(rows.data(), g, J.xn, n, D, D, sims.data(), n);
    for (int64_t r = 0; r < g; ++r) {
      const int32_t i = order[o + r];
      const T* srow = sims.data() + r * n;
      T bi = NEG_INF;
      for (int64_t j = 0; j < n; ++j)
        if (j != i) bi = std::max(bi, srow[j]);
      if (bi < v || (bi == v && i < pick)) {
        v = bi;
        pick = i;
      }
    }
  }
  return pick;
}

// reference.select_dpp: greedy MAP by incremental Cholesky, kernel L_ij = q_i sim(i, j) q_j.
template <class T>
void dpp(const ImageJob<T>& J, Workspace<T>& ws) {
  const int64_t n = J.n, k = J.k;
  auto& active = ws.active;
  active.resize(n);
  std::iota(active.begin(), active.end(), 0);
  T* d2 = ws.m.data();
  T* sim = ws.sim.data();
  ws.cis.assign((size_t)n * (size_t)std::max<int64_t>(k, 1), (T)0);
  T* cis = ws.cis.data();  // c_i = cis[i*k .. i*k + t)
  std::vector<T> proj(n);
  for (int64_t i = 0; i < n; ++i) {
    // L_ii = q_i^2 sim(i, i): exactly q_i^2 for a non-zero token (so equal q tie exactly), 0 for a zero one
    const T* xi = J.xn + i * J.D;
    bool nonzero = false;
    for (int64_t d = 0; d < J.D && !nonzero; ++d) nonzero = xi[d] != (T)0;
    d2[i] = nonzero ? J.q[i] * J.q[i] : (T)0;
  }
  bool dead = false;
  for (int64_t t = 0; t < k; ++t) {
    int32_t pick = -1;
    T best = -std::numeric_limits<T>::infinity();
    if (!dead) {
      for (int32_t i : active) {
        if (pick < 0 || d2[i] > best) {
          best = d2[i];
          pick = i;
        }
      }
      // no gain left (checked before the pick): the rest of the budget goes in index order
      dead = best < (T)DPP_EPS;
    }
    if (dead) pick = active.front();
    J.out[t] = pick;
    remove_sorted(active, pick);
    if (dead) continue;
    if (t + 1 == k) break;
    const T dj = std::sqrt(d2[pick]);
    const int64_t na = (int64_t)active.size();
    J.dots(J.xn + (int64_t)pick * J.D, J.xn, J.D, J.D, active.data(), na, sim);
    if (t > 0) J.dots(cis + (int64_t)pick * k, cis, k, t, active.data(), na, proj.data());  // <c_pick, c_i>
    const T qj = J.q[pick];
    for (int64_t a = 0; a < na; ++a) {
      const int32_t i = active[a];
      const T l_ji = qj * sim[a] * J.q[i];
      const T e = (l_ji - (t > 0 ? proj[a] : (T)0)) / dj;
      cis[(int64_t)i * k + t] = e;
      d2[i] -= e * e;
    }
  }
}

// reference.select_d2pruner: pivots by importance, then a greedy maximal independent set.
template <class T>
void d2pruner(const ImageJob<T>& J, Workspace<T>& ws, const SelectArgs& a) {
  const int64_t n = J.n, k = J.k;
  importance_order(J.imp, n, ws.order);
  const int64_t n_pivots = (int64_t)std::nearbyint((double)k * a.pivot_ratio);  // half-even
  ws.flag.assign(n, 1);   // pool
  ws.flag2.assign(n, 0);  // selected
  uint8_t* pool = ws.flag.data();
  uint8_t* selected = ws.flag2.data();
  auto& in_pool = ws.active;
  const bool spatial = a.alpha < 1.0;
  for (int64_t t = 0; t < k; ++t) {
    const bool is_pivot = t < n_pivots;
    in_pool.clear();
    for (int32_t i = 0; i < n; ++i)
      if (pool[i]) in_pool.push_back(i);
    const bool from_pool = !in_pool.empty();
    int32_t pick = -1;
    if (is_pivot) {
      pick = ws.order[t];
    } else {
      T best = -std::numeric_limits<T>::infinity();
      for (int32_t i = 0; i < n; ++i) {
        if (from_pool ? !pool[i] : selected[i]) continue;
        if (pick < 0 || J.imp[i] > best) {
          best = J.imp[i];
          pick = i;
        }
      }
    }
    J.out[t] = pick;
    selected[pick] = 1;
    pool[pick] = 0;
    if ((is_pivot || from_pool) && !in_pool.empty()) {
      // drop the pick's neighbours: alpha * sim + (1 - alpha) * near > tau
      J.dots(J.xn + (int64_t)pick * J.D, J.xn, J.D, J.D, in_pool.data(), (int64_t)in_pool.size(), ws.sim.data());
      const int64_t pr = spatial ? pick / a.grid_w : 0, pc = spatial ? pick % a.grid_w : 0;
      for (size_t s = 0; s < in_pool.size(); ++s) {
        const int32_t i = in_pool[s];
        double link = a.alpha * (double)ws.sim[s];
        if (spatial) {
          const int64_t dr = std::llabs(i / a.grid_w - pr), dc = std::llabs(i % a.grid_w - pc);
          if (std::max(dr, dc) <= a.radius) link += 1.0 - a.alpha;
        }
        if (link > a.tau) pool[i] = 0;
      }
    }
  }
}

template <class T>
void select_image(const SelectArgs& a, int64_t b, Workspace<T>& ws, DotsFn<T> dots, GramFn<T> gram,
                  SpinCrew& crew) {
  const int64_t n = a.lengths[b], k = a.ks[b], D = a.dim, start = a.starts[b];
  int64_t* out = a.out + b * a.k_max;
  std::fill(out, out + a.k_max, (int64_t)-1);
  if (k == 0) return;
  const T* imp = static_cast<const T*>(a.importance) + start;
  const T* q = a.quality ? static_cast<const T*>(a.quality) + start : nullptr;
  ImageJob<T> J{nullptr, n, D, k, imp, q, out, dots, gram};

  if (a.method == Method::TOPK) {
    crew.stop();  // no similarity work: nothing for the helpers
    importance_order(imp, n, ws.order);
    std::copy(ws.order.begin(), ws.order.begin() + k, out);
    return;
  }
  ws.xn.reserve((size_t)n * (size_t)D);
  // the crew (spare threads: fewer images than threads) helps this image: loading rows,
  // DivPrune's first step, then the first similarity row and the lazy refreshes of the
  // max-similarity family
  {
    const int64_t slices = std::min<int64_t>(n, 4 * crew.size());
    crew.run(slices, [&](int64_t c) {
      const int64_t r0 = n * c / slices, r1 = n * (c + 1) / slices;
      load_normalized<T>(a, start + r0, r1 - r0, ws.xn.data() + r0 * D, dots);
    });
  }
  if (a.method == Method::DPP || a.method == Method::D2PRUNER) crew.stop();  // one row per step: serial
  J.xn = ws.xn.data();
  ws.sim.resize(n);
  ws.m.resize(n);

  switch (a.method) {
    case Method::MMR:
    case Method::FPS: {
      ws.active.resize(n);
      std::iota(ws.active.begin(), ws.active.end(), 0);
      greedy_max_similarity<T>(J, ws, crew, a.method == Method::MMR ? (T)a.lam : (T)0, nullptr);
      break;
    }
    case Method::HYBRID: {
      // pool = the c most important tokens, c = N if lam = 0 else min(N, max(k, rint(k / lam))),
      // clamped to N in double before the conversion: k / lam overflows int64 for tiny lam (UB)
      const int64_t c = a.lam == 0.0 ? n
                                     : std::max<int64_t>(k, (int64_t)std::min((double)n, std::nearbyint((double)k / a.lam)));
      importance_order(imp, n, ws.order);
      ws.active.assign(ws.order.begin(), ws.order.begin() + c);
      std::sort(ws.active.begin(), ws.active.end());
      greedy_max_similarity<T>(J, ws, crew, (T)0, nullptr);  // step 1 = pool's most important (Imp)
      break;
    }
    case Method::DIVPRUNE: {
      const int32_t first = divprune_first_pick<T>(J, ws, crew);
      std::vector<T> zeros(n, (T)0);
      J.imp = zeros.data();
      ws.active.resize(n);
      std::iota(ws.active.begin(), ws.active.end(), 0);
      greedy_max_similarity<T>(J, ws, crew, (T)0, nullptr, first);
      break;
    }
    case Method::DPP:
      dpp<T>(J, ws);
      break;
    case Method::D2PRUNER:
      d2pruner<T>(J, ws, a);
      break;
    default:
      throw std::invalid_argument("unknown method code");
  }
}

// Threads chosen by size.  A second thread pays for itself only on enough work: below
// that, waking it and waiting for it costs more than it saves, and on a busy machine the
// wait is for the scheduler to run it at all -- milliseconds for a call whose work takes
// a fraction of one.  Work is counted as sum_b n_b * k_b * D (the dot products of the
// plain greedy; top-k: n_b * D), and a call gets one thread per WORK_PER_THREAD of it,
// up to num_threads.  The value comes from the size sweep in bench/threads_small.py.
// Spare threads beyond one per image form a crew that meets at every greedy step (k
// meetings per image, each a scheduler wait when the machine is busy), so a crew also
// needs CREW_STEP_WORK of one step's work, n_b * D, in the largest image.
// MMRPRUNE_CPU_WORK_PER_THREAD overrides WORK_PER_THREAD (0: always num_threads, both
// limits off, which the tests use to run every thread layout on small inputs).
constexpr double WORK_PER_THREAD = 4e6;
constexpr double CREW_STEP_WORK = 2e6;

int threads_for(const SelectArgs& a) {
  double per = WORK_PER_THREAD;
  if (const char* env = std::getenv("MMRPRUNE_CPU_WORK_PER_THREAD")) per = std::strtod(env, nullptr);
  if (!(per > 0.0) || a.num_threads <= 1) return std::max(a.num_threads, 1);
  double work = 0.0;
  for (int64_t b = 0; b < a.batch; ++b)
    work += (double)a.lengths[b] * (a.method == Method::TOPK ? 1.0 : (double)std::max<int64_t>(a.ks[b], 1)) *
            (double)a.dim;
  int threads = (int)std::min<double>(a.num_threads, std::max(1.0, std::floor(work / per)));
  if (threads > a.batch) {
    int64_t widest = 0;
    for (int64_t b = 0; b < a.batch; ++b) widest = std::max(widest, a.lengths[b]);
    if ((double)widest * (double)a.dim < CREW_STEP_WORK) threads = (int)std::max<int64_t>(1, a.batch);
  }
  return threads;
}

template <class T>
void run_batch(const SelectArgs& a, DotsFn<T> dots, GramFn<T> gram) {
  const int64_t B = a.batch;
  const int threads = threads_for(a);
  // images over up to `threads` callers; fewer images than threads: the spare
  // threads are the callers' crews
  const int callers = (int)std::max<int64_t>(1, std::min<int64_t>(threads, B));
  const int per_caller = (int)std::max<int64_t>(1, threads / std::max<int64_t>(B, 1));
  std::atomic<int64_t> next{0};
  run_crews(callers, per_caller, [&](SpinCrew& crew) {
    Workspace<T> ws;
    try {
      for (int64_t b; (b = next.fetch_add(1)) < B;) select_image<T>(a, b, ws, dots, gram, crew);
    } catch (...) {
      next.store(B);  // the other callers stop too
      throw;
    }
  });
}

void check(bool ok, const std::string& msg) {
  if (!ok) throw std::invalid_argument("mmrprune._cpu.select: " + msg);
}

template <class T>
int64_t first_step_hook(const T* xn, int64_t n, int64_t D, int threads, DotsFn<T> dots, GramFn<T> gram, T* best) {
  Workspace<T> ws;
  ws.m.resize(n);
  ImageJob<T> J{xn, n, D, 1, nullptr, nullptr, nullptr, dots, gram};
  int32_t pick = -1;
  run_crews(1, std::max(threads, 1), [&](SpinCrew& crew) {
    pick = divprune_first_pick<T>(J, ws, crew);
    max_offdiag_sim<T>(J, crew, best);
  });
  return pick;
}

}  // namespace

size_t scratch_bytes() { return BlockCache::get().held(); }
size_t release_scratch() { return BlockCache::get().release(); }

int64_t divprune_first_step(const void* xn, bool f64, int64_t n, int64_t D, int threads, const char* isa,
                            void* best) {
  check(xn && best && n >= 1 && D >= 1, "divprune_first_step: bad arguments");
  const DotKernels& kern = isa ? dot_kernels_for(isa) : dot_kernels();
  if (f64)
    return first_step_hook<double>(static_cast<const double*>(xn), n, D, threads, kern.f64, kern.gram_f64,
                                   static_cast<double*>(best));
  return first_step_hook<float>(static_cast<const float*>(xn), n, D, threads, kern.f32, kern.gram_f32,
                                static_cast<float*>(best));
}

void select_batch(const SelectArgs& a) {
  check(a.batch >= 0 && a.k_max >= 0, "batch and k_max must be >= 0");
  // an empty output (every image empty, e.g. keep_ratio with all lengths 0) has nothing to
  // write, and its buffer may have no address at all (data_ptr() of a [B, 0] tensor is 0)
  if (a.batch == 0 || a.k_max == 0) return;
  check(a.rows && a.importance && a.starts && a.lengths && a.ks && a.out, "null pointer argument");
  check(a.dim >= 1, "dim must be >= 1");
  check((int)a.method >= 0 && (int)a.method <= 6, "unknown method code " + std::to_string((int)a.method));
  check((int)a.dtype >= 0 && (int)a.dtype <= 3, "unknown dtype code " + std::to_string((int)a.dtype));
  check(a.method != Method::DPP || a.quality, "dpp needs the quality array");
  check(a.lam >= 0.0 && a.lam <= 1.0, "lam must be in [0, 1]");
  check(a.method != Method::D2PRUNER || a.alpha >= 1.0 || a.grid_w >= 1, "d2pruner with alpha < 1 needs grid_w >= 1");
  for (int64_t b = 0; b < a.batch; ++b) {
    const int64_t s = a.starts[b], n = a.lengths[b], k = a.ks[b];
    check(s >= 0 && n >= 0 && s + n <= a.total_rows, "image " + std::to_string(b) + " rows out of range");
    check(n < (int64_t)std::numeric_limits<int32_t>::max(), "image too large");
    check(k >= 0 && k <= n && k <= a.k_max, "image " + std::to_string(b) + ": need 0 <= ks <= min(lengths, k_max)");
  }
  const DotKernels& kern = a.isa ? dot_kernels_for(a.isa) : dot_kernels();
  if (a.dtype == DType::F64)
    run_batch<double>(a, kern.f64, kern.gram_f64);
  else
    run_batch<float>(a, kern.f32, kern.gram_f32);
}

}  // namespace mmrprune
