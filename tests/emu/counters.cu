// A kernel with a known number of barriers, shuffle levels and __ldg loads per block, for
// tests/test_cuda_emu_native.py::test_emulator_counters (the definitions: csrc/emu/cuda_emu.h,
// "Counters").  Built for the emulator only; main() launches it with CUDA_EMU_COUNTS set by the test.
#include <cuda_runtime.h>

#include <cstdio>

__global__ void counted(const float* __restrict__ in, float* out) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  float v = __ldg(in + threadIdx.x);
  int i = threadIdx.x;
  if (threadIdx.x == 5)  // interval 1: thread 5 loads 4 times, every other thread once
    for (int j = 1; j < 4; ++j) v += __ldg(in + j);
  // interval 1: a (value, index) butterfly: 5 levels of 2 shuffles, in every warp
  for (int off = 16; off > 0; off >>= 1) {
    v += __shfl_xor_sync(0xffffffffu, v, off);
    i += __shfl_xor_sync(0xffffffffu, i, off);
  }
  __syncthreads();
  // interval 2: warp 0 only: three broadcasts of lane 0 (one pattern: one level), then xor 1
  if (warp == 0) {
    float a = __shfl_sync(0xffffffffu, v, 0);
    float b = __shfl_sync(0xffffffffu, v + 1.f, 0);
    float c = __shfl_sync(0xffffffffu, v + 2.f, 0);
    v = a + b + c + __shfl_xor_sync(0xffffffffu, v, 1);
  }
  __syncthreads();
  // interval 3: the same pattern as the last shuffle before the barrier: still a new level
  if (warp == 0) v += __shfl_xor_sync(0xffffffffu, v, 1);
  out[threadIdx.x] = v + static_cast<float>(i + lane);
}

int main() {
  static float in[64], out[64];
  for (int j = 0; j < 64; ++j) in[j] = static_cast<float>(j);
  counted<<<2, 64>>>(in, out);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    std::fprintf(stderr, "launch failed: %s\n", cudaGetErrorString(err));
    return 1;
  }
  return 0;
}
