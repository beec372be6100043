// mmrprune fused greedy selection: host-side launchers (no torch, no pybind11).
//
// Every pointer is a raw device pointer; every launcher enqueues its work on
// `stream` and returns without synchronising.  Launchers return an empty
// string on success and a description of the failure otherwise (argument
// checks happen in op.cpp; what is left here are CUDA errors and the
// shared-memory limit of the device).
#pragma once

#include <cstdint>
#include <string>

namespace mmrprune_cuda {

// dtype codes of the features (op.cpp maps torch dtypes to them)
enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Threads per block of the greedy kernels (one block per image).
constexpr int kGreedyThreads = 1024;
// The DPP kernel carries the Cholesky projection and the rank-exhausted rescan:
// at 1024 threads (64 registers) it spilled on sm_90, so it runs 512 threads.
constexpr int kDppThreads = 512;
// Most picks one round of the maxsim kernels commits (the length of the sorted candidate
// lists they carry; NOTES.md, "Exact rounds").  MaxSimState::max_round may lower it.
constexpr int kMaxRound = 8;
// Most CTAs per image of the Gram-mode cluster kernels (sm_90: 16 with the non-portable opt-in).
constexpr int kMaxClusterCtas = 16;

// ---- Launch parameters: plain structs of raw device addresses, filled by op.cpp.

// Row mode's features: x is [rows, dim] of `dtype` (a DType code), contiguous.
struct Features {
  std::uintptr_t x = 0;
  int dtype = kFloat32;
  std::int64_t rows = 0;
  std::int64_t dim = 0;
};

// Gram mode's similarity source: gram is [batch, ld, ld] fp32, contiguous,
// gram[b][i][j] = x_{starts[b]+i} . x_{starts[b]+j} (unnormalised; the kernels scale by
// inv_norm[p] * inv_norm[i]).  ld >= every lengths[b] (the kernels clamp lengths to ld).
struct GramRows {
  std::uintptr_t gram = 0;
  std::int64_t ld = 0;
};

// The batch in segment form (image b owns rows starts[b] .. starts[b] + lengths[b] - 1),
// the output [batch, k_max] int64 and the stream every launch is enqueued on.
struct Segments {
  std::uintptr_t starts = 0, lengths = 0, ks = 0;  // [batch] int64
  std::int64_t batch = 0;
  std::int64_t k_max = 0;
  std::uintptr_t out = 0;
  std::uintptr_t stream = 0;
};

// MMR / FPS / hybrid / DivPrune per-row inputs and scratch (fp32 unless noted), segment form.
// first_score == 0: step 1 maximises imp; eligible == 0 (uint8): every valid token is eligible.
struct MaxSimState {
  std::uintptr_t inv_norm = 0, imp = 0, first_score = 0, eligible = 0;
  double lam = 0.0;
  std::uintptr_t m_scratch = 0, taken_scratch = 0;  // [rows] fp32, [rows] uint8
  std::uintptr_t rounds = 0;    // [batch] int64: rounds each image ran (0: not written)
  int max_round = kMaxRound;    // 1 .. kMaxRound picks per round (1: one pick per step)
  // Gram mode, CTAs per image (a thread-block cluster, sm_90): 0 = the launcher's choice from the
  // batch, the length and the device (greedy.cu, cluster_shape), 1 = one block per image,
  // n >= 2 = a cluster of n CTAs where the device has clusters (tests force the path at small N).
  int cluster = 0;
};

// Conditional-DPP per-row inputs and scratch; c_scratch is [rows, k_max] fp32 (token-major).
struct DppState {
  std::uintptr_t inv_norm = 0, sqn = 0, q = 0;
  std::uintptr_t d2_scratch = 0, taken_scratch = 0, c_scratch = 0;
  // Gram mode, CTAs per image, as MaxSimState::cluster (greedy.cu, launch_dpp_gram_cluster).
  int cluster = 0;
};

// inv_norm[r] = 1 / max(||x_r||, 1e-12) in fp32 for r < rows;
// sqn[r] = ||x_r||^2 * inv_norm[r]^2 (= ||x̂_r||^2) when sqn != 0.
std::string launch_inv_norms(const Features& f, std::uintptr_t inv_norm, std::uintptr_t sqn,
                             std::uintptr_t stream);

// MMR / FPS / hybrid / DivPrune greedy (see greedy.cu for the exact steps).
std::string launch_greedy_maxsim(const Features& f, const MaxSimState& st, const Segments& seg);

// Conditional-DPP greedy MAP (incremental Cholesky, Chen et al. 2018).
std::string launch_greedy_dpp(const Features& f, const DppState& st, const Segments& seg);

// Dynamic shared memory (bytes) the greedy kernels need for feature dim `dim`.
std::int64_t greedy_smem_bytes(std::int64_t dim);

// ---- Gram mode: the similarity row of a pick is read from the precomputed raw Gram;
// inv_norm, imp/q, first_score, eligible, sqn and the scratch stay in segment form.

// Dynamic shared memory (bytes) of the Gram maxsim kernel's per-token state (m fp32 + taken u8).
std::int64_t gram_state_smem_bytes(std::int64_t ld);

// smem_state: -1 = state in shared memory when gram_state_smem_bytes(ld) fits the device's
// opt-in limit (else global scratch), 0 = always global scratch, 1 = shared when it fits.
std::string launch_greedy_maxsim_gram(const GramRows& g, const MaxSimState& st, const Segments& seg,
                                      int smem_state);

std::string launch_greedy_dpp_gram(const GramRows& g, const DppState& st, const Segments& seg);

}  // namespace mmrprune_cuda
