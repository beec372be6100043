// mmrprune fused greedy selection kernels (see csrc/cuda/NOTES.md).
//
// One thread block per image runs every greedy step of that image in a single
// launch, with no host synchronisation between steps.  Images are segments of
// the [rows, D] feature matrix: image b owns rows starts[b] .. starts[b] +
// lengths[b] - 1, which covers padded and packed (varlen) batches alike.
//
// Per step, after the pick p of the previous step:
//   1. the block copies x̂_p = x_p * inv_norm[p] into shared memory as fp32;
//   2. each warp takes tokens i = warp, warp + nwarps, ...: the 32 lanes split
//      the dot product x_i · x̂_p over D (16-byte loads when aligned), reduce it
//      with shuffles, and lane 0 updates the token's state and its running best
//      (score, index) candidate;
//   3. a block-wide argmax over (score, index) pairs — greater score wins, an
//      equal score goes to the smaller index — gives the next pick.
// Token state (running max similarity m, or the DPP gains d^2 and Cholesky rows
// c) lives in global scratch indexed by row, so N is bounded only by memory.
// No torch headers: this file is compiled by plain nvcc.

#include "greedy.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#ifdef __CUDACC__
#include <cooperative_groups.h>  // the emulator (csrc/emu/cuda_emu.h) provides its own cluster_group
#endif

#include <algorithm>
#include <climits>
#include <cstdint>
#include <string>
#include <type_traits>

namespace mmrprune_cuda {
namespace {

constexpr float kNormEps = 1e-12f;   // reference.NORM_EPS
constexpr float kDppEps = 1e-6f;     // reference.DPP_EPS
constexpr int kNoPick = INT_MAX;     // "no candidate" sentinel of the argmax
constexpr unsigned kFullMask = 0xffffffffu;
// Headroom kept below the device's shared-memory opt-in for the kernels' static shared memory
// (the maxsim kernels' round lists: about 2.1 KiB; red_s, red_i: 264 bytes).
constexpr std::int64_t kStaticSmemHeadroom = 4096;

// ------------------------------------------------------------------ element conversion
__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

// A 16-byte vector of T unpacked into fp32.
template <typename T> struct Pack;
template <> struct Pack<float> {
  static constexpr int kN = 4;
  __device__ __forceinline__ static void unpack(const uint4& u, float* f) {
    f[0] = __uint_as_float(u.x);
    f[1] = __uint_as_float(u.y);
    f[2] = __uint_as_float(u.z);
    f[3] = __uint_as_float(u.w);
  }
};
template <> struct Pack<__half> {
  static constexpr int kN = 8;
  __device__ __forceinline__ static void unpack(const uint4& u, float* f) {
    const __half2* h = reinterpret_cast<const __half2*>(&u);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const float2 v = __half22float2(h[j]);
      f[2 * j] = v.x;
      f[2 * j + 1] = v.y;
    }
  }
};
template <> struct Pack<__nv_bfloat16> {
  static constexpr int kN = 8;
  __device__ __forceinline__ static void unpack(const uint4& u, float* f) {
    const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&u);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const float2 v = __bfloat1622float2(h[j]);
      f[2 * j] = v.x;
      f[2 * j + 1] = v.y;
    }
  }
};

// Butterfly sum: every lane ends with the same (bitwise) value.
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(kFullMask, v, off);
  return v;
}

// Where element d of a staged fp32 row (xs) lives in shared memory.  16-bit rows on the vector
// path load 8 elements per lane (one 16-byte global load), which need 8 floats of xs: stored in
// order, lane c would read 32 bytes at 32-byte lane stride (an 8-way bank conflict for scalar
// reads, 2-way for float4).  So per group of 32 chunks (256 elements) the first halves of the
// chunks come first, then the second halves: lane c reads float4 number c of each half, and
// consecutive lanes read consecutive 16 bytes (no conflict).  fp32 (4 elements per load, one float4
// per lane) and the scalar path keep the natural order.
template <typename T, bool kVec>
__device__ __forceinline__ std::int64_t xs_pos(std::int64_t d, std::int64_t dim) {
  if (!kVec || Pack<T>::kN != 8) return d;
  const std::int64_t g = d >> 8;
  const int w = static_cast<int>(d & 255);
  const std::int64_t left = (dim >> 3) - (g << 5);  // chunks in this group and after it
  const int gsize = left < 32 ? static_cast<int>(left) : 32;
  return (g << 8) + ((w >> 2) & 1) * gsize * 4 + (w >> 3) * 4 + (w & 3);
}

// Where lane `lane` finds, in a row staged by xs_pos, the V floats of vector c (c % 32 == lane) of
// a row of nv vectors: one float4 at o0 and, for V = 8, one at o1 (each half of the 32-vector group).
template <int V>
__device__ __forceinline__ void xs_offsets(std::int64_t c, std::int64_t nv, int lane, std::int64_t& o0,
                                           std::int64_t& o1) {
  if (V == 8) {
    const std::int64_t g = c >> 5;
    const std::int64_t left = nv - (g << 5);
    const int gsize = left < 32 ? static_cast<int>(left) : 32;
    o0 = (g << 8) + lane * 4;
    o1 = o0 + gsize * 4;
  } else {
    o0 = c * 4;
    o1 = o0;
  }
}

// The V staged floats at (o0, o1) of xs_offsets, in d order.
template <int V>
__device__ __forceinline__ void load_xs(const float* xq, std::int64_t o0, std::int64_t o1, float* s) {
  const float4 a = *reinterpret_cast<const float4*>(xq + o0);
  s[0] = a.x, s[1] = a.y, s[2] = a.z, s[3] = a.w;
  if (V == 8) {
    const float4 b = *reinterpret_cast<const float4*>(xq + o1);
    s[4] = b.x, s[5] = b.y, s[6] = b.z, s[7] = b.w;
  }
}

// sum_d row[d] * xs[d] over the warp (fp32 accumulation, in d order per lane); all lanes get the
// result.  xs is laid out by xs_pos.
template <typename T, bool kVec>
__device__ __forceinline__ float warp_dot(const T* __restrict__ row, const float* xs, std::int64_t dim,
                                          int lane) {
  float acc = 0.f;
  if (kVec) {
    constexpr int V = Pack<T>::kN;
    const std::int64_t nv = dim / V;
    const uint4* r4 = reinterpret_cast<const uint4*>(row);
#pragma unroll 4
    for (std::int64_t c = lane; c < nv; c += 32) {
      const uint4 u = __ldg(r4 + c);
      float f[V];
      Pack<T>::unpack(u, f);
      std::int64_t o0, o1;
      xs_offsets<V>(c, nv, lane, o0, o1);
      float s[8];
      load_xs<V>(xs, o0, o1, s);
#pragma unroll
      for (int j = 0; j < V; ++j) acc = fmaf(f[j], s[j], acc);
    }
  } else {
    for (std::int64_t d = lane; d < dim; d += 32) acc = fmaf(to_float(row[d]), xs[d], acc);
  }
  return warp_sum(acc);
}

// Picks whose dots a row-mode warp computes together per token (warp_dots).
constexpr int kDotBatch = 4;

// acc[q] = sum_d row[d] * xs[q * dim + d] for q < nb (<= B), each exactly as warp_dot computes it
// (same per-lane order, same butterfly), but the row is read once for all nb staged rows and the
// nb reductions share their 5 shuffle levels.  acc[q] for q >= nb is 0.
template <typename T, bool kVec, int B>
__device__ __forceinline__ void warp_dots(const T* __restrict__ row, const float* xs, std::int64_t dim, int lane,
                                          int nb, float* acc) {
#pragma unroll
  for (int q = 0; q < B; ++q) acc[q] = 0.f;
  if (kVec) {
    constexpr int V = Pack<T>::kN;
    const std::int64_t nv = dim / V;
    const uint4* r4 = reinterpret_cast<const uint4*>(row);
#pragma unroll 1
    for (std::int64_t c = lane; c < nv; c += 32) {
      const uint4 u = __ldg(r4 + c);
      float f[V];
      Pack<T>::unpack(u, f);
      std::int64_t o0, o1;  // this lane's float4 offsets within a staged row (xs_pos)
      xs_offsets<V>(c, nv, lane, o0, o1);
#pragma unroll
      for (int q = 0; q < B; ++q) {
        if (q < nb) {
          float s[8];
          load_xs<V>(xs + static_cast<std::int64_t>(q) * dim, o0, o1, s);
#pragma unroll
          for (int j = 0; j < V; ++j) acc[q] = fmaf(f[j], s[j], acc[q]);
        }
      }
    }
  } else {
    for (std::int64_t d = lane; d < dim; d += 32) {
      const float v = to_float(row[d]);
#pragma unroll
      for (int q = 0; q < B; ++q)
        if (q < nb) acc[q] = fmaf(v, xs[static_cast<std::int64_t>(q) * dim + d], acc[q]);
    }
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
#pragma unroll
    for (int q = 0; q < B; ++q) acc[q] += __shfl_xor_sync(kFullMask, acc[q], off);
  }
}

// sum_d row[d]^2 over the warp.
template <typename T, bool kVec>
__device__ __forceinline__ float warp_sumsq(const T* __restrict__ row, std::int64_t dim, int lane) {
  float acc = 0.f;
  if (kVec) {
    constexpr int V = Pack<T>::kN;
    const std::int64_t nv = dim / V;
    const uint4* r4 = reinterpret_cast<const uint4*>(row);
#pragma unroll 4
    for (std::int64_t c = lane; c < nv; c += 32) {
      const uint4 u = __ldg(r4 + c);
      float f[V];
      Pack<T>::unpack(u, f);
#pragma unroll
      for (int j = 0; j < V; ++j) acc = fmaf(f[j], f[j], acc);
    }
  } else {
    for (std::int64_t d = lane; d < dim; d += 32) {
      const float v = to_float(row[d]);
      acc = fmaf(v, v, acc);
    }
  }
  return warp_sum(acc);
}

// (s, i) beats (bs, bi): greater score, or equal score and smaller index.
// NaN scores (only possible with non-finite input and check_finite=False) count as -inf,
// so the pick is always a real candidate and never an out-of-range index.
__device__ __forceinline__ void consider(float s, int i, float& bs, int& bi) {
  if (s != s) s = -INFINITY;
  if (s > bs || (s == bs && i < bi)) {
    bs = s;
    bi = i;
  }
}

