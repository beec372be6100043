// Fused preparation (prepare.h).  The arithmetic repeats the torch expressions the other
// backends use, operation by operation in IEEE fp32 (no contraction, exact division and sqrt),
// so that the scores agree bit for bit with SelectionBatch.importance().
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "prepare.h"

namespace mmrprune_cuda {
namespace {

constexpr int kPrepareThreads = 256;
constexpr float kPrepNormEps = 1e-12f;  // reference.NORM_EPS
constexpr float kPrepImpEps = 1e-6f;    // reference.IMP_EPS
// DivPrune's first score is spread over a second grid dimension: one image's N^2 Gram reads
// would otherwise go through one SM.  Each block takes kFirstRowsPerWarp rows per warp and
// walks the columns in tiles whose inverse norms it derives from the diagonal into shared
// memory, so blocks need nothing another block writes.
constexpr int kFirstRowsPerWarp = 8;
constexpr int kFirstRowsPerBlock = kFirstRowsPerWarp * (kPrepareThreads / 32);
constexpr int kFirstTile = kPrepareThreads * 4;

// 1 / max(||x||, eps) from a Gram diagonal entry ||x||^2 (IEEE sqrt and division: no fast-math).
__device__ __forceinline__ float inv_norm_of(float ss) {
  const float nrm = sqrtf(ss > 0.0f ? ss : 0.0f);
  return 1.0f / (nrm > kPrepNormEps ? nrm : kPrepNormEps);
}

// True when key a of row ia comes before key b of row ib in torch's descending stable sort:
// NaN first, then larger values, equal keys by lower row.
__device__ __forceinline__ bool ranks_before(float a, std::int64_t ia, float b, std::int64_t ib) {
  const bool a_nan = a != a, b_nan = b != b;
  if (a_nan || b_nan) return a_nan && (!b_nan || ia < ib);
  return a > b || (a == b && ia < ib);
}

// torch.amax's maximum: NaN wins.
__device__ __forceinline__ float max_nan(float a, float b) { return (a != a || a > b) ? a : b; }

// DivPrune's first score of the rows [r0, r0 + kFirstRowsPerBlock) of image b: 1 - max_{j != i,
// j < n} (G_ij * inv_j) * inv_i, +inf for a lone token.  Rows up to n_gram_rows (the padding
// rows of a padded batch too, as the torch path's padded layout gives them).
__device__ void first_score_rows(const PrepareParams& p, const float* g, std::int64_t start, std::int64_t n,
                                 std::int64_t n_gram_rows, std::int64_t r0, float* s_inv) {
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  float best[kFirstRowsPerWarp];   // registers: every loop over r below is unrolled
#pragma unroll
  for (int r = 0; r < kFirstRowsPerWarp; ++r) best[r] = -INFINITY;
  for (std::int64_t j0 = 0; j0 < n; j0 += kFirstTile) {
    const std::int64_t tile = n - j0 < kFirstTile ? n - j0 : kFirstTile;
    for (std::int64_t t = tid; t < tile; t += blockDim.x) s_inv[t] = inv_norm_of(g[(j0 + t) * (p.ld + 1)]);
    __syncthreads();
#pragma unroll
    for (int r = 0; r < kFirstRowsPerWarp; ++r) {
      const std::int64_t i = r0 + warp * kFirstRowsPerWarp + r;
      if (i < n_gram_rows) {   // warp-uniform
        const float* row = g + i * p.ld + j0;
        for (std::int64_t t = lane; t < tile; t += 32)
          if (j0 + t != i) best[r] = max_nan(best[r], __fmul_rn(row[t], s_inv[t]));
      }
    }
    __syncthreads();   // s_inv is rewritten by the next tile
  }
  float* first = reinterpret_cast<float*>(p.first_score);
#pragma unroll
  for (int r = 0; r < kFirstRowsPerWarp; ++r) {
    const std::int64_t i = r0 + warp * kFirstRowsPerWarp + r;
    if (i < n_gram_rows) {   // warp-uniform: the shuffles see the whole warp
      float v = best[r];
      for (int off = 16; off > 0; off >>= 1) v = max_nan(v, __shfl_xor_sync(0xffffffffu, v, off));
      if (lane == 0) first[start + i] = __fsub_rn(1.0f, __fmul_rn(v, inv_norm_of(g[i * (p.ld + 1)])));
    }
  }
}

__global__ void __launch_bounds__(kPrepareThreads) prepare_kernel(PrepareParams p) {
  __shared__ float s_lo[kPrepareThreads];
  __shared__ float s_hi[kPrepareThreads];
  __shared__ float s_inv[kFirstTile];
  const std::int64_t b = blockIdx.x;
  const int tid = threadIdx.x;
  const std::int64_t start = reinterpret_cast<const std::int64_t*>(p.starts)[b];
  std::int64_t len = reinterpret_cast<const std::int64_t*>(p.lengths)[b];
  if (len < 0) len = 0;
  const int kind = p.score_kind;   // uniform over the block, so every barrier below is too
  float* inv_norm = reinterpret_cast<float*>(p.inv_norm);
  const float* g = p.gram != 0 ? reinterpret_cast<const float*>(p.gram) + b * p.ld * p.ld : nullptr;
  const std::int64_t n_rows = p.width > 0 ? p.width : len;   // rows of this image in segment form

  if (kind == kScoreDivPrune) {   // every block of the second grid dimension: its share of the rows
    const std::int64_t n = len < p.ld ? len : p.ld;
    const std::int64_t n_gram_rows = n_rows < p.ld ? n_rows : p.ld;
    for (std::int64_t r0 = static_cast<std::int64_t>(blockIdx.y) * kFirstRowsPerBlock; r0 < n_gram_rows;
         r0 += static_cast<std::int64_t>(gridDim.y) * kFirstRowsPerBlock)
      first_score_rows(p, g, start, n, n_gram_rows, r0, s_inv);
  }
  if (blockIdx.y != 0) return;   // norms, scores and the pool: one block per image

  if (g != nullptr) {
    float* sqn = reinterpret_cast<float*>(p.sqn);
    const std::int64_t n = p.width > 0 ? p.ld : (len < p.ld ? len : p.ld);
    for (std::int64_t i = tid; i < n; i += blockDim.x) {
      const float ss = g[i * (p.ld + 1)];
      const float inv = inv_norm_of(ss);
      inv_norm[start + i] = inv;
      if (sqn != nullptr) {
        const float unit = __fmul_rn(sqrtf(ss > 0.0f ? ss : 0.0f), inv);
        sqn[start + i] = __fmul_rn(unit, unit);
      }
    }
  }
  if (kind == kScoreKeep) return;

  float* score = reinterpret_cast<float*>(p.score);
  const float* w = reinterpret_cast<const float*>(p.weights);
  if (kind == kScoreZero || kind == kScoreDivPrune || w == nullptr) {
    const float fill = (kind == kScoreQuality) ? 1.0f : 0.0f;
    for (std::int64_t i = tid; i < n_rows; i += blockDim.x) score[start + i] = fill;
  } else {
    float lo = INFINITY, hi = -INFINITY;
    for (std::int64_t i = tid; i < len; i += blockDim.x) {
      const float v = w[start + i];
      lo = v < lo ? v : lo;
      hi = v > hi ? v : hi;
    }
    s_lo[tid] = lo;
    s_hi[tid] = hi;
    __syncthreads();
    for (int half = blockDim.x / 2; half > 0; half /= 2) {
      if (tid < half) {
        s_lo[tid] = s_lo[tid + half] < s_lo[tid] ? s_lo[tid + half] : s_lo[tid];
        s_hi[tid] = s_hi[tid + half] > s_hi[tid] ? s_hi[tid + half] : s_hi[tid];
      }
      __syncthreads();
    }
    lo = s_lo[0];
    hi = s_hi[0];
    const float span = __fadd_rn(__fsub_rn(hi, lo), kPrepImpEps);
    const bool constant = hi == lo;
    for (std::int64_t i = tid; i < n_rows; i += blockDim.x) {
      float v = 0.0f;  // padding rows of a padded batch
      if (i < len) v = __fsub_rn(w[start + i], lo) / span;
      if (kind == kScoreQuality && constant) v = 1.0f;
      score[start + i] = v;
    }
  }
  if (kind != kScoreImpPool && kind != kScoreTopk) return;
  __syncthreads();   // the ranking below reads scores other threads wrote
  const float* imp = score + start;

  if (kind == kScoreTopk) {   // the token of rank r goes to out[b, r]; ranks are distinct (ties by index)
    std::int64_t size = reinterpret_cast<const std::int64_t*>(p.ks)[b];
    size = size < len ? size : len;
    size = size < p.k_max ? size : p.k_max;
    size = size > 0 ? size : 0;
    std::int64_t* out = reinterpret_cast<std::int64_t*>(p.out) + b * p.k_max;
    for (std::int64_t i = tid; i < len; i += blockDim.x) {
      const float v = imp[i];
      std::int64_t before = 0;
      for (std::int64_t j = 0; j < len && before < size; ++j) before += ranks_before(imp[j], j, v, i) ? 1 : 0;
      if (before < size) out[before] = i;
    }
    for (std::int64_t r = size + tid; r < p.k_max; r += blockDim.x) out[r] = -1;
    if (tid == 0) reinterpret_cast<std::int64_t*>(p.rounds)[b] = size > 0 ? 1 : 0;
    return;
  }

  // kScoreImpPool: a row is in the pool when fewer than pool_size rows of its image rank before it.
  const std::int64_t k = reinterpret_cast<const std::int64_t*>(p.ks)[b];
  std::int64_t size = len;
  if (p.lam != 0.0) {
    double wanted = rint(static_cast<double>(k) / p.lam);   // half to even, as torch.round
    wanted = wanted < static_cast<double>(len) ? wanted : static_cast<double>(len);
    const std::int64_t c = static_cast<std::int64_t>(wanted);
    size = k > c ? k : c;
    size = size < len ? size : len;
  }
  std::uint8_t* eligible = reinterpret_cast<std::uint8_t*>(p.eligible) + start;
  for (std::int64_t i = tid; i < n_rows; i += blockDim.x) {
    bool in_pool = i < len && size >= len;
    if (i < len && size < len) {
      const float v = imp[i];
      std::int64_t before = 0;
      for (std::int64_t j = 0; j < len && before < size; ++j) before += ranks_before(imp[j], j, v, i) ? 1 : 0;
      in_pool = before < size;
    }
    eligible[i] = in_pool ? 1 : 0;
  }
}

}  // namespace

std::string launch_prepare(const PrepareParams& p) {
  if (p.batch <= 0) return "";
  if (p.gram == 0 && p.score_kind == kScoreKeep) return "";
  unsigned parts = 1;   // the second grid dimension: DivPrune's first-score rows
  if (p.score_kind == kScoreDivPrune) {
    const std::int64_t want = (p.ld + kFirstRowsPerBlock - 1) / kFirstRowsPerBlock;
    parts = static_cast<unsigned>(want < 65535 ? (want > 0 ? want : 1) : 65535);
  }
  prepare_kernel<<<dim3(static_cast<unsigned>(p.batch), parts), kPrepareThreads, 0,
                   reinterpret_cast<cudaStream_t>(p.stream)>>>(p);
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? std::string() : std::string("prepare kernel: ") + cudaGetErrorString(err);
}

}  // namespace mmrprune_cuda
