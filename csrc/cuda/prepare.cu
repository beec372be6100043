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

// True when key a of row ia comes before key b of row ib in torch's descending stable sort:
// NaN first, then larger values, equal keys by lower row.
__device__ __forceinline__ bool ranks_before(float a, std::int64_t ia, float b, std::int64_t ib) {
  const bool a_nan = a != a, b_nan = b != b;
  if (a_nan || b_nan) return a_nan && (!b_nan || ia < ib);
  return a > b || (a == b && ia < ib);
}

// torch.amax's maximum: NaN wins.
__device__ __forceinline__ float max_nan(float a, float b) { return (a != a || a > b) ? a : b; }

__global__ void __launch_bounds__(kPrepareThreads) prepare_kernel(PrepareParams p) {
  __shared__ float s_lo[kPrepareThreads];
  __shared__ float s_hi[kPrepareThreads];
  const std::int64_t b = blockIdx.x;
  const int tid = threadIdx.x;
  const std::int64_t start = reinterpret_cast<const std::int64_t*>(p.starts)[b];
  std::int64_t len = reinterpret_cast<const std::int64_t*>(p.lengths)[b];
  if (len < 0) len = 0;
  const int kind = p.score_kind;   // uniform over the block, so every barrier below is too
  float* inv_norm = reinterpret_cast<float*>(p.inv_norm);
  const float* g = p.gram != 0 ? reinterpret_cast<const float*>(p.gram) + b * p.ld * p.ld : nullptr;

  if (g != nullptr) {
    float* sqn = reinterpret_cast<float*>(p.sqn);
    const std::int64_t n = p.width > 0 ? p.ld : (len < p.ld ? len : p.ld);
    for (std::int64_t i = tid; i < n; i += blockDim.x) {
      const float ss = g[i * (p.ld + 1)];
      const float nrm = sqrtf(ss > 0.0f ? ss : 0.0f);   // IEEE sqrt and division: no fast-math
      const float inv = 1.0f / (nrm > kPrepNormEps ? nrm : kPrepNormEps);
      inv_norm[start + i] = inv;
      if (sqn != nullptr) {
        const float unit = __fmul_rn(nrm, inv);
        sqn[start + i] = __fmul_rn(unit, unit);
      }
    }
  }
  if (kind == kScoreKeep) return;

  float* score = reinterpret_cast<float*>(p.score);
  const float* w = reinterpret_cast<const float*>(p.weights);
  const std::int64_t n_rows = p.width > 0 ? p.width : len;   // rows of this image in segment form
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
  if (kind != kScoreDivPrune && kind != kScoreImpPool) return;
  __syncthreads();   // the rows below read norms and scores other threads wrote

  if (kind == kScoreDivPrune) {
    // One warp per row: its lanes read the Gram row contiguously, then reduce the maximum.  The
    // padding rows of a padded batch (rows len .. width - 1, in the Gram too) get the same
    // expression over the image's tokens, as the torch path's padded layout gives them.
    float* first = reinterpret_cast<float*>(p.first_score);
    const int lane = tid & 31, n_warps = static_cast<int>(blockDim.x) >> 5;
    const std::int64_t n = len < p.ld ? len : p.ld;
    const std::int64_t n_gram_rows = n_rows < p.ld ? n_rows : p.ld;
    for (std::int64_t i = tid >> 5; i < n_gram_rows; i += n_warps) {
      float best = -INFINITY;   // a lone token: 1 - (-inf) = +inf
      const float* row = g + i * p.ld;
      for (std::int64_t j = lane; j < n; j += 32)
        if (j != i) best = max_nan(best, __fmul_rn(row[j], inv_norm[start + j]));
      for (int off = 16; off > 0; off >>= 1) best = max_nan(best, __shfl_xor_sync(0xffffffffu, best, off));
      if (lane == 0) first[start + i] = __fsub_rn(1.0f, __fmul_rn(best, inv_norm[start + i]));
    }
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
  const float* imp = score + start;
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
  prepare_kernel<<<static_cast<unsigned>(p.batch), kPrepareThreads, 0,
                   reinterpret_cast<cudaStream_t>(p.stream)>>>(p);
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? std::string() : std::string("prepare kernel: ") + cudaGetErrorString(err);
}

}  // namespace mmrprune_cuda