// Block-wide argmax of the per-thread candidates; every thread returns the winner
// (kNoPick when no thread had a candidate), whose score is then in red_s[32] (red_s and red_i
// hold 33 entries).  Contains two __syncthreads.
__device__ __forceinline__ int block_argmax(float bs, int bi, float* red_s, int* red_i) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int nwarps = blockDim.x >> 5;
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const float s2 = __shfl_xor_sync(kFullMask, bs, off);
    const int i2 = __shfl_xor_sync(kFullMask, bi, off);
    if (s2 > bs || (s2 == bs && i2 < bi)) {
      bs = s2;
      bi = i2;
    }
  }
  if (lane == 0) {
    red_s[warp] = bs;
    red_i[warp] = bi;
  }
  __syncthreads();
  if (warp == 0) {
    bs = lane < nwarps ? red_s[lane] : -INFINITY;
    bi = lane < nwarps ? red_i[lane] : kNoPick;
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      const float s2 = __shfl_xor_sync(kFullMask, bs, off);
      const int i2 = __shfl_xor_sync(kFullMask, bi, off);
      if (s2 > bs || (s2 == bs && i2 < bi)) {
        bs = s2;
        bi = i2;
      }
    }
    if (lane == 0) {
      red_s[32] = bs;
      red_i[32] = bi;
    }
  }
  __syncthreads();
  return red_i[32];
}

// Budget of image b, clamped so that garbage ks/lengths (check_finite=False) cannot index out of range.
__device__ __forceinline__ std::int64_t image_budget(std::int64_t len, std::int64_t k, std::int64_t k_max) {
  std::int64_t kb = k < len ? k : len;
  kb = kb < k_max ? kb : k_max;
  return kb < 0 ? 0 : kb;
}

// ------------------------------------------------------------------ kernels
template <typename T, bool kVec>
__global__ void __launch_bounds__(256) inv_norm_kernel(const T* __restrict__ x, std::int64_t rows,
                                                       std::int64_t dim, float* __restrict__ inv_norm,
                                                       float* __restrict__ sqn) {
  const int lane = threadIdx.x & 31;
  const std::int64_t warps_per_block = blockDim.x >> 5;
  const std::int64_t first = static_cast<std::int64_t>(blockIdx.x) * warps_per_block + (threadIdx.x >> 5);
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * warps_per_block;
  for (std::int64_t r = first; r < rows; r += stride) {
    const float ss = warp_sumsq<T, kVec>(x + r * dim, dim, lane);
    if (lane == 0) {
      const float inv = 1.0f / fmaxf(sqrtf(ss), kNormEps);
      inv_norm[r] = inv;
      if (sqn != nullptr) sqn[r] = ss * inv * inv;
    }
  }
}

// ------------------------------------------------------------------ exact rounds (maxsim)
// (s, i) beats (bs, bi): the order of consider(), without the NaN mapping (done on insertion).
__device__ __forceinline__ bool beats(float s, int i, float bs, int bi) { return s > bs || (s == bs && i < bi); }

// Insert (s, i) into the sorted list (ts, ti)[kMaxRound] (best first), dropping the last entry.
// Fully unrolled with constant indices, so the list stays in registers.
__device__ __forceinline__ void top_insert(float s, int i, float* ts, int* ti) {
  if (s != s) s = -INFINITY;  // NaN counts as -inf, as in consider()
  if (!beats(s, i, ts[kMaxRound - 1], ti[kMaxRound - 1])) return;
#pragma unroll
  for (int j = kMaxRound - 1; j > 0; --j) {
    if (beats(s, i, ts[j - 1], ti[j - 1])) {  // (s, i) goes before slot j - 1: shift it down
      ts[j] = ts[j - 1];
      ti[j] = ti[j - 1];
    } else if (beats(s, i, ts[j], ti[j])) {  // slot j - 1 stays ahead: (s, i) lands at j
      ts[j] = s;
      ti[j] = i;
    }
  }
  if (beats(s, i, ts[0], ti[0])) {
    ts[0] = s;
    ti[0] = i;
  }
}

__device__ __forceinline__ void top_clear(float* ts, int* ti) {
#pragma unroll
  for (int j = 0; j < kMaxRound; ++j) {
    ts[j] = -INFINITY;
    ti[j] = kNoPick;
  }
}

