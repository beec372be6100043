// mmrprune fused greedy selection: host-side launchers (no torch, no pybind11).
//
// Every pointer is a raw device pointer; every launcher enqueues its work on
// `stream` and returns without synchronising.  Launchers return an empty
// string on success and a description of the failure otherwise (argument
// checks happen in bindings.cpp; what is left here are CUDA errors and the
// shared-memory limit of the device).
#pragma once

#include <cstdint>
#include <string>

namespace mmrprune_cuda {

// dtype codes shared with mmrprune/backends/cuda_backend.py
enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Threads per block of the greedy kernels (one block per image).
constexpr int kGreedyThreads = 1024;
// The DPP kernel carries the Cholesky projection and the rank-exhausted rescan:
// at 1024 threads (64 registers) it spilled on sm_90, so it runs 512 threads.
constexpr int kDppThreads = 512;

// inv_norm[r] = 1 / max(||x_r||, 1e-12) in fp32 for r < rows;
// sqn[r] = ||x_r||^2 * inv_norm[r]^2 (= ||x̂_r||^2) when sqn != 0.
std::string launch_inv_norms(std::uintptr_t x, int dtype, std::int64_t rows, std::int64_t dim,
                             std::uintptr_t inv_norm, std::uintptr_t sqn, std::uintptr_t stream);

// MMR / FPS / hybrid / DivPrune greedy (see greedy.cu for the exact steps).
std::string launch_greedy_maxsim(std::uintptr_t x, int dtype, std::int64_t rows, std::int64_t dim,
                                 std::uintptr_t inv_norm, std::uintptr_t imp, std::uintptr_t first_score,
                                 std::uintptr_t eligible, std::uintptr_t starts, std::uintptr_t lengths,
                                 std::uintptr_t ks, std::int64_t batch, std::int64_t k_max, double lam,
                                 std::uintptr_t m_scratch, std::uintptr_t taken_scratch, std::uintptr_t out,
                                 std::uintptr_t stream);

// Conditional-DPP greedy MAP (incremental Cholesky, Chen et al. 2018).
// c_scratch is [rows, k_max] fp32 (token-major).
std::string launch_greedy_dpp(std::uintptr_t x, int dtype, std::int64_t rows, std::int64_t dim,
                              std::uintptr_t inv_norm, std::uintptr_t sqn, std::uintptr_t q,
                              std::uintptr_t starts, std::uintptr_t lengths, std::uintptr_t ks,
                              std::int64_t batch, std::int64_t k_max, std::uintptr_t d2_scratch,
                              std::uintptr_t taken_scratch, std::uintptr_t c_scratch, std::uintptr_t out,
                              std::uintptr_t stream);

// Dynamic shared memory (bytes) the greedy kernels need for feature dim `dim`.
std::int64_t greedy_smem_bytes(std::int64_t dim);

// ---- Gram mode: the similarity row of a pick is read from a precomputed raw Gram.
// gram is [batch, ld, ld] fp32, contiguous: gram[b][i][j] = x_{starts[b]+i} . x_{starts[b]+j}
// (unnormalised; the kernels scale by inv_norm[p] * inv_norm[i]).  ld >= every lengths[b]
// (the kernels clamp lengths to ld).  inv_norm, imp/q, first_score, eligible, sqn and the
// scratch stay in segment form (indexed by row starts[b] + i), as in row mode.

// Dynamic shared memory (bytes) of the Gram maxsim kernel's per-token state (m fp32 + taken u8).
std::int64_t gram_state_smem_bytes(std::int64_t ld);

// smem_state: -1 = state in shared memory when gram_state_smem_bytes(ld) fits the device's
// opt-in limit (else global scratch), 0 = always global scratch, 1 = shared when it fits.
std::string launch_greedy_maxsim_gram(std::uintptr_t gram, std::int64_t ld, std::uintptr_t inv_norm,
                                      std::uintptr_t imp, std::uintptr_t first_score, std::uintptr_t eligible,
                                      std::uintptr_t starts, std::uintptr_t lengths, std::uintptr_t ks,
                                      std::int64_t batch, std::int64_t k_max, double lam,
                                      std::uintptr_t m_scratch, std::uintptr_t taken_scratch, std::uintptr_t out,
                                      int smem_state, std::uintptr_t stream);

std::string launch_greedy_dpp_gram(std::uintptr_t gram, std::int64_t ld, std::uintptr_t inv_norm,
                                   std::uintptr_t sqn, std::uintptr_t q, std::uintptr_t starts,
                                   std::uintptr_t lengths, std::uintptr_t ks, std::int64_t batch,
                                   std::int64_t k_max, std::uintptr_t d2_scratch, std::uintptr_t taken_scratch,
                                   std::uintptr_t c_scratch, std::uintptr_t out, std::uintptr_t stream);

}  // namespace mmrprune_cuda
