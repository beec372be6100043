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

__global__ void __launch_bounds__(kPrepareThreads) prepare_kernel(PrepareParams p) {
  __shared__ float s_lo[kPrepareThreads];
  __shared__ float s_hi[kPrepareThreads];
  const std::int64_t b = blockIdx.x;
  const int tid = threadIdx.x;
  const std::int64_t start = reinterpret_cast<const std::int64_t*>(p.starts)[b];
  std::int64_t len = reinterpret_cast<const std::int64_t*>(p.lengths)[b];
  if (len < 0) len = 0;

  if (p.gram != 0) {
    const float* g = reinterpret_cast<const float*>(p.gram) + b * p.ld * p.ld;
    float* inv_norm = reinterpret_cast<float*>(p.inv_norm);
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
  if (p.score_kind == kScoreKeep) return;

  float* score = reinterpret_cast<float*>(p.score);
  const float* w = reinterpret_cast<const float*>(p.weights);
  const std::int64_t n_rows = p.width > 0 ? p.width : len;   // rows of this image in segment form
  if (p.score_kind == kScoreZero || w == nullptr) {
    const float fill = (p.score_kind == kScoreQuality) ? 1.0f : 0.0f;
    for (std::int64_t i = tid; i < n_rows; i += blockDim.x) score[start + i] = fill;
    return;
  }
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
    if (p.score_kind == kScoreQuality && constant) v = 1.0f;
    score[start + i] = v;
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