// Order-preserving key of a score (NaN already mapped to -inf): a greater score gives a greater
// unsigned key, and -0 and +0 get one key, as beats() treats them as equal.
__device__ __forceinline__ unsigned score_key(float s) {
  const unsigned u = __float_as_uint(s == 0.f ? 0.f : s);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
__device__ __forceinline__ float key_score(unsigned k) {
  return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}

// The best `pops` (<= kMaxRound) entries of the union of the 32 lanes' sorted lists, best first,
// written by lane 0 to (dst_s, dst_i) (kNoPick past the last real entry).  Each pop is two warp
// reductions (REDUX), not a 5-level shuffle butterfly: the greatest score key, then the smallest
// index among the lanes holding it; the winner's lane pops its head (token indices are unique
// across lanes) and calls on_pop(q, h, index) for it: pop q of the merge, the h-th entry that
// lane pops.  Returns the number of real entries written (uniform over the warp).
template <class OnPop>
__device__ __forceinline__ int warp_merge_top(float* ts, int* ti, float* dst_s, int* dst_i, int lane, int pops,
                                              OnPop on_pop) {
  int got = 0, head = 0;
#pragma unroll 1
  for (int q = 0; q < pops; ++q) {
    const unsigned key = score_key(ts[0]);
    const unsigned best = __reduce_max_sync(kFullMask, key);
    const int bi = static_cast<int>(
        __reduce_min_sync(kFullMask, key == best ? static_cast<unsigned>(ti[0]) : 0xffffffffu));
    if (lane == 0) {
      dst_s[q] = key_score(best);
      dst_i[q] = bi;
    }
    if (bi == kNoPick) {  // every list is empty: so are the remaining pops (uniform exit)
      if (lane == 0)
        for (int u = q + 1; u < pops; ++u) {
          dst_s[u] = -INFINITY;
          dst_i[u] = kNoPick;
        }
      break;
    }
    ++got;
    if (ti[0] == bi) {
      on_pop(q, head, bi);
      ++head;
#pragma unroll
      for (int j = 0; j + 1 < kMaxRound; ++j) {
        ts[j] = ts[j + 1];
        ti[j] = ti[j + 1];
      }
      ts[kMaxRound - 1] = -INFINITY;
      ti[kMaxRound - 1] = kNoPick;
    }
  }
  return got;
}

__device__ __forceinline__ int warp_merge_top(float* ts, int* ti, float* dst_s, int* dst_i, int lane, int pops) {
  return warp_merge_top(ts, ti, dst_s, dst_i, lane, pops, [](int, int, int) {});
}

// warp_merge_top that also writes a value per popped entry: dst_m[q] = m_of(h, index) (dst_m[q]
// for q >= the returned count is not written; visible to the warp after a __syncwarp).  The
// cluster kernel carries each candidate's m this way, so that the commit check of another CTA
// never reads the owner's live state.  (A register array of the values, shifted with the list,
// made ptxas spill at the cap.)
template <class MOf>
__device__ __forceinline__ int warp_merge_top_m(float* ts, int* ti, float* dst_s, int* dst_i, float* dst_m,
                                                int lane, int pops, MOf m_of) {
  return warp_merge_top(ts, ti, dst_s, dst_i, lane, pops, [&](int q, int h, int i) { dst_m[q] = m_of(h, i); });
}

// Lane l of a warp takes list l's first `cap` entries (src_s / src_i, already offset to list l;
// nothing when !present), ready for warp_merge_top.
__device__ __forceinline__ void load_list(float* ts, int* ti, const float* src_s, const int* src_i, bool present,
                                          int cap) {
#pragma unroll
  for (int j = 0; j < kMaxRound; ++j) {
    const bool in = present && j < cap;
    ts[j] = in ? src_s[j] : -INFINITY;
    ti[j] = in ? src_i[j] : kNoPick;
  }
}

// Gram mode, warp 0 once the round's `valid` candidates are in cand_i: stages each candidate's
// Gram row offset and inverse norm for the state update (cand_row, cand_inv: visible after the
// next barrier) and returns, in every lane, how many candidates commit.  c_j joins while
// sim(c_j, c_l) <= m_of(j, c_j) for every earlier c_l of the round, m_of(j, c) being the m of
// candidate j (token c) that the check may read.
template <class MOf>
__device__ __forceinline__ int gram_commit_round(const float* __restrict__ gram_b, std::int64_t ld,
                                                 const float* __restrict__ inv_b, const int* cand_i,
                                                 std::int64_t* cand_row, float* cand_inv, int valid, int lane,
                                                 MOf m_of) {
  if (lane < valid) {
    const int c = cand_i[lane];
    cand_row[lane] = static_cast<std::int64_t>(c) * ld;
    cand_inv[lane] = inv_b[c];
  }
  if (valid <= 1) return valid;
  // pair q = j (j - 1) / 2 + l (l < j < valid) on lane q, all loads at once; the first failing
  // pair in q order has the smallest j, which is the number of candidates that commit.
  int j = 1, base = 0;
  while (base + j <= lane) {
    base += j;
    ++j;
  }
  const int l = lane - base;
  bool fails = false;
  if (j < valid) {
    const int c = cand_i[j], cl = cand_i[l];
    fails = !(__fmul_rn(__ldg(gram_b + static_cast<std::int64_t>(cl) * ld + c) * inv_b[cl], inv_b[c]) <= m_of(j, c));
  }
  const unsigned failed = __ballot_sync(kFullMask, fails);
  if (failed == 0u) return valid;
  const int q = __ffs(static_cast<int>(failed)) - 1;
  int jq = 1, bq = 0;
  while (bq + jq <= q) {
    bq += jq;
    ++jq;
  }
  return jq;
}

// Gram mode: token i's m after the round's r committed picks, from its m before them (mi) and
// the picks' staged row offsets and inverse norms.  The loop over picks is unrolled and
// predicated, so the r Gram reads are all in flight before the first use.
__device__ __forceinline__ float gram_round_m(const float* __restrict__ gram_b, const float* __restrict__ inv_b,
                                              const std::int64_t* cand_row, const float* cand_inv, int r, int i,
                                              float mi) {
  const float ii = inv_b[i];
  float g[kMaxRound];
#pragma unroll
  for (int j = 0; j < kMaxRound; ++j) g[j] = j < r ? __ldg(gram_b + cand_row[j] + i) : 0.f;
#pragma unroll
  for (int j = 0; j < kMaxRound; ++j)
    if (j < r) mi = fmaxf(mi, __fmul_rn(g[j] * cand_inv[j], ii));
  return mi;
}

// MMR / FPS / hybrid / DivPrune in exact rounds (reference.select_rounds).
//   step 0 : argmax over eligible tokens of first_score (if given) else imp (a round of one);
//   step t : argmax over eligible, untaken tokens of lam * imp - (1 - lam) * m,
//            m_i = max over picks j of sim(i, j).
// One round: the block's best kMaxRound untaken tokens c_1, c_2, ... in (score desc, index asc)
// order (one reduction of sorted per-thread lists: block_top_round); c_1 is the next pick, and
// c_j joins the round while sim(c_j, c_l) <= m_{c_j} for every earlier c_l of the round (its
// score cannot change while every other score can only fall), up to max_round candidates and
// the budget; then one state update applies every committed pick.  Every pair similarity is the
// very expression (same operands, same order) the state update computes for it, so the picks
// are bit-identical to one pick per step (max_round = 1).
// eligible == nullptr means every valid token is eligible (hybrid passes its pool).
// The similarity source is the template parameter, as in dpp_body:
//   row mode (kGram = false): sim(p, i) = (x_i . x̂_p) * inv_norm[i], warp per token (the
//     lanes split the dot product over D).  The round's candidate rows x̂_{c_j} are staged in
//     shared memory (xs[j * dim ..], up to max_round rows); warps compute the pair sims of the
//     commit check with warp_dot, and the update dots every token with each committed row.
//     Token i belongs to warp i % nwarps, whose lane 0 marks it taken (__syncwarp publishes it).
//   Gram mode (kGram = true): sim(p, i) = (gram[b][p][i] * inv_norm[p]) * inv_norm[i], one
//     contiguous fp32 read per token from the raw Gram [batch, ld, ld] (x is then unused).
//     Thread per token: token i belongs to thread i % blockDim.x for the whole launch, so its
//     state (m_i, taken_i) is private to that thread and needs no barrier between steps (the
//     owner marks its own token taken when it is picked).  kSmem: the state lives in dynamic
//     shared memory (ld * 5 bytes), else in the global scratch indexed by row.  Warp 0 runs the
//     commit check (reading m_{c_j} before the barrier that ends the reduction).
//     kOwn > 0 (with kSmem, when n <= kOwn * blockDim.x): thread tid owns the fixed slots
//     i = tid + s * blockDim.x, s < kOwn, and keeps their m_i, imp_i and taken bits in registers
//     across rounds, so the update reads no state from memory; it still stores each new m_i to
//     shared memory, where only the commit check (another thread's candidates) reads it.
// rounds (may be null): rounds[b] = the number of rounds image b ran.
template <typename T, bool kVec, bool kGram, bool kSmem, int kOwn = 0>
__device__ __forceinline__ void maxsim_body(
    const T* __restrict__ x, std::int64_t dim, const float* __restrict__ gram, std::int64_t ld,
    const float* __restrict__ inv_norm, const float* __restrict__ imp, const float* __restrict__ first_score,
    const std::uint8_t* __restrict__ eligible, const std::int64_t* __restrict__ starts,
    const std::int64_t* __restrict__ lengths, const std::int64_t* __restrict__ ks, std::int64_t k_max,
    float lam, float omlam, float* m_g, std::uint8_t* taken_g, std::int64_t* __restrict__ out,
    std::int64_t* __restrict__ rounds, int max_round) {
  static_assert(kGram || !kSmem, "only Gram mode keeps its token state in shared memory");
  static_assert(kOwn == 0 || kSmem, "register-owned tokens publish m to shared memory");
  static_assert(kOwn <= 32, "taken bits of the owned slots live in one 32-bit register");
  constexpr bool kReg = kOwn > 0;
  // row mode: xs[max_round * dim], the round's normalised candidate rows (fp32); Gram mode with
  // kSmem: m[ld] fp32, then taken[ld] bytes
  extern __shared__ float dyn_s[];
  __shared__ float list_s[32 * kMaxRound];  // each warp's best kMaxRound (score, index)
  __shared__ int list_i[32 * kMaxRound];
  __shared__ int cand_i[kMaxRound];         // the round's candidates, best first
  __shared__ std::int64_t cand_row[kMaxRound];  // Gram mode: offset of candidate j's Gram row
  __shared__ float cand_inv[kMaxRound];         // Gram mode: inv_norm of candidate j
  __shared__ std::uint8_t pair_ok[kMaxRound * (kMaxRound - 1) / 2];  // row mode: check of (c_j, c_l), l < j
  __shared__ int round_n[1];                // Gram: committed count; row: candidates to stage

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int nwarps = blockDim.x >> 5;
  // Block-wide loops step by nthreads: a signed copy of blockDim.x in Gram mode, blockDim.x
  // itself (unsigned) in row mode, the forms each mode was compiled with before they shared
  // this body.  A signed copy in row mode made ptxas spill the scalar kernels on sm_90.
  using Stride = std::conditional_t<kGram, int, unsigned>;
  const Stride nthreads = blockDim.x;
  // who scores token i: warp i % nwarps (row mode) or thread i % nthreads (Gram mode)
  const int worker = kGram ? tid : warp;
  const int nworkers = kGram ? static_cast<int>(nthreads) : nwarps;
  const std::int64_t b = blockIdx.x;
  const std::int64_t start = starts[b];
  std::int64_t len = lengths[b];
  if (kGram && len > ld) len = ld;  // a segment never leaves its Gram block (garbage lengths)
  const int n = len > 0 ? static_cast<int>(len) : 0;
  const std::int64_t kb = image_budget(len, ks[b], k_max);
  std::int64_t* out_b = out + b * k_max;
  for (std::int64_t t = kb + tid; t < k_max; t += nthreads) out_b[t] = -1;
  if (kb == 0) {  // uniform over the block: no barrier is skipped by part of it
    if (rounds != nullptr && tid == 0) rounds[b] = 0;
    return;
  }

  float* xs = dyn_s;
  float* m = kSmem ? dyn_s : m_g + start;
  std::uint8_t* taken = kSmem ? reinterpret_cast<std::uint8_t*>(dyn_s + ld) : taken_g + start;
  const float* imp_b = imp + start;
  const float* inv_b = inv_norm + start;
  const float* gram_b = kGram ? gram + b * ld * ld : nullptr;

  // step 0: initialise the state, score the first pick
  float ts[kMaxRound];
  int ti[kMaxRound];
  top_clear(ts, ti);
  // kOwn > 0: the owned slots' state (sized 1 otherwise, and then unused)
  float own_m[kReg ? kOwn : 1], own_imp[kReg ? kOwn : 1];
  unsigned own_taken = 0u;  // bit s: slot s taken (or not eligible, or past the image)
  if (kReg) {
#pragma unroll
    for (int s = 0; s < (kReg ? kOwn : 1); ++s) {
      const int i = tid + s * static_cast<int>(nthreads);
      own_m[s] = -INFINITY;
      own_imp[s] = 0.f;
      const bool ok = i < n && (eligible == nullptr || eligible[start + i] != 0);
      if (i < n) {
        m[i] = -INFINITY;
        own_imp[s] = imp_b[i];
      }
      if (ok) top_insert(first_score != nullptr ? first_score[start + i] : own_imp[s], i, ts, ti);
      else own_taken |= 1u << s;
    }
  } else {
    for (int i = tid; i < n; i += nthreads) {
      m[i] = -INFINITY;
      const bool ok = eligible == nullptr || eligible[start + i] != 0;
      taken[i] = ok ? 0 : 1;
      if (ok) top_insert(first_score != nullptr ? first_score[start + i] : imp_b[i], i, ts, ti);
    }
  }

  // Row mode after step 0: lane 0, which alone scores the warp's tokens, keeps the warp's list
  // in shared memory (a list in registers across the dot loop made ptxas spill on sm_80).
  float* warp_ls = list_s + warp * kMaxRound;
  int* warp_li = list_i + warp * kMaxRound;
  if (!kGram) warp_merge_top(ts, ti, warp_ls, warp_li, lane, kMaxRound);  // step 0 scored thread per token
  std::int64_t t = 0;
  std::int64_t nrounds = 0;
  int cap = 1;  // candidates this round may commit: the first round is a round of one
  while (true) {
    // ---- the block's best `cap` candidates (only they can commit this round), and (Gram mode)
    // the commit check.  A warp list holds `cap` valid entries in Gram mode (the merge below
    // writes that many), kMaxRound in row mode; warp 0 reads the first `cap` of each.
    if (kGram) warp_merge_top(ts, ti, warp_ls, warp_li, lane, cap);
    __syncthreads();
    if (warp == 0) {
      load_list(ts, ti, list_s + lane * kMaxRound, list_i + lane * kMaxRound, lane < nwarps, cap);
      __syncwarp();  // every lane's reads are done before lane 0 overwrites list_s[0 ..)
      const int valid = warp_merge_top(ts, ti, list_s, cand_i, lane, cap);  // warp 0's own list was read above
      __syncwarp();  // cand_i visible to the warp
      int r = valid;  // row mode: the block checks the pairs after the barrier below
      if (kGram)  // m_{c_j} is read before the barrier that ends the reduction
        r = gram_commit_round(gram_b, ld, inv_b, cand_i, cand_row, cand_inv, valid, lane,
                              [&](int, int c) { return m[c]; });
      if (lane == 0) round_n[0] = r;
    }
    __syncthreads();
    int r = round_n[0];
    if (!kGram && r > 0) {
      // stage the candidates' normalised rows, then the pair checks of the commit rule
      #pragma unroll 1
      for (int j = 0; j < r; ++j) {
        const int c = cand_i[j];
        const float ic = inv_b[c];
        const T* xc = x + (start + c) * dim;
        float* xj = xs + static_cast<std::int64_t>(j) * dim;
        for (std::int64_t d = tid; d < dim; d += nthreads) xj[xs_pos<T, kVec>(d, dim)] = to_float(xc[d]) * ic;
      }
      if (r > 1) {
        __syncthreads();  // the staged rows xs[0..r) visible to the whole block
        #pragma unroll 1
        for (int j = 1, q = 0; j < r; ++j) {
          for (int l = 0; l < j; ++l, ++q) {
            if (q % nwarps != warp) continue;
            const int c = cand_i[j];
            const float dot = warp_dot<T, kVec>(x + (start + c) * dim, xs + static_cast<std::int64_t>(l) * dim,
                                                dim, lane);
            if (lane == 0) pair_ok[q] = dot * inv_b[c] <= m[c] ? 1 : 0;
          }
        }
      }
      __syncthreads();  // pair_ok (and a single staged row) visible; every m read is done
      int committed = 1;
      for (int j = 1, q = 0; j < r; ++j) {
        bool ok = true;
        for (int l = 0; l < j; ++l, ++q) ok = ok && pair_ok[q] != 0;
        if (!ok) break;
        ++committed;
      }
      r = committed;  // identical in every thread: read from the same shared bytes
    }
    if (r == 0) {  // fewer candidates than the budget (only with inconsistent inputs)
      for (std::int64_t u = t + tid; u < kb; u += nthreads) out_b[u] = -1;
      break;
    }
    // ---- commit c_1 .. c_r
    #pragma unroll 1
    for (int j = 0; j < r; ++j) {
      const int p = cand_i[j];
      if (tid == 0) out_b[t + j] = p;
      // the owner of token p, which alone reads its flag again: its thread (Gram mode) or
      // lane 0 of its warp (row mode)
      const int flag_writer = kGram ? p % nthreads : (p % nworkers) * 32;
      if (flag_writer == tid) {
        if (kReg) own_taken |= 1u << (p / static_cast<int>(nthreads));
        else taken[p] = 1;
      }
    }
    if (!kGram) __syncwarp();  // row mode: the flag reaches the other lanes of the owner warp
    t += r;
    ++nrounds;
    if (t >= kb) break;
    const std::int64_t left = kb - t;
    cap = left < max_round ? static_cast<int>(left) : max_round;

    // ---- one state update for every committed pick, scoring the next round
    if (kReg) {
      top_clear(ts, ti);
      // every slot unrolled, its state in registers: the loads of a slot are the r Gram entries
      // and inv_i, all independent
#pragma unroll
      for (int s = 0; s < (kReg ? kOwn : 1); ++s) {
        const int i = tid + s * static_cast<int>(nthreads);
        if ((own_taken >> s) & 1u) continue;
        const float mi = gram_round_m(gram_b, inv_b, cand_row, cand_inv, r, i, own_m[s]);
        own_m[s] = mi;
        m[i] = mi;  // for the commit check of a later round (warp 0 reads it)
        top_insert(__fsub_rn(__fmul_rn(lam, own_imp[s]), __fmul_rn(omlam, mi)), i, ts, ti);
      }
    } else if (kGram) {
      top_clear(ts, ti);
      // Gram mode: the picks' row offsets and norms come from shared memory (written once by
      // warp 0); register arrays of them made ptxas spill at the 64-register cap.
      for (int i = tid; i < n; i += nthreads) {
        if (taken[i]) continue;
        const float mi = gram_round_m(gram_b, inv_b, cand_row, cand_inv, r, i, m[i]);
        m[i] = mi;
        // no contraction into an FMA: same rounding as the torch backend's two products
        top_insert(__fsub_rn(__fmul_rn(lam, imp_b[i]), __fmul_rn(omlam, mi)), i, ts, ti);
      }
    } else {
      if (lane == 0) top_clear(warp_ls, warp_li);
      for (int i = warp; i < n; i += nwarps) {
        if (taken[i]) continue;  // warp-uniform, every lane reads the same byte
        float mi = lane == 0 ? m[i] : 0.f;  // lane 0 alone reads and writes m[i]
        // kDotBatch picks at a time: the token's row is read once per batch, not once per pick
#pragma unroll 1
        for (int j0 = 0; j0 < r; j0 += kDotBatch) {
          float acc[kDotBatch];
          warp_dots<T, kVec, kDotBatch>(x + (start + i) * dim, xs + static_cast<std::int64_t>(j0) * dim, dim, lane,
                                        r - j0 < kDotBatch ? r - j0 : kDotBatch, acc);
#pragma unroll
          for (int q = 0; q < kDotBatch; ++q)
            if (j0 + q < r) mi = fmaxf(mi, acc[q] * inv_b[i]);
        }
        if (lane == 0) {
          m[i] = mi;
          top_insert(__fsub_rn(__fmul_rn(lam, imp_b[i]), __fmul_rn(omlam, mi)), i, warp_ls, warp_li);
        }
      }
    }
    // the next round's first barrier also ends every read of xs and cand_i
  }
  if (rounds != nullptr && tid == 0) rounds[b] = nrounds;
}

template <typename T, bool kVec>
__global__ void __launch_bounds__(kGreedyThreads) greedy_maxsim_kernel(
    const T* __restrict__ x, std::int64_t dim, const float* __restrict__ inv_norm,
    const float* __restrict__ imp, const float* __restrict__ first_score,
    const std::uint8_t* __restrict__ eligible, const std::int64_t* __restrict__ starts,
    const std::int64_t* __restrict__ lengths, const std::int64_t* __restrict__ ks, std::int64_t k_max,
    float lam, float omlam, float* m_g, std::uint8_t* taken_g, std::int64_t* __restrict__ out,
    std::int64_t* __restrict__ rounds, int max_round) {
  maxsim_body<T, kVec, false, false>(x, dim, nullptr, 0, inv_norm, imp, first_score, eligible, starts, lengths,
                                     ks, k_max, lam, omlam, m_g, taken_g, out, rounds, max_round);
}

// Gram mode of maxsim_body (no feature reads in the loop); kOwn: see maxsim_body.
template <bool kSmem, int kOwn>
__global__ void __launch_bounds__(kGreedyThreads) greedy_maxsim_gram_kernel(
    const float* __restrict__ gram, std::int64_t ld, const float* __restrict__ inv_norm,
    const float* __restrict__ imp, const float* __restrict__ first_score,
    const std::uint8_t* __restrict__ eligible, const std::int64_t* __restrict__ starts,
    const std::int64_t* __restrict__ lengths, const std::int64_t* __restrict__ ks, std::int64_t k_max,
    float lam, float omlam, float* m_g, std::uint8_t* taken_g, std::int64_t* __restrict__ out,
    std::int64_t* __restrict__ rounds, int max_round) {
  maxsim_body<float, false, true, kSmem, kOwn>(nullptr, 1, gram, ld, inv_norm, imp, first_score, eligible, starts,
                                         lengths, ks, k_max, lam, omlam, m_g, taken_g, out, rounds, max_round);
}

// ------------------------------------------------------------------ several SMs per image (sm_90)
// Gram-mode maxsim on a thread-block cluster of `csize` CTAs per image (grid = batch * csize,
// cluster (csize, 1, 1), so image b is CTAs b * csize .. b * csize + csize - 1).  The picks and
// rounds are exactly those of greedy_maxsim_gram_kernel: the same candidate order, commit check
// and state update; only who holds which token changes.  With T = csize * blockDim.x threads in
// the cluster, token i belongs to cluster thread g = i % T (CTA g / blockDim.x, thread
// g % blockDim.x), slot s = i / T < kOwn, whose m_i, imp_i and taken bit stay in that thread's
// registers (m_i is also stored to the CTA's shared memory at local index
// tid + s * blockDim.x, for the CTA's own candidate list).  One round:
//   1. each warp merges its lanes' lists, one __syncthreads, warp 0 merges the CTA's warp lists
//      into the CTA's best `cap` (score, index, m) and writes them to xch_*[round parity];
//   2. ONE cluster barrier (cluster.sync(): every thread of every CTA, release/acquire, so the
//      lists are visible through distributed shared memory);
//   3. warp 0 of every CTA reads the csize lists (lane l from CTA l, map_shared_rank) and
//      merges them into the round's candidates: every CTA computes the same list, from the
//      same data in the same order; it runs the commit check on the carried m_{c_j} (the
//      owner's state may already move on), then a __syncthreads publishes the count;
//   4. the owners mark their picks taken and every CTA updates its own tokens.
// The exchange lists are double-buffered by round parity: a CTA writes buffer p in round t
// only after the cluster barrier of round t - 1, which every CTA reaches after its reads of
// round t - 2 (buffer p), so one cluster barrier per round suffices.  A last cluster barrier
// keeps every CTA (and its shared memory) alive until the others' reads of the last round are
// done.  sm_80 has no clusters: there the body is empty and the launcher never selects it.
template <int kOwn>
__global__ void __launch_bounds__(kGreedyThreads) greedy_maxsim_gram_cluster_kernel(
    const float* __restrict__ gram, std::int64_t ld, const float* __restrict__ inv_norm,
    const float* __restrict__ imp, const float* __restrict__ first_score,
    const std::uint8_t* __restrict__ eligible, const std::int64_t* __restrict__ starts,
    const std::int64_t* __restrict__ lengths, const std::int64_t* __restrict__ ks, std::int64_t k_max,
    float lam, float omlam, std::int64_t* __restrict__ out, std::int64_t* __restrict__ rounds, int max_round) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900
  static_assert(kOwn >= 1 && kOwn <= 32, "taken bits of the owned slots live in one 32-bit register");
  namespace cg = cooperative_groups;
  cg::cluster_group cluster = cg::this_cluster();
  extern __shared__ float m_loc[];  // [kOwn * blockDim.x]: m of this CTA's slots
  __shared__ float list_s[32 * kMaxRound];
  __shared__ int list_i[32 * kMaxRound];
  __shared__ float xch_s[2][kMaxRound];  // this CTA's best `cap` of the round, by round parity
  __shared__ int xch_i[2][kMaxRound];
  __shared__ float xch_m[2][kMaxRound];
  __shared__ int cand_i[kMaxRound];
  __shared__ float cand_m[kMaxRound];
  __shared__ std::int64_t cand_row[kMaxRound];
  __shared__ float cand_inv[kMaxRound];
  __shared__ int round_n[1];

  const int csize = static_cast<int>(cluster.num_blocks());
  const int rank = static_cast<int>(cluster.block_rank());
  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int cta_threads = blockDim.x;
  const int nwarps = cta_threads >> 5;
  const int T = csize * cta_threads;     // threads of the cluster
  const int g_self = rank * cta_threads + tid;
  const std::int64_t b = blockIdx.x / csize;
  const std::int64_t start = starts[b];
  std::int64_t len = lengths[b];
  if (len > ld) len = ld;
  const int n = len > 0 ? static_cast<int>(len) : 0;
  const std::int64_t kb = image_budget(len, ks[b], k_max);
  std::int64_t* out_b = out + b * k_max;
  if (rank == 0)
    for (std::int64_t t = kb + tid; t < k_max; t += cta_threads) out_b[t] = -1;
  if (kb == 0) {  // uniform over the cluster, before any exchange
    if (rounds != nullptr && rank == 0 && tid == 0) rounds[b] = 0;
    return;
  }
  const float* imp_b = imp + start;
  const float* inv_b = inv_norm + start;
  const float* gram_b = gram + b * ld * ld;

  float ts[kMaxRound];
  int ti[kMaxRound];
  top_clear(ts, ti);
  float own_m[kOwn], own_imp[kOwn];
  unsigned own_taken = 0u;
#pragma unroll
  for (int s = 0; s < kOwn; ++s) {
    const int i = g_self + s * T;
    own_m[s] = -INFINITY;
    own_imp[s] = 0.f;
    m_loc[tid + s * cta_threads] = -INFINITY;
    const bool ok = i < n && (eligible == nullptr || eligible[start + i] != 0);
    if (i < n) own_imp[s] = imp_b[i];
    if (ok) top_insert(first_score != nullptr ? first_score[start + i] : own_imp[s], i, ts, ti);
    else own_taken |= 1u << s;
  }
  float* warp_ls = list_s + warp * kMaxRound;
  int* warp_li = list_i + warp * kMaxRound;
  std::int64_t t = 0;
  std::int64_t nrounds = 0;
  int cap = 1;
  int par = 0;
  while (true) {
    warp_merge_top(ts, ti, warp_ls, warp_li, lane, cap);
    __syncthreads();
    if (warp == 0) {  // this CTA's best `cap`, with their m, to the exchange buffer
      load_list(ts, ti, list_s + lane * kMaxRound, list_i + lane * kMaxRound, lane < nwarps, cap);
      // a listed token i is this CTA's: slot i / T, local index (i % T) - rank * cta_threads + slot * cta_threads
      warp_merge_top_m(ts, ti, xch_s[par], xch_i[par], xch_m[par], lane, cap, [&](int, int i) {
        return m_loc[(i % T) - rank * cta_threads + (i / T) * cta_threads];
      });
    }
    cluster.sync();  // the round's one cluster barrier: every CTA's list is published
    if (warp == 0) {
      const int src = lane < csize ? lane : rank;  // lanes past the cluster read nothing remote
      const float* rm = cluster.map_shared_rank(&xch_m[par][0], src);
      load_list(ts, ti, cluster.map_shared_rank(&xch_s[par][0], src), cluster.map_shared_rank(&xch_i[par][0], src),
                lane < csize, cap);
      // lane l pops CTA l's list in order: its h-th pop is that list's entry h
      const int valid =
          warp_merge_top_m(ts, ti, list_s, cand_i, cand_m, lane, cap, [&](int h, int) { return rm[h]; });
      __syncwarp();  // cand_i, cand_m visible to the warp
      // the commit check of maxsim_body, on the carried m_{c_j}
      const int r = gram_commit_round(gram_b, ld, inv_b, cand_i, cand_row, cand_inv, valid, lane,
                                      [&](int j, int) { return cand_m[j]; });
      if (lane == 0) round_n[0] = r;
    }
    __syncthreads();
    par ^= 1;
    const int r = round_n[0];
    if (r == 0) {  // fewer candidates than the budget (only with inconsistent inputs)
      if (rank == 0)
        for (std::int64_t u = t + tid; u < kb; u += cta_threads) out_b[u] = -1;
      break;
    }
#pragma unroll 1
    for (int j = 0; j < r; ++j) {
      const int p = cand_i[j];
      if (rank == 0 && tid == 0) out_b[t + j] = p;
      if (p % T == g_self) own_taken |= 1u << (p / T);
    }
    t += r;
    ++nrounds;
    if (t >= kb) break;
    const std::int64_t left = kb - t;
    cap = left < max_round ? static_cast<int>(left) : max_round;

    top_clear(ts, ti);
#pragma unroll
    for (int s = 0; s < kOwn; ++s) {
      const int i = g_self + s * T;
      if ((own_taken >> s) & 1u) continue;
      const float mi = gram_round_m(gram_b, inv_b, cand_row, cand_inv, r, i, own_m[s]);
      own_m[s] = mi;
      m_loc[tid + s * cta_threads] = mi;
      top_insert(__fsub_rn(__fmul_rn(lam, own_imp[s]), __fmul_rn(omlam, mi)), i, ts, ti);
    }
  }
  if (rounds != nullptr && rank == 0 && tid == 0) rounds[b] = nrounds;
  cluster.sync();  // no CTA exits (freeing its shared memory) while another may read its lists
#endif
}

