// Batched dot products, the one hot loop of every greedy method.
//
//   out[a] = p · rows[idx[a] * ld .. idx[a] * ld + D)      for a in [0, n)
//   (idx == nullptr means idx[a] = a)
//
// The same body is compiled for AVX-512, AVX2+FMA and baseline x86-64 (SSE2)
// and chosen once at load time from CPUID, so one binary runs on any x86-64.
#pragma once
#include <cstdint>

namespace mmrprune {

template <class T>
using DotsFn = void (*)(const T* p, const T* rows, int64_t ld, int64_t D,
                        const int32_t* idx, int64_t n, T* out);

struct DotKernels {
  DotsFn<float> f32;
  DotsFn<double> f64;
  const char* isa;  // "avx512", "avx2", "sse2" or "generic"
};

// The kernels for this CPU (resolved once, thread-safe).
const DotKernels& dot_kernels();

// Same, but forcing an ISA (for tests): "avx512", "avx2", "sse2"/"generic".
// Throws std::invalid_argument if this CPU cannot run it.
const DotKernels& dot_kernels_for(const char* isa);

}  // namespace mmrprune
