// The emulator's launch counter for mmrprune._cuda_emu (module.cpp): tests count the kernel
// launches of one op call with it, since a torch dispatch mode sees the op as one opaque call.
// Empty in the CUDA build.  A separate file: cuda_emu.h redefines CUDA keywords and built-ins,
// which torch's and pybind11's headers must not see.
#ifdef MMRPRUNE_CUDA_MODULE  // the emulator build (build_flags.EMU_MODULE_DEFINE)
#include "../emu/cuda_emu.h"

long mmrprune_emu_launches() { return cuda_emu::rt().launches; }
#endif