// One warp's DPP update of untaken token i against the step's pick p (Cholesky column s):
//   e = (q_p sim(p, i) q_i - <c_p, c_i>) / sqrt(d2_p), c_i[s] = e, d2_i -= e^2.
// dot is x_i . x̂_p (= sim * ||x_i||); the projection is lane-strided with one shuffle sum.  The
// one-block and cluster kernels share it, and the scalar tail is written in _rn intrinsics (no
// contraction choice left to the compiler), so both compute every gain bit for bit alike.
// Lane 0 reads token i's inverse norm, quality and gain (*inv_i, *qi, *d2i) after the sum, writes
// c_i[s] and *d2i, and returns the new d2_i (the other lanes' value is unused).
__device__ __forceinline__ float dpp_update(float dot, const float* inv_i, const float* qi, float qp, float dj,
                                            float* d2i, float* ci, const float* cp, std::int64_t s, int lane) {
  float proj = 0.f;
  for (std::int64_t u = lane; u < s; u += 32) proj = fmaf(ci[u], cp[u], proj);
  proj = warp_sum(proj);
  float nd = 0.f;
  if (lane == 0) {
    const float l = __fmul_rn(__fmul_rn(qp, __fmul_rn(dot, *inv_i)), *qi);
    const float e = __fdiv_rn(__fsub_rn(l, proj), dj);
    ci[s] = e;
    nd = __fsub_rn(*d2i, __fmul_rn(e, e));
    *d2i = nd;
  }
  return nd;
}

