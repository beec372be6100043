#include "dots.h"

#include <cstring>
#include <stdexcept>
#include <string>

namespace mmrprune {
namespace {

template <class V, class T>
static inline __attribute__((always_inline)) V load(const T* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));  // unaligned vector load
  return v;
}

template <class V, class T, int W>
static inline __attribute__((always_inline)) T hsum(V v) {
  T s = 0;
  for (int l = 0; l < W; ++l) s += v[l];
  return s;
}

// One query row against four rows at a time: the query is loaded once per
// four FMAs, and four independent accumulators hide the FMA latency.
template <class T, int VB>
static inline __attribute__((always_inline)) void dots_body(const T* p, const T* rows, int64_t ld, int64_t D,
                                                            const int32_t* idx, int64_t n, T* out) {
  typedef T V __attribute__((vector_size(VB)));
  constexpr int W = VB / sizeof(T);
  const int64_t dv = D / W * W;
  int64_t a = 0;
  for (; a + 4 <= n; a += 4) {
    const T* r0 = rows + (idx ? idx[a + 0] : a + 0) * ld;
    const T* r1 = rows + (idx ? idx[a + 1] : a + 1) * ld;
    const T* r2 = rows + (idx ? idx[a + 2] : a + 2) * ld;
    const T* r3 = rows + (idx ? idx[a + 3] : a + 3) * ld;
    V s0 = {}, s1 = {}, s2 = {}, s3 = {};
    for (int64_t d = 0; d < dv; d += W) {
      const V pv = load<V>(p + d);
      s0 += pv * load<V>(r0 + d);
      s1 += pv * load<V>(r1 + d);
      s2 += pv * load<V>(r2 + d);
      s3 += pv * load<V>(r3 + d);
    }
    T t0 = hsum<V, T, W>(s0), t1 = hsum<V, T, W>(s1), t2 = hsum<V, T, W>(s2), t3 = hsum<V, T, W>(s3);
    for (int64_t d = dv; d < D; ++d) {
      t0 += p[d] * r0[d];
      t1 += p[d] * r1[d];
      t2 += p[d] * r2[d];
      t3 += p[d] * r3[d];
    }
    out[a + 0] = t0;
    out[a + 1] = t1;
    out[a + 2] = t2;
    out[a + 3] = t3;
  }
  for (; a < n; ++a) {
    const T* r = rows + (idx ? idx[a] : a) * ld;
    V s = {};
    for (int64_t d = 0; d < dv; d += W) s += load<V>(p + d) * load<V>(r + d);
    T t = hsum<V, T, W>(s);
    for (int64_t d = dv; d < D; ++d) t += p[d] * r[d];
    out[a] = t;
  }
}

// One MR x NR tile of a Gram block: C[a][b] = A_a · B_b.
//
// Why a tile: the 1 x 4 dots kernel loads 5 vectors per 4 FMAs, so a full
// Gram pass (DivPrune's first step) is bound by loads, not FMAs.  An MR x NR
// tile loads MR + NR vectors per MR * NR FMAs (4 x 4: 8 per 16), with the
// MR * NR accumulators held in registers across the whole D loop.
//
// Exactness: every entry is computed exactly as dots_body computes one
// (a, b) pair: one vector accumulator stepping over D by W lanes, summed
// lane 0..W-1 by hsum, then the scalar tail; products commute and FMA(a, b, c)
// == FMA(b, a, c).  So every tile shape (including the edge tiles below)
// gives the same bits as dots(A_a, B_b), and sim(i, j) == sim(j, i).
template <class T, int VB, int MR, int NR>
static inline __attribute__((always_inline)) void gram_tile(const T* A, const T* B, int64_t ld, int64_t D, T* C,
                                                            int64_t ldc) {
  typedef T V __attribute__((vector_size(VB)));
  constexpr int W = VB / sizeof(T);
  const int64_t dv = D / W * W;
  V acc[MR][NR];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 8
    for (int c = 0; c < NR; ++c) acc[r][c] = V{};
  for (int64_t d = 0; d < dv; d += W) {
    V av[MR], bv[NR];
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) av[r] = load<V>(A + r * ld + d);
#pragma GCC unroll 8
    for (int c = 0; c < NR; ++c) bv[c] = load<V>(B + c * ld + d);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 8
      for (int c = 0; c < NR; ++c) acc[r][c] += av[r] * bv[c];
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 8
    for (int c = 0; c < NR; ++c) {
      const T* a = A + r * ld;
      const T* b = B + c * ld;
      T t = hsum<V, T, W>(acc[r][c]);
      for (int64_t d = dv; d < D; ++d) t += a[d] * b[d];
      C[r * ldc + c] = t;
    }
}

