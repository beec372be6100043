// Batched greedy token selection on the CPU: every method of docs/contract.md.
// Read side by side with mmrprune/reference.py.
#pragma once
#include <cstddef>
#include <cstdint>

namespace mmrprune {

enum class Method : int { MMR = 0, DIVPRUNE = 1, TOPK = 2, FPS = 3, HYBRID = 4, DPP = 5, D2PRUNER = 6 };
enum class DType : int { F32 = 0, F64 = 1, F16 = 2, BF16 = 3 };

struct SelectArgs {
  // segment form: image b owns rows starts[b] .. starts[b] + lengths[b] - 1 of `rows` [total_rows, D]
  const void* rows;
  DType dtype;
  int64_t total_rows;
  int64_t dim;
  const int64_t* starts;   // [B]
  const int64_t* lengths;  // [B]
  const int64_t* ks;       // [B]
  int64_t batch;
  int64_t k_max;
  // Imp and DPP quality per row, in the compute type (double for F64 input, float otherwise);
  // same segment layout as `rows`.  `quality` may be null unless method == DPP.
  const void* importance;
  const void* quality;
  Method method;
  double lam;
  // d2pruner
  double pivot_ratio, alpha, tau;
  int64_t radius, grid_w;  // grid_w = 0: no spatial term (alpha must then be 1)
  int num_threads;
  const char* isa;  // null: best for this CPU
  int64_t* out;     // [B, k_max], written fully (-1 past ks[b])
};

// Checks the arguments (std::invalid_argument on bad ones) and runs the selection.
void select_batch(const SelectArgs& args);

// Scratch memory for the normalised rows is kept between calls, up to
// SCRATCH_CACHE_LIMIT bytes (select.cpp, BlockCache, says why).
constexpr size_t SCRATCH_CACHE_LIMIT = size_t(256) << 20;
// Each thread's row scratch is one block, a whole number of 2 MiB (huge) pages.
constexpr size_t SCRATCH_ALIGN = size_t(2) << 20;
size_t scratch_bytes();    // bytes held now
size_t release_scratch();  // frees them (blocks in use by a running call stay with it); returns the bytes freed

// Test hook for DivPrune's first step on already-normalised rows xn [n, D]
// (float64 if f64, else float32): writes best[i] = max_{j != i} sim(i, j) from
// the full tiled triangular pass (-inf for n = 1) and returns the first pick of
// the pruned search that select_batch uses.  isa: null for the best one.
int64_t divprune_first_step(const void* xn, bool f64, int64_t n, int64_t D, int threads, const char* isa,
                            void* best);

}  // namespace mmrprune