// Conditional DPP, greedy MAP by incremental Cholesky (reference.select_dpp).
//   d2_i starts at exactly q_i^2 for a non-zero token (0 for a zero vector); each step
//   picks argmax d2 over untaken tokens; the pick p at step s then gives
//   e_i = (q_p sim(p, i) q_i - <c_p, c_i>) / sqrt(d2_p), c_i[s] = e_i, d2_i -= e_i^2.
//   Once the best untaken gain is below DPP_EPS (checked before the pick) every gain
//   is 0 from then on and the rest of the budget goes to the lowest untaken indices.
// c_g is token-major [rows, k_max]: a token's Cholesky row is contiguous (coalesced).
// kGram: sim(p, i) = (gram[b][p][i] * inv_norm[p]) * inv_norm[i] from the precomputed raw
// Gram [batch, ld, ld] (fp32) instead of the dot product over D (x is then unused).
// kCSmem (Gram mode only): the Cholesky rows live in dynamic shared memory, [ld, k_max] token-major
// as in c_g (the launcher chooses it when ld * k_max floats fit), so the projection's reads of
// c_p and c_i are shared-memory reads, not L2/HBM trips; c_g is then unused.
template <typename T, bool kVec, bool kGram, bool kCSmem = false>
__device__ __forceinline__ void dpp_body(
    const T* __restrict__ x, std::int64_t dim, const float* __restrict__ gram, std::int64_t ld,
    const float* __restrict__ inv_norm, const float* __restrict__ sqn, const float* __restrict__ q,
    const std::int64_t* __restrict__ starts, const std::int64_t* __restrict__ lengths,
    const std::int64_t* __restrict__ ks, std::int64_t k_max, float* d2_g, std::uint8_t* taken_g, float* c_g,
    std::int64_t* __restrict__ out) {
  static_assert(kGram || !kCSmem, "row mode keeps xs in dynamic shared memory");
  extern __shared__ float xs[];  // row mode: [dim]; Gram mode with kCSmem: the Cholesky rows
  __shared__ float red_s[33];
  __shared__ int red_i[33];

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int nwarps = blockDim.x >> 5;
  const std::int64_t b = blockIdx.x;
  const std::int64_t start = starts[b];
  std::int64_t len = lengths[b];
  if (kGram && len > ld) len = ld;  // a segment never leaves its Gram block (garbage lengths)
  const int n = len > 0 ? static_cast<int>(len) : 0;
  const std::int64_t kb = image_budget(len, ks[b], k_max);
  std::int64_t* out_b = out + b * k_max;
  for (std::int64_t t = kb + tid; t < k_max; t += blockDim.x) out_b[t] = -1;
  if (kb == 0) return;
  const float* gram_b = kGram ? gram + b * ld * ld : nullptr;

  float* d2 = d2_g + start;
  std::uint8_t* taken = taken_g + start;
  float* c = kCSmem ? xs : c_g + start * k_max;
  const float* q_b = q + start;

  float bs = -INFINITY;
  int bi = kNoPick;
  for (int i = tid; i < n; i += blockDim.x) {
    const float qi = q_b[i];
    const float v = sqn[start + i] > 0.f ? qi * qi : 0.f;  // exact q^2: equal qualities tie exactly
    d2[i] = v;
    taken[i] = 0;
    consider(v, i, bs, bi);
  }
  int p = block_argmax(bs, bi, red_s, red_i);

  bool dead = false;  // identical in every thread: derived from the same d2[p] reads
  std::int64_t t = 0;
  while (true) {
    // Rank exhausted: the best untaken gain d2[p] is below DPP_EPS.  From then on every
    // gain is 0, so this step and the rest take the lowest untaken index.  The test is
    // uniform across the block (every thread reads the same d2[p] after the barriers of
    // block_argmax), so all threads reach the barriers of the second block_argmax.
    if (!dead && p != kNoPick && !(d2[p] >= kDppEps)) {
      dead = true;
      bs = -INFINITY;
      bi = kNoPick;
      for (int i = tid; i < n; i += blockDim.x)
        if (!taken[i]) consider(0.f, i, bs, bi);
      p = block_argmax(bs, bi, red_s, red_i);
    }
    if (p == kNoPick) {
      for (std::int64_t u = t + tid; u < kb; u += blockDim.x) out_b[u] = -1;
      break;
    }
    if (tid == 0) {
      out_b[t] = p;
      taken[p] = 1;
    }
    if (++t >= kb) break;
    const std::int64_t s = t - 1;  // Cholesky column written by this update

    const float d2p = d2[p];  // written before the last barrier; p is taken, so nobody writes it now
    float dj = 1.f, qp = 0.f, ip = 0.f;
    const float* cp = c + static_cast<std::int64_t>(p) * k_max;
    const float* gp = kGram ? gram_b + static_cast<std::int64_t>(p) * ld : nullptr;
    if (!dead) {
      dj = sqrtf(d2p);
      qp = q_b[p];
      const std::int64_t prow = start + p;
      ip = inv_norm[prow];
      if (!kGram) {
        const T* xp = x + prow * dim;
        for (std::int64_t d = tid; d < dim; d += blockDim.x) xs[xs_pos<T, kVec>(d, dim)] = to_float(xp[d]) * ip;
      }
    }
    __syncthreads();  // xs and taken[p] visible

    bs = -INFINITY;
    bi = kNoPick;
    for (int i = warp; i < n; i += nwarps) {
      if (taken[i]) continue;
      if (dead) {
        if (lane == 0) consider(0.f, i, bs, bi);
        continue;
      }
      // row mode: x_i . (x_p * ip); Gram mode: G[p][i] * ip (every lane reads the same word)
      const float dot = kGram ? __fmul_rn(__ldg(gp + i), ip) : warp_dot<T, kVec>(x + (start + i) * dim, xs, dim, lane);
      const float nd = dpp_update(dot, inv_norm + start + i, q_b + i, qp, dj, d2 + i,
                                  c + static_cast<std::int64_t>(i) * k_max, cp, s, lane);
      if (lane == 0) consider(nd, i, bs, bi);
    }
    p = block_argmax(bs, bi, red_s, red_i);
  }
}

