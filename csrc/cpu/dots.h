// Batched dot products, the one hot loop of every greedy method.
//
//   out[a] = p · rows[idx[a] * ld .. idx[a] * ld + D)      for a in [0, n)
//   (idx == nullptr means idx[a] = a)
//
// and a block of the Gram matrix (DivPrune's first step), register-tiled:
//
//   C[a * ldc + b] = A_a · B_b      for a in [0, na), b in [0, nb)
//   (A_a = A + a * ld, B_b = B + b * ld), each entry bit-identical to dots.
//
// The same body is compiled for AVX-512, AVX2+FMA and baseline x86-64 (SSE2)
// and chosen once at load time from CPUID, so one binary runs on any x86-64.
#pragma once
#include <cstdint>

namespace mmrprune {

template <class T>
using DotsFn = void (*)(const T* p, const T* rows, int64_t ld, int64_t D,
                        const int32_t* idx, int64_t n, T* out);

template <class T>
using GramFn = void (*)(const T* A, int64_t na, const T* B, int64_t nb, int64_t ld, int64_t D, T* C,
                        int64_t ldc);

struct DotKernels {
  DotsFn<float> f32;
  DotsFn<double> f64;
  GramFn<float> gram_f32;
  GramFn<double> gram_f64;
  const char* isa;  // "avx512", "avx2", "sse2" or "generic"
};

// The kernels for this CPU (resolved once, thread-safe).
const DotKernels& dot_kernels();

// Same, but forcing an ISA (for tests): "avx512", "avx2", "sse2"/"generic".
// Throws std::invalid_argument if this CPU cannot run it.
const DotKernels& dot_kernels_for(const char* isa);

}  // namespace mmrprune
