"""The compiler flags of mmrprune's native modules, and where the CUDA toolkit is.

setup.py builds the modules with torch.utils.cpp_extension from these lists; the emulator
test harness (tests/emu_build.py) and the GPU session's scripts read them too, so that what
the tests compile is what users get.  Standard library only: setup.py reads it before torch.

* ``mmrprune._cpu``: ``CXX_FLAGS`` + ``CPU_OPENMP_FLAGS``.
* ``mmrprune._cuda``: each ``csrc/cuda/*.cu`` by nvcc with ``NVCC_FLAGS`` + ``gencode(archs)``,
  each ``csrc/cuda/*.cpp`` with ``CXX_FLAGS``; linked against the static CUDA runtime.
* ``mmrprune._cuda_emu`` (and the C++ test harness): the same ``csrc/cuda`` sources, each
  ``.cu`` rewritten by ``emu_rewrite`` and compiled by the host compiler with
  ``EMU_CXX_FLAGS``; needs the CUDA headers only.
"""
from __future__ import annotations

import os
import shutil
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA_DIR = os.path.join(ROOT, "csrc", "cuda")
EMU_DIR = os.path.join(ROOT, "csrc", "emu")

# C++20: the standard torch's own headers need since 2.10; stated here (BuildExtension would
# otherwise pick one per torch release) so that the harness and the modules agree.
# setuptools puts the interpreter's CFLAGS first on every host compile line; CPython's carry
# -g and -fwrapv (which would slow the hot loops and hide signed overflow from UBSan)
UNDO_PYTHON_CFLAGS = ["-g0", "-fno-wrapv"]
CXX_FLAGS = ["-O3", "-std=gnu++20", "-fPIC", "-fvisibility=hidden", "-pthread", *UNDO_PYTHON_CFLAGS,
             # a*b+c contracted to FMA in the dot kernels; no other fast-math
             "-ffp-contract=fast", "-Wall", "-Wno-psabi"]
# mmrprune._cpu only: its threads are an OpenMP region, so that they are torch's own
# intra-op threads (libgomp.so.1 resolves to the copy torch loaded; csrc/cpu/select.cpp
# run_crews says why)
CPU_OPENMP_FLAGS = ["-fopenmp"]
NVCC_FLAGS = ["-O3", "-std=c++20", "-Xcompiler", "-fPIC", "-Xcompiler", "-fvisibility=hidden",
              # BuildExtension hides cuda_fp16.h/cuda_bf16.h's operators and conversions on every
              # nvcc line; the kernels use them, as the emulator's host build sees them
              "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
              "-U__CUDA_NO_BFLOAT16_CONVERSIONS__", "-U__CUDA_NO_HALF2_OPERATORS__"]
# Emulated kernels: no contraction (the host would otherwise fuse where nvcc may not, and the
# kernels' explicit __fmul_rn/__fsub_rn must stay two roundings), no type-based aliasing
# assumptions (the kernels reinterpret uint4 loads), -O1 -g so sanitizer reports have lines.
# -w: the CUDA headers are not written for a host-only g++ and warn a lot.
EMU_CXX_FLAGS = ["-std=gnu++20", *UNDO_PYTHON_CFLAGS, "-O1", "-g", "-fPIC", "-fvisibility=hidden",
                 "-fno-strict-aliasing", "-ffp-contract=off", "-w"]
EMU_MODULE_DEFINE = "-DMMRPRUNE_CUDA_MODULE=_cuda_emu"  # bindings.cpp's module name
SANITIZERS = {"asan": ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined",
                       "-fno-omit-frame-pointer"],
              "tsan": ["-fsanitize=thread"]}
CUDA_LIBRARIES = ["cudart_static", "dl", "rt"]  # static cudart: only the driver is needed at run time
DEFAULT_ARCHS = "80;90"


def cuda_archs(raw: str | None = None) -> list:
    """SASS targets from ``MMRPRUNE_CUDA_ARCHS`` (default ``"80;90"``)."""
    raw = os.environ.get("MMRPRUNE_CUDA_ARCHS", DEFAULT_ARCHS) if raw is None else raw
    archs = [a.strip().replace(".", "") for a in raw.replace(",", ";").split(";") if a.strip()]
    if not archs or not all(a.rstrip("af").isdigit() for a in archs):
        raise SystemExit(f"MMRPRUNE_CUDA_ARCHS: expected e.g. '80;90', got {raw!r}")
    return archs


def gencode(archs) -> list:
    """SASS for each arch plus PTX of the highest (for newer GPUs)."""
    flags = []
    for a in archs:
        flags += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    top = max(archs, key=lambda a: int(a.rstrip("af")))
    return flags + ["-gencode", f"arch=compute_{top},code=compute_{top}"]


def find_nvcc():
    found = shutil.which(os.environ.get("NVCC", "nvcc"))
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
            return os.path.join(home, "bin", "nvcc")
    return None


def cuda_home(nvcc=None):
    """The toolkit root (include/, lib64/) of ``nvcc`` (or of the environment), or None.
    The real path: nvcc on PATH may be a wrapper script."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates.append("/usr/local/cuda")
    for home in candidates:
        if home and os.path.exists(os.path.join(home, "include", "cuda_runtime.h")):
            return home
    return None


def cuda_include_dir():
    """The CUDA headers the emulated build needs (cuda_runtime.h, cuda_fp16.h, cuda_bf16.h),
    or None when they are not installed.  No GPU, driver or nvcc run is needed."""
    home = cuda_home(find_nvcc())
    if home is None:
        return None
    inc = os.path.join(home, "include")
    need = ("cuda_runtime.h", "cuda_fp16.h", "cuda_bf16.h")
    return inc if all(os.path.exists(os.path.join(inc, h)) for h in need) else None


def cuda_lib_dir(home) -> str:
    return next((d for d in (os.path.join(home, "lib64"), os.path.join(home, "lib")) if os.path.isdir(d)),
                os.path.join(home, "lib64"))


def cxx() -> str:
    """The host C++ compiler, by torch.utils.cpp_extension's rule ($CXX, else c++)."""
    return os.environ.get("CXX") or "c++"


def emu_include_dirs(cuda_inc) -> list:
    return [EMU_DIR, cuda_inc, CUDA_DIR]


def emu_rewrite(src, out_dir) -> str:
    """``out_dir/<name>.cu.emu.cpp``, the source the host compiler builds for ``src``: an include
    of csrc/emu/cuda_emu.h, which must come first, then ``src`` rewritten by
    csrc/emu/cu_rewrite.py (rewritten only when its text changed, so that an incremental build
    does not recompile it).  Returns the path."""
    sys.path.insert(0, EMU_DIR)
    try:
        import cu_rewrite
    finally:
        sys.path.pop(0)
    os.makedirs(out_dir, exist_ok=True)
    name = os.path.basename(src)
    cu_rewrite.rewrite_file(src, os.path.join(out_dir, name + ".emu.inc"), display_name=os.path.relpath(src, ROOT))
    out = os.path.join(out_dir, name + ".emu.cpp")
    text = f'#include "cuda_emu.h"\n#include "{name}.emu.inc"\n'
    if not os.path.exists(out):  # its text never changes
        with open(out, "w") as f:
            f.write(text)
    return out