template <typename T, bool kVec>
__global__ void __launch_bounds__(kDppThreads) greedy_dpp_kernel(
    const T* __restrict__ x, std::int64_t dim, const float* __restrict__ inv_norm,
    const float* __restrict__ sqn, const float* __restrict__ q, const std::int64_t* __restrict__ starts,
    const std::int64_t* __restrict__ lengths, const std::int64_t* __restrict__ ks, std::int64_t k_max,
    float* d2_g, std::uint8_t* taken_g, float* c_g, std::int64_t* __restrict__ out) {
  dpp_body<T, kVec, false>(x, dim, nullptr, 0, inv_norm, sqn, q, starts, lengths, ks, k_max, d2_g, taken_g, c_g,
                           out);
}

// DPP with the similarity row read from the precomputed Gram (no feature reads in the loop).
// At least 3 blocks per SM: ptxas then keeps it at 40 registers (75 % occupancy with the rows in
// global memory, several images per SM at large B); left to itself it took 48-50 (50 %).
template <bool kCSmem>
__global__ void __launch_bounds__(kDppThreads, 3) greedy_dpp_gram_kernel(
    const float* __restrict__ gram, std::int64_t ld, const float* __restrict__ inv_norm,
    const float* __restrict__ sqn, const float* __restrict__ q, const std::int64_t* __restrict__ starts,
    const std::int64_t* __restrict__ lengths, const std::int64_t* __restrict__ ks, std::int64_t k_max,
    float* d2_g, std::uint8_t* taken_g, float* c_g, std::int64_t* __restrict__ out) {
  dpp_body<float, false, true, kCSmem>(nullptr, 1, gram, ld, inv_norm, sqn, q, starts, lengths, ks, k_max, d2_g, taken_g,
                               c_g, out);
}

// Gram-mode DPP on a thread-block cluster of `csize` CTAs per image (grid = batch * csize,
// cluster (csize, 1, 1)): exactly greedy_dpp_gram_kernel's picks.  Every gain is computed as
// there (dpp_update, the same warp per token arithmetic), and the argmax over the cluster keeps
// the block argmax's order, so only who holds which token changes.  CTA r owns the tokens
// [r * per, r * per + per) with per = ceil(n / csize): their d2 and taken (global scratch, as the
// one-block kernel) and their Cholesky rows (kCSmem: in this CTA's shared memory, [per, k_max]
// after the staged row; else the global rows).  One step:
//   1. every CTA stages the pick's Cholesky row c_p (columns < s) in its shared memory, from the
//      owner CTA's shared memory through DSMEM (kCSmem) or from global memory, then a
//      __syncthreads (the owner never writes a taken token's row again);
//   2. its warps update its untaken tokens (one warp per token), a block argmax;
//   3. thread 0 publishes the CTA's (gain, index) in a slot double-buffered by exchange parity,
//      ONE cluster barrier (release/acquire), and in every warp lane l reads CTA l's slot: one
//      warp argmax over the same slots in the same order gives every thread the same pick.
// A slot is rewritten two exchanges later, after a cluster barrier every reader passed after its
// read, so one barrier per step suffices.  The rank-exhausted switch (uniform: every CTA sees the
// same best gain) costs one more exchange, once; a last cluster barrier keeps every CTA's shared
// memory alive until the others' reads are done.  sm_80 has no clusters: the body is empty there
// and the launcher never selects it.
template <bool kCSmem>
__global__ void __launch_bounds__(kDppThreads) greedy_dpp_gram_cluster_kernel(
    const float* __restrict__ gram, std::int64_t ld, const float* __restrict__ inv_norm,
    const float* __restrict__ sqn, const float* __restrict__ q, const std::int64_t* __restrict__ starts,
    const std::int64_t* __restrict__ lengths, const std::int64_t* __restrict__ ks, std::int64_t k_max,
    float* d2_g, std::uint8_t* taken_g, float* c_g, std::int64_t* __restrict__ out) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900
  namespace cg = cooperative_groups;
  cg::cluster_group cluster = cg::this_cluster();
  extern __shared__ float dyn[];  // [k_max]: the staged c_p; kCSmem: then this CTA's rows [per, k_max]
  __shared__ float red_s[33];
  __shared__ int red_i[33];
  __shared__ float xch_s[2];  // this CTA's best (gain, index), by exchange parity
  __shared__ int xch_i[2];

  const int csize = static_cast<int>(cluster.num_blocks());
  const int rank = static_cast<int>(cluster.block_rank());
  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int nwarps = blockDim.x >> 5;
  const std::int64_t b = blockIdx.x / csize;
  const std::int64_t start = starts[b];
  std::int64_t len = lengths[b];
  if (len > ld) len = ld;  // a segment never leaves its Gram block (garbage lengths)
  const int n = len > 0 ? static_cast<int>(len) : 0;
  const std::int64_t kb = image_budget(len, ks[b], k_max);
  std::int64_t* out_b = out + b * k_max;
  if (rank == 0)
    for (std::int64_t t = kb + tid; t < k_max; t += blockDim.x) out_b[t] = -1;
  if (kb == 0) return;  // uniform over the cluster, before any exchange
  const float* gram_b = gram + b * ld * ld;
  const int per = (n + csize - 1) / csize;
  const int lo = rank * per < n ? rank * per : n;
  const int hi = lo + per < n ? lo + per : n;
  float* d2 = d2_g + start;
  std::uint8_t* taken = taken_g + start;
  const float* q_b = q + start;
  float* cp = dyn;
  // row of token i (lo <= i < hi): c_own + (i - lo) * k_max
  float* c_own = kCSmem ? dyn + k_max : c_g + (start + lo) * k_max;

  int par = 0;
  float best = -INFINITY;  // the pick's gain (its d2 before the dead switch), uniform over the cluster
  // Block argmax of this CTA's candidates, then the cluster's: returns the pick, sets best.
  auto exchange = [&](float bs, int bi) -> int {
    const int w = block_argmax(bs, bi, red_s, red_i);
    if (tid == 0) {
      xch_s[par] = red_s[32];
      xch_i[par] = w;
    }
    cluster.sync();  // the step's one cluster barrier: every CTA's slot is published
    float s2 = -INFINITY;
    int i2 = kNoPick;
    if (lane < csize) {
      s2 = *cluster.map_shared_rank(&xch_s[par], lane);
      i2 = *cluster.map_shared_rank(&xch_i[par], lane);
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      const float s3 = __shfl_xor_sync(kFullMask, s2, off);
      const int i3 = __shfl_xor_sync(kFullMask, i2, off);
      if (s3 > s2 || (s3 == s2 && i3 < i2)) {
        s2 = s3;
        i2 = i3;
      }
    }
    par ^= 1;
    best = s2;
    return i2;
  };

  float bs = -INFINITY;
  int bi = kNoPick;
  for (int i = lo + tid; i < hi; i += blockDim.x) {
    const float qi = q_b[i];
    const float v = sqn[start + i] > 0.f ? qi * qi : 0.f;  // exact q^2, as the one-block kernel
    d2[i] = v;
    taken[i] = 0;
    consider(v, i, bs, bi);
  }
  int p = exchange(bs, bi);

  bool dead = false;  // uniform over the cluster: derived from the same exchanged gain
  std::int64_t t = 0;
  while (true) {
    if (!dead && p != kNoPick && !(best >= kDppEps)) {  // rank exhausted: the lowest untaken from now on
      dead = true;
      bs = -INFINITY;
      bi = kNoPick;
      for (int i = lo + tid; i < hi; i += blockDim.x)
        if (!taken[i]) consider(0.f, i, bs, bi);
      p = exchange(bs, bi);
    }
    if (p == kNoPick) {
      if (rank == 0)
        for (std::int64_t u = t + tid; u < kb; u += blockDim.x) out_b[u] = -1;
      break;
    }
    if (tid == 0) {
      if (rank == 0) out_b[t] = p;
      if (p >= lo && p < hi) taken[p] = 1;
    }
    if (++t >= kb) break;
    const std::int64_t s = t - 1;  // Cholesky column written by this update

    float dj = 1.f, qp = 0.f, ip = 0.f;
    const float* gp = gram_b + static_cast<std::int64_t>(p) * ld;
    if (!dead) {
      dj = sqrtf(best);
      qp = q_b[p];
      ip = inv_norm[start + p];
      const int owner = p / per;
      const float* src = kCSmem ? cluster.map_shared_rank(dyn + k_max, owner) + static_cast<std::int64_t>(p - owner * per) * k_max
                                : c_g + (start + p) * k_max;
      for (std::int64_t u = tid; u < s; u += blockDim.x) cp[u] = src[u];
    }
    __syncthreads();  // cp and taken[p] visible

    bs = -INFINITY;
    bi = kNoPick;
    for (int i = lo + warp; i < hi; i += nwarps) {
      if (taken[i]) continue;
      if (dead) {
        if (lane == 0) consider(0.f, i, bs, bi);
        continue;
      }
      const float nd = dpp_update(__fmul_rn(__ldg(gp + i), ip), inv_norm + start + i, q_b + i, qp, dj, d2 + i,
                                  c_own + static_cast<std::int64_t>(i - lo) * k_max, cp, s, lane);
      if (lane == 0) consider(nd, i, bs, bi);
    }
    p = exchange(bs, bi);
  }
  cluster.sync();  // this CTA's slots and rows stay alive until every CTA's last read is done
#endif
}

// ------------------------------------------------------------------ host helpers
std::string cuda_error(const char* what, cudaError_t err) {
  return std::string(what) + ": " + cudaGetErrorName(err) + " (" + cudaGetErrorString(err) + ")";
}

template <typename T>
bool can_vectorize(std::uintptr_t x, std::int64_t dim) {
  return (x % 16 == 0) && ((dim * static_cast<std::int64_t>(sizeof(T))) % 16 == 0);
}

// Raise the kernel's dynamic shared-memory limit when `bytes` exceeds the default 48 KiB.
template <typename Kernel>
std::string prepare_smem(Kernel kernel, std::int64_t bytes) {
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return cuda_error("cudaGetDevice", err);
  int optin = 0;
  err = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (err != cudaSuccess) return cuda_error("cudaDeviceGetAttribute(MaxSharedMemoryPerBlockOptin)", err);
  if (bytes + kStaticSmemHeadroom > optin) {
    return "feature dim too large for the fused CUDA kernel: it keeps one fp32 row (" + std::to_string(bytes) +
           " bytes) in shared memory, the device allows " + std::to_string(optin - kStaticSmemHeadroom) +
           "; use backend='torch' or 'triton'";
  }
  if (bytes > 48 * 1024) {
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
    if (err != cudaSuccess) return cuda_error("cudaFuncSetAttribute(MaxDynamicSharedMemorySize)", err);
  }
  return "";
}

std::string check_launch(const char* name) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return cuda_error(name, err);
  return "";
}

template <typename P>
const P* in(std::uintptr_t address) {
  return reinterpret_cast<const P*>(address);
}
template <typename P>
P* inout(std::uintptr_t address) {
  return reinterpret_cast<P*>(address);
}
cudaStream_t stream_of(std::uintptr_t stream) { return reinterpret_cast<cudaStream_t>(stream); }

