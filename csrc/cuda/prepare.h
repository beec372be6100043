// mmrprune fused preparation: what the greedy kernels read per row, in one launch.
//
// Replaces a chain of small torch ops (norms, min/max, normalisation, casts) by one kernel,
// one block per image, so an eager call stays within a few launches.  No torch, no pybind11:
// the same source builds for the GPU and for the CPU emulator (csrc/emu).
#pragma once

#include <cstdint>
#include <string>

namespace mmrprune_cuda {

// What `score` receives per row.
enum ScoreKind : int {
  kScoreKeep = 0,     // score is the caller's, untouched
  kScoreImp = 1,      // Imp = (w - min w) / (max w - min w + 1e-6) per image; 0 without weights
  kScoreQuality = 2,  // DPP quality: Imp, or 1 where an image's weights are constant or absent
  kScoreZero = 3,     // 0 (DivPrune: importance is ignored)
  // Hybrid: Imp as kScoreImp, and eligible[row] = 1 on the pool, the pool_size(b) tokens of
  // image b with the largest Imp (ties to the lower index; NaN ranks first, as torch's
  // descending stable sort), 0 elsewhere.  pool_size(b) = N_b if lam == 0, else
  // min(N_b, max(k_b, min(round_half_even(k_b / lam), N_b))) with the division in double.
  kScoreImpPool = 4,
  // DivPrune in Gram mode: score 0 (as kScoreZero) and first_score[row] = 1 - max_{j != i, j < N_b}
  // (G_ij * inv_j) * inv_i from the Gram (+inf for a lone token), in that order of fp32 operations.
  kScoreDivPrune = 5,
  // Top-k: Imp as kScoreImp, then out[b, r] = the token of rank r of image b for r < size(b) =
  // min(k_b, N_b, k_max) (ranked as kScoreImpPool: the descending stable sort's order), -1 for
  // size(b) <= r < k_max, and rounds[b] = 1 where size(b) > 0 (every pick in one pass), else 0.
  // The selection itself: no greedy kernel follows.
  kScoreTopk = 6,
};

// The score kinds' names: mmrprune::fused_greedy's score_kind argument (op.cpp) and the module's
// SCORE_KINDS (module.cpp, for the emulator harness's cases).
struct ScoreKindName {
  const char* name;
  ScoreKind kind;
};
inline constexpr ScoreKindName kScoreKindNames[] = {
    {"keep", kScoreKeep}, {"imp", kScoreImp},           {"quality", kScoreQuality}, {"zero", kScoreZero},
    {"pool", kScoreImpPool}, {"divprune", kScoreDivPrune}, {"topk", kScoreTopk}};

// Image b owns rows starts[b] .. starts[b] + lengths[b] - 1 of every per-row array.
// gram (optional): [batch, ld, ld] fp32 raw Gram; its diagonal is ||x||^2, so the norms need no
// second pass over the features.  width > 0: the rows are padded, [batch, width] (starts[b] =
// b * width), and the padding rows get norms and scores too, so that every row the kernels might
// touch holds a finite value; width = 0: packed rows, lengths[b] per image.
struct PrepareParams {
  std::uintptr_t starts = 0, lengths = 0;  // [batch] int64
  std::int64_t batch = 0;
  std::uintptr_t gram = 0;                  // 0: no norms written
  std::int64_t ld = 0;                      // >= every lengths[b]; = width for padded rows
  std::int64_t width = 0;
  std::uintptr_t inv_norm = 0, sqn = 0;     // [rows] fp32 out; sqn may be 0
  std::uintptr_t weights = 0;               // [rows] fp32 raw importance, or 0 (none)
  std::uintptr_t score = 0;                 // [rows] fp32 out (kScoreKeep: not written)
  int score_kind = kScoreKeep;
  std::uintptr_t ks = 0;                    // kScoreImpPool, kScoreTopk: [batch] int64 budgets
  double lam = 0.0;                         // kScoreImpPool: the hybrid's lam (pool size)
  std::uintptr_t eligible = 0;              // kScoreImpPool: [rows] uint8 out
  std::uintptr_t first_score = 0;           // kScoreDivPrune: [rows] fp32 out (needs gram)
  std::uintptr_t out = 0, rounds = 0;       // kScoreTopk: [batch, k_max] and [batch] int64 out
  std::int64_t k_max = 0;                   // kScoreTopk: out's width
  std::uintptr_t stream = 0;
};

std::string launch_prepare(const PrepareParams& p);

}  // namespace mmrprune_cuda
