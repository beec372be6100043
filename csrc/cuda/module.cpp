// pybind11 module mmrprune._cuda (and, built with the emulated kernels, mmrprune._cuda_emu).
//
// Importing it registers the fused greedy ops' implementations (op.cpp).  What is here is not on the selection
// path: the kernels' constants and shared-memory sizes, and the emulator's launch counter.
#include <pybind11/pybind11.h>

#include "greedy.h"
#include "prepare.h"

// The same source is also built as mmrprune._cuda_emu (kernels on the CPU emulator, csrc/emu/).
#ifndef MMRPRUNE_CUDA_MODULE
#define MMRPRUNE_CUDA_MODULE _cuda
#define MMRPRUNE_REAL_CUDA 1
#else
long mmrprune_emu_launches();  // emu_hooks.cpp
#endif

namespace py = pybind11;

void mmrprune_register_fused_ops();  // op.cpp

PYBIND11_MODULE(MMRPRUNE_CUDA_MODULE, m) {
  mmrprune_register_fused_ops();  // a failure is the import's error (ImportError)
  m.doc() = "mmrprune fused CUDA greedy selection: registers the ops mmrprune::fused_greedy and "
            "mmrprune::_fused_prepare (see csrc/cuda/NOTES.md)";
  // csrc/cuda/greedy.h's DType codes, for the C++ emulator harness (tests/emu_build.py)
  m.attr("DTYPE_FLOAT32") = static_cast<int>(mmrprune_cuda::kFloat32);
  m.attr("DTYPE_FLOAT16") = static_cast<int>(mmrprune_cuda::kFloat16);
  m.attr("DTYPE_BFLOAT16") = static_cast<int>(mmrprune_cuda::kBFloat16);
  m.attr("GREEDY_THREADS") = mmrprune_cuda::kGreedyThreads;
  m.attr("MAX_ROUND") = mmrprune_cuda::kMaxRound;
  py::dict kinds;  // csrc/cuda/prepare.h's ScoreKind codes by the op's names
  for (const auto& k : mmrprune_cuda::kScoreKindNames) kinds[k.name] = static_cast<int>(k.kind);
  m.attr("SCORE_KINDS") = kinds;
  m.def("smem_bytes", &mmrprune_cuda::greedy_smem_bytes, py::arg("dim"),
        "dynamic shared memory (bytes) of the greedy kernels for feature dim `dim`");
  m.def("gram_state_smem_bytes", &mmrprune_cuda::gram_state_smem_bytes, py::arg("ld"),
        "dynamic shared memory (bytes) of the Gram-mode maxsim kernel's token state for padded length `ld`");
#ifndef MMRPRUNE_REAL_CUDA
  m.def("launches", &mmrprune_emu_launches,
        "kernel launches the emulator has run in this process (each <<<>>>, failed ones included)");
#endif
}