template <typename T, bool kVec>
std::string run_inv_norms(const Features& f, std::uintptr_t inv_norm, std::uintptr_t sqn, std::uintptr_t stream) {
  constexpr int kThreads = 256;
  const std::int64_t warps = kThreads / 32;
  std::int64_t blocks = (f.rows + warps - 1) / warps;
  if (blocks > (1 << 20)) blocks = 1 << 20;  // grid-stride loop covers the rest
  inv_norm_kernel<T, kVec><<<static_cast<unsigned>(blocks), kThreads, 0, stream_of(stream)>>>(
      in<T>(f.x), f.rows, f.dim, inout<float>(inv_norm), inout<float>(sqn));
  return check_launch("inv_norm_kernel launch");
}

std::string max_optin_smem(int* optin);

// Candidate rows a round may stage in shared memory: st.max_round, fewer when that many fp32
// rows of the feature dim do not fit the device (at least one: prepare_smem reports that case).
std::string round_rows(const Features& f, const MaxSimState& st, int* rows) {
  int optin = 0;
  std::string err = max_optin_smem(&optin);
  if (!err.empty()) return err;
  const std::int64_t row = greedy_smem_bytes(f.dim);
  const std::int64_t fit = row > 0 ? (optin - kStaticSmemHeadroom) / row : st.max_round;
  *rows = static_cast<int>(fit < st.max_round ? (fit < 1 ? 1 : fit) : st.max_round);
  return "";
}

template <typename T, bool kVec>
std::string run_maxsim(const Features& f, const MaxSimState& st, const Segments& seg) {
  auto kernel = greedy_maxsim_kernel<T, kVec>;
  int rows = 1;
  std::string err = round_rows(f, st, &rows);
  if (!err.empty()) return err;
  const std::int64_t smem = rows * greedy_smem_bytes(f.dim);
  err = prepare_smem(kernel, smem);
  if (!err.empty()) return err;
  kernel<<<static_cast<unsigned>(seg.batch), kGreedyThreads, static_cast<size_t>(smem), stream_of(seg.stream)>>>(
      in<T>(f.x), f.dim, in<float>(st.inv_norm), in<float>(st.imp), in<float>(st.first_score),
      in<std::uint8_t>(st.eligible), in<std::int64_t>(seg.starts), in<std::int64_t>(seg.lengths),
      in<std::int64_t>(seg.ks), seg.k_max, static_cast<float>(st.lam), static_cast<float>(1.0 - st.lam),
      inout<float>(st.m_scratch), inout<std::uint8_t>(st.taken_scratch), inout<std::int64_t>(seg.out),
      inout<std::int64_t>(st.rounds), rows);
  return check_launch("greedy_maxsim_kernel launch");
}

template <typename T, bool kVec>
std::string run_dpp(const Features& f, const DppState& st, const Segments& seg) {
  auto kernel = greedy_dpp_kernel<T, kVec>;
  const std::int64_t smem = greedy_smem_bytes(f.dim);
  std::string err = prepare_smem(kernel, smem);
  if (!err.empty()) return err;
  kernel<<<static_cast<unsigned>(seg.batch), kDppThreads, static_cast<size_t>(smem), stream_of(seg.stream)>>>(
      in<T>(f.x), f.dim, in<float>(st.inv_norm), in<float>(st.sqn), in<float>(st.q), in<std::int64_t>(seg.starts),
      in<std::int64_t>(seg.lengths), in<std::int64_t>(seg.ks), seg.k_max, inout<float>(st.d2_scratch),
      inout<std::uint8_t>(st.taken_scratch), inout<float>(st.c_scratch), inout<std::int64_t>(seg.out));
  return check_launch("greedy_dpp_kernel launch");
}

// Largest dynamic shared memory (bytes) a block of this device may opt in to.
std::string max_optin_smem(int* optin) {
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return cuda_error("cudaGetDevice", err);
  err = cudaDeviceGetAttribute(optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (err != cudaSuccess) return cuda_error("cudaDeviceGetAttribute(MaxSharedMemoryPerBlockOptin)", err);
  return "";
}

// Token slots per thread of the register-owned Gram-mode maxsim kernel: 4 * 1024 threads cover
// N <= 4096 (targets (a), (b)); 8 slots spilled on sm_90 at the 64-register cap.
constexpr int kGramOwn = 4;

// Threads of the Gram-mode maxsim block: one per token up to 1024 (fewer warps = cheaper
// barriers in the per-step argmax when every image is short, e.g. N = 576 -> 576 threads).
int gram_threads(std::int64_t ld) {
  std::int64_t t = ((ld + 31) / 32) * 32;
  if (t < 64) t = 64;
  if (t > kGreedyThreads) t = kGreedyThreads;
  return static_cast<int>(t);
}

// ---- the cluster paths (greedy_maxsim_gram_cluster_kernel, greedy_dpp_gram_cluster_kernel)
// Token slots per thread of the maxsim cluster kernel (registers, as kGramOwn): csize * 1024 * 4 tokens.
constexpr int kClusterOwn = 4;
// Largest cluster: 8 CTAs is the portable limit; H100 runs 16 with the non-portable opt-in.
constexpr int kPortableCluster = 8;
constexpr int kMaxCluster = kMaxClusterCtas;
// Tokens per CTA the DPP launcher aims at: 16 warps then update ~16 tokens each per step.
constexpr int kDppClusterTokens = 256;

auto* const cluster_kernel = greedy_maxsim_gram_cluster_kernel<kClusterOwn>;

std::int64_t cluster_smem_bytes(int threads) { return static_cast<std::int64_t>(kClusterOwn) * threads * 4; }

// Launch configuration of `batch` clusters of `csize` CTAs (attr: one attribute, filled here).
// Positional initialisation: the emulator's blockDim/gridDim built-ins are macros.
cudaLaunchConfig_t cluster_config(int csize, std::int64_t batch, int threads, std::int64_t smem,
                                  std::uintptr_t stream, cudaLaunchAttribute* attr) {
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = static_cast<unsigned>(csize);
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  return cudaLaunchConfig_t{dim3(static_cast<unsigned>(batch * csize)), dim3(static_cast<unsigned>(threads)),
                            static_cast<size_t>(smem), stream_of(stream), attr, 1};
}

// *sms = the device's SM count when it launches thread-block clusters (compute capability 9.0
// and the cluster-launch attribute), else 0.
std::string cluster_device(int* sms) {
  *sms = 0;
  int device = 0, major = 0, launch_ok = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return cuda_error("cudaGetDevice", err);
  err = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  if (err != cudaSuccess) return cuda_error("cudaDeviceGetAttribute(ComputeCapabilityMajor)", err);
  if (major < 9) return "";
  err = cudaDeviceGetAttribute(&launch_ok, cudaDevAttrClusterLaunch, device);
  if (err != cudaSuccess || launch_ok == 0) {
    cudaGetLastError();  // a device without the attribute has no cluster launch: not an error here
    return "";
  }
  err = cudaDeviceGetAttribute(sms, cudaDevAttrMultiProcessorCount, device);
  if (err != cudaSuccess) return cuda_error("cudaDeviceGetAttribute(MultiProcessorCount)", err);
  return "";
}

// The cluster size to launch `kernel` with, for a wish of `want` (<= kMaxCluster) CTAs: above the
// portable 8 it needs the non-portable opt-in and a GPC that holds the cluster (the occupancy
// calculator, at the shape fits(size) gives); else 8.  fits(size, &threads, &smem) says whether
// a cluster of `size` can take the image at all, and at which block shape.
template <typename Kernel, typename Fits>
std::string cluster_fit(Kernel kernel, std::int64_t want, Fits fits, int* csize, int* threads, std::int64_t* smem) {
  *csize = 1;
  cudaError_t err;
  if (want > kPortableCluster) {
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1);
    if (err != cudaSuccess) {
      cudaGetLastError();
      want = kPortableCluster;
    }
  }
  if (want < 2 || !fits(static_cast<int>(want), threads, smem)) return "";
  if (want > kPortableCluster) {  // a 16-CTA cluster must fit one GPC: ask the occupancy calculator
    cudaLaunchAttribute attr[1];
    const cudaLaunchConfig_t cfg = cluster_config(static_cast<int>(want), 1, *threads, *smem, 0, attr);
    int active = 0;
    err = cudaOccupancyMaxActiveClusters(&active, kernel, &cfg);
    if (err != cudaSuccess || active < 1) {
      cudaGetLastError();
      want = kPortableCluster;
      if (!fits(static_cast<int>(want), threads, smem)) return "";
    }
  }
  *csize = static_cast<int>(want);
  return "";
}

// CTAs per image (*csize, 1 = the one-block kernel) and threads per CTA of the maxsim cluster path.
// The launcher's choice (st.cluster == 0): a cluster when an image has more tokens than one block has threads
// (ld > 1024), so that each thread owns one token: a thread updates its tokens one after another
// (one dependent memory trip each), and one SM streams all of a round's Gram-row bytes; the
// cluster pays a cluster barrier, a DSMEM trip and a third list merge per round for that
// (bench/gpu_model.py prices both sides).  One CTA per 1024 tokens, as many as the batch leaves
// SMs idle for (batch * csize <= SMs), at most kMaxCluster.  st.cluster >= 2 asks for that size
// (tests force the path at small N); 1 disables it.
std::string cluster_shape(const GramRows& g, const MaxSimState& st, const Segments& seg, int* csize, int* threads) {
  *csize = 1;
  if (st.cluster == 1) return "";
  int sms = 0;
  std::string e = cluster_device(&sms);
  if (!e.empty() || sms == 0) return e;
  std::int64_t want = st.cluster >= 2 ? st.cluster : (g.ld + kGreedyThreads - 1) / kGreedyThreads;
  if (st.cluster < 2) want = std::min<std::int64_t>(want, sms / std::max<std::int64_t>(seg.batch, 1));
  want = std::min<std::int64_t>(want, kMaxCluster);
  std::int64_t smem = 0;
  return cluster_fit(
      cluster_kernel, want,
      [&](int size, int* thr, std::int64_t* sm) {
        if (g.ld > static_cast<std::int64_t>(kClusterOwn) * kGreedyThreads * size) return false;  // past the slots
        *thr = gram_threads((g.ld + size - 1) / size);
        *sm = cluster_smem_bytes(*thr);
        return true;
      },
      csize, threads, &smem);
}