// C[a * ldc + b] = A_a · B_b for a < na, b < nb: full MR x NR tiles, then
// narrower tiles for the edges (same bits either way, see gram_tile).
template <class T, int VB, int MR, int NR>
static inline __attribute__((always_inline)) void gram_body(const T* A, int64_t na, const T* B, int64_t nb,
                                                            int64_t ld, int64_t D, T* C, int64_t ldc) {
  int64_t a = 0;
  for (; a + MR <= na; a += MR) {
    int64_t b = 0;
    for (; b + NR <= nb; b += NR) gram_tile<T, VB, MR, NR>(A + a * ld, B + b * ld, ld, D, C + a * ldc + b, ldc);
    for (; b < nb; ++b) gram_tile<T, VB, MR, 1>(A + a * ld, B + b * ld, ld, D, C + a * ldc + b, ldc);
  }
  for (; a < na; ++a) {
    int64_t b = 0;
    for (; b + NR <= nb; b += NR) gram_tile<T, VB, 1, NR>(A + a * ld, B + b * ld, ld, D, C + a * ldc + b, ldc);
    for (; b < nb; ++b) gram_tile<T, VB, 1, 1>(A + a * ld, B + b * ld, ld, D, C + a * ldc + b, ldc);
  }
}


#define MMRPRUNE_DOTS(NAME, T, VB, TARGET)                                                            \
  TARGET void NAME(const T* p, const T* rows, int64_t ld, int64_t D, const int32_t* idx, int64_t n, \
                   T* out) {                                                                         \
    dots_body<T, VB>(p, rows, ld, D, idx, n, out);                                                   \
  }

// Tile shapes: MR * NR accumulators + MR + NR operands must fit the register
// file, 16 vector registers for SSE2/AVX2 (3 x 4: 12 + 7, a few spills of the
// operands are cheap) and 32 for AVX-512 (4 x 4: 16 + 8).
#define MMRPRUNE_GRAM(NAME, T, VB, MR, NR, TARGET)                                                        \
  TARGET void NAME(const T* A, int64_t na, const T* B, int64_t nb, int64_t ld, int64_t D, T* C, int64_t ldc) { \
    gram_body<T, VB, MR, NR>(A, na, B, nb, ld, D, C, ldc);                                                 \
  }

#define NO_TARGET
MMRPRUNE_DOTS(dots_f32_base, float, 16, NO_TARGET)
MMRPRUNE_DOTS(dots_f64_base, double, 16, NO_TARGET)
MMRPRUNE_GRAM(gram_f32_base, float, 16, 3, 4, NO_TARGET)
MMRPRUNE_GRAM(gram_f64_base, double, 16, 3, 4, NO_TARGET)
#if defined(__x86_64__) || defined(__i386__)
#define AVX2_TARGET __attribute__((target("avx2,fma")))
#define AVX512_TARGET __attribute__((target("avx512f,avx2,fma")))
MMRPRUNE_DOTS(dots_f32_avx2, float, 32, AVX2_TARGET)
MMRPRUNE_DOTS(dots_f64_avx2, double, 32, AVX2_TARGET)
MMRPRUNE_DOTS(dots_f32_avx512, float, 64, AVX512_TARGET)
MMRPRUNE_DOTS(dots_f64_avx512, double, 64, AVX512_TARGET)
MMRPRUNE_GRAM(gram_f32_avx2, float, 32, 3, 4, AVX2_TARGET)
MMRPRUNE_GRAM(gram_f64_avx2, double, 32, 3, 4, AVX2_TARGET)
MMRPRUNE_GRAM(gram_f32_avx512, float, 64, 4, 4, AVX512_TARGET)
MMRPRUNE_GRAM(gram_f64_avx512, double, 64, 4, 4, AVX512_TARGET)
#endif

#if defined(__x86_64__) || defined(__i386__)
const DotKernels kBase = {dots_f32_base, dots_f64_base, gram_f32_base, gram_f64_base, "sse2"};
const DotKernels kAvx2 = {dots_f32_avx2, dots_f64_avx2, gram_f32_avx2, gram_f64_avx2, "avx2"};
const DotKernels kAvx512 = {dots_f32_avx512, dots_f64_avx512, gram_f32_avx512, gram_f64_avx512, "avx512"};
#else
const DotKernels kBase = {dots_f32_base, dots_f64_base, gram_f32_base, gram_f64_base, "generic"};
#endif

bool cpu_has(const std::string& isa) {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  if (isa == "avx512") return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx2") &&
                              __builtin_cpu_supports("fma");
  if (isa == "avx2") return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif
  return isa == "sse2" || isa == "generic";
}

}  // namespace

const DotKernels& dot_kernels_for(const char* isa_c) {
  const std::string isa(isa_c);
  if (!cpu_has(isa)) throw std::invalid_argument("this CPU cannot run the '" + isa + "' kernels");
#if defined(__x86_64__) || defined(__i386__)
  if (isa == "avx512") return kAvx512;
  if (isa == "avx2") return kAvx2;
#endif
  return kBase;
}

const DotKernels& dot_kernels() {
  static const DotKernels* chosen = [] {
#if defined(__x86_64__) || defined(__i386__)
    if (cpu_has("avx512")) return &kAvx512;
    if (cpu_has("avx2")) return &kAvx2;
#endif
    return &kBase;
  }();
  return *chosen;
}

}  // namespace mmrprune