std::string launch_maxsim_gram_cluster(const GramRows& g, const MaxSimState& st, const Segments& seg, int csize,
                                       int threads) {
  cudaLaunchAttribute attr[1];
  const cudaLaunchConfig_t cfg = cluster_config(csize, seg.batch, threads, cluster_smem_bytes(threads), seg.stream, attr);
  const cudaError_t err = cudaLaunchKernelEx(
      &cfg, cluster_kernel, in<float>(g.gram), g.ld, in<float>(st.inv_norm), in<float>(st.imp),
      in<float>(st.first_score), in<std::uint8_t>(st.eligible), in<std::int64_t>(seg.starts),
      in<std::int64_t>(seg.lengths), in<std::int64_t>(seg.ks), seg.k_max, static_cast<float>(st.lam),
      static_cast<float>(1.0 - st.lam), inout<std::int64_t>(seg.out), inout<std::int64_t>(st.rounds), st.max_round);
  if (err != cudaSuccess) return cuda_error("greedy_maxsim_gram_cluster_kernel launch", err);
  return check_launch("greedy_maxsim_gram_cluster_kernel launch");
}

// Gram-mode DPP on a cluster (greedy_dpp_gram_cluster_kernel): the launcher's choice
// (st.cluster == 0) is one CTA per kDppClusterTokens tokens, as many as the batch leaves SMs idle
// for, at most kMaxCluster, and none below 2.  Each step costs a cluster barrier and a DSMEM
// read of every CTA's slot, and saves the one block's serial walk over ld / 16 tokens per warp.
// The Cholesky rows stay in each CTA's shared memory when its share fits, else in global memory.
std::string launch_dpp_gram_cluster(const GramRows& g, const DppState& st, const Segments& seg, int optin,
                                    bool* launched) {
  *launched = false;
  if (st.cluster == 1) return "";
  int sms = 0;
  std::string err = cluster_device(&sms);
  if (!err.empty() || sms == 0) return err;
  std::int64_t want = st.cluster >= 2 ? st.cluster : (g.ld + kDppClusterTokens - 1) / kDppClusterTokens;
  if (st.cluster < 2) want = std::min<std::int64_t>(want, sms / std::max<std::int64_t>(seg.batch, 1));
  want = std::min<std::int64_t>(want, kMaxCluster);
  const std::int64_t row = seg.k_max * static_cast<std::int64_t>(sizeof(float));
  // dynamic shared memory: the staged c_p, plus (rows) this CTA's share of the Cholesky rows
  auto fits = [&](bool rows) {
    return [&, rows](int size, int* thr, std::int64_t* sm) {
      *thr = kDppThreads;
      *sm = row + (rows ? ((g.ld + size - 1) / size) * row : 0);
      return *sm + kStaticSmemHeadroom <= optin;
    };
  };
  auto* const kernel_s = greedy_dpp_gram_cluster_kernel<true>;
  auto* const kernel_g = greedy_dpp_gram_cluster_kernel<false>;
  int csize = 1, threads = kDppThreads;
  std::int64_t smem = 0;
  err = cluster_fit(kernel_s, want, fits(true), &csize, &threads, &smem);  // the rows in shared memory first
  if (!err.empty()) return err;
  const bool c_smem = csize > 1;
  if (!c_smem) {
    err = cluster_fit(kernel_g, want, fits(false), &csize, &threads, &smem);
    if (!err.empty() || csize < 2) return err;
  }
  auto kernel = c_smem ? kernel_s : kernel_g;
  err = prepare_smem(kernel, smem);
  if (!err.empty()) return err;
  cudaLaunchAttribute attr[1];
  const cudaLaunchConfig_t cfg = cluster_config(csize, seg.batch, threads, smem, seg.stream, attr);
  const cudaError_t e = cudaLaunchKernelEx(
      &cfg, kernel, in<float>(g.gram), g.ld, in<float>(st.inv_norm), in<float>(st.sqn), in<float>(st.q),
      in<std::int64_t>(seg.starts), in<std::int64_t>(seg.lengths), in<std::int64_t>(seg.ks), seg.k_max,
      inout<float>(st.d2_scratch), inout<std::uint8_t>(st.taken_scratch), inout<float>(st.c_scratch),
      inout<std::int64_t>(seg.out));
  if (e != cudaSuccess) return cuda_error("greedy_dpp_gram_cluster_kernel launch", e);
  *launched = true;
  return check_launch("greedy_dpp_gram_cluster_kernel launch");
}

// Calls F<T, kVec>::run(args...) for the runtime dtype code and alignment.
#define MMRPRUNE_DISPATCH(DTYPE, X, DIM, FN, ...)                                                   \
  do {                                                                                              \
    switch (DTYPE) {                                                                                \
      case kFloat32:                                                                                \
        return can_vectorize<float>(X, DIM) ? FN<float, true>(__VA_ARGS__)                          \
                                            : FN<float, false>(__VA_ARGS__);                        \
      case kFloat16:                                                                                \
        return can_vectorize<__half>(X, DIM) ? FN<__half, true>(__VA_ARGS__)                        \
                                             : FN<__half, false>(__VA_ARGS__);                      \
      case kBFloat16:                                                                               \
        return can_vectorize<__nv_bfloat16>(X, DIM) ? FN<__nv_bfloat16, true>(__VA_ARGS__)          \
                                                    : FN<__nv_bfloat16, false>(__VA_ARGS__);        \
      default:                                                                                      \
        return "unsupported dtype code " + std::to_string(DTYPE);                                   \
    }                                                                                               \
  } while (0)

}  // namespace

std::int64_t greedy_smem_bytes(std::int64_t dim) { return dim * static_cast<std::int64_t>(sizeof(float)); }

std::int64_t gram_state_smem_bytes(std::int64_t ld) {
  return ld * static_cast<std::int64_t>(sizeof(float) + sizeof(std::uint8_t));
}

std::string launch_greedy_maxsim_gram(const GramRows& g, const MaxSimState& st, const Segments& seg,
                                      int smem_state) {
  if (seg.batch == 0) return "";
  int optin = 0;
  std::string err = max_optin_smem(&optin);
  if (!err.empty()) return err;
  if (smem_state != 0) {  // several SMs per image where the device and the batch allow it
    int csize = 1, cthreads = 0;
    err = cluster_shape(g, st, seg, &csize, &cthreads);
    if (!err.empty()) return err;
    if (csize > 1) return launch_maxsim_gram_cluster(g, st, seg, csize, cthreads);
  }
  const std::int64_t smem = gram_state_smem_bytes(g.ld);
  const bool fits = smem + kStaticSmemHeadroom <= optin;
  const bool use_smem = smem_state < 0 ? fits : (smem_state > 0 && fits);
  const int threads = gram_threads(g.ld);
  const float fl = static_cast<float>(st.lam), om = static_cast<float>(1.0 - st.lam);
  const unsigned blocks = static_cast<unsigned>(seg.batch);
  if (use_smem) {
    // tokens in registers when every image fits kGramOwn slots per thread, else in shared memory
    auto kernel = g.ld <= static_cast<std::int64_t>(kGramOwn) * threads ? greedy_maxsim_gram_kernel<true, kGramOwn>
                                                                        : greedy_maxsim_gram_kernel<true, 0>;
    err = prepare_smem(kernel, smem);
    if (!err.empty()) return err;
    kernel<<<blocks, threads, static_cast<size_t>(smem), stream_of(seg.stream)>>>(
        in<float>(g.gram), g.ld, in<float>(st.inv_norm), in<float>(st.imp), in<float>(st.first_score),
        in<std::uint8_t>(st.eligible), in<std::int64_t>(seg.starts), in<std::int64_t>(seg.lengths),
        in<std::int64_t>(seg.ks), seg.k_max, fl, om, inout<float>(st.m_scratch),
        inout<std::uint8_t>(st.taken_scratch), inout<std::int64_t>(seg.out), inout<std::int64_t>(st.rounds),
        st.max_round);
  } else {
    greedy_maxsim_gram_kernel<false, 0><<<blocks, threads, 0, stream_of(seg.stream)>>>(
        in<float>(g.gram), g.ld, in<float>(st.inv_norm), in<float>(st.imp), in<float>(st.first_score),
        in<std::uint8_t>(st.eligible), in<std::int64_t>(seg.starts), in<std::int64_t>(seg.lengths),
        in<std::int64_t>(seg.ks), seg.k_max, fl, om, inout<float>(st.m_scratch),
        inout<std::uint8_t>(st.taken_scratch), inout<std::int64_t>(seg.out), inout<std::int64_t>(st.rounds),
        st.max_round);
  }
  return check_launch("greedy_maxsim_gram_kernel launch");
}

std::string launch_greedy_dpp_gram(const GramRows& g, const DppState& st, const Segments& seg) {
  if (seg.batch == 0) return "";
  int optin = 0;
  std::string err = max_optin_smem(&optin);
  if (!err.empty()) return err;
  bool launched = false;  // several SMs per image where the device and the batch allow it
  err = launch_dpp_gram_cluster(g, st, seg, optin, &launched);
  if (!err.empty() || launched) return err;
  // the Cholesky rows in shared memory when they fit (e.g. (a): 576 x 64 x 4 = 144 KiB), else global
  const std::int64_t c_bytes = g.ld * seg.k_max * static_cast<std::int64_t>(sizeof(float));
  const bool c_smem = c_bytes + kStaticSmemHeadroom <= optin;
  auto kernel = c_smem ? greedy_dpp_gram_kernel<true> : greedy_dpp_gram_kernel<false>;
  const std::int64_t smem = c_smem ? c_bytes : 0;
  if (c_smem) {
    err = prepare_smem(kernel, smem);
    if (!err.empty()) return err;
  }
  kernel<<<static_cast<unsigned>(seg.batch), kDppThreads, static_cast<size_t>(smem), stream_of(seg.stream)>>>(
      in<float>(g.gram), g.ld, in<float>(st.inv_norm), in<float>(st.sqn), in<float>(st.q),
      in<std::int64_t>(seg.starts), in<std::int64_t>(seg.lengths), in<std::int64_t>(seg.ks), seg.k_max,
      inout<float>(st.d2_scratch), inout<std::uint8_t>(st.taken_scratch), inout<float>(st.c_scratch),
      inout<std::int64_t>(seg.out));
  return check_launch("greedy_dpp_gram_kernel launch");
}

std::string launch_inv_norms(const Features& f, std::uintptr_t inv_norm, std::uintptr_t sqn,
                             std::uintptr_t stream) {
  if (f.rows == 0) return "";
  MMRPRUNE_DISPATCH(f.dtype, f.x, f.dim, run_inv_norms, f, inv_norm, sqn, stream);
}

// f.rows: bounds are checked in bindings.cpp; the kernels read only rows of their segments.
std::string launch_greedy_maxsim(const Features& f, const MaxSimState& st, const Segments& seg) {
  if (seg.batch == 0) return "";
  MMRPRUNE_DISPATCH(f.dtype, f.x, f.dim, run_maxsim, f, st, seg);
}

std::string launch_greedy_dpp(const Features& f, const DppState& st, const Segments& seg) {
  if (seg.batch == 0) return "";
  MMRPRUNE_DISPATCH(f.dtype, f.x, f.dim, run_dpp, f, st, seg);
}

}  // namespace mmrprune_cuda
