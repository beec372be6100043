"""The native build recipe: every compiler flag and link line of mmrprune's extensions.

One place for the flags, used by ``setup.py`` (the shipped modules), by
``bench/cuda_compile_check.sh`` (through the command line below) and by the tests
that build the emulated kernels (tests/emu_build.py), so that what CI compiles is
what users get.  Standard library only: setup.py imports it before anything is built.

* ``mmrprune._cpu`` and the host ``.cpp`` of ``mmrprune._cuda``: ``CXX_FLAGS``.
* ``mmrprune._cuda``: each ``csrc/cuda/*.cu`` by nvcc with ``NVCC_FLAGS`` + ``gencode(archs)``,
  each ``csrc/cuda/*.cpp`` by the host compiler with ``CXX_FLAGS``, linked by
  ``<cxx> -shared`` against the static CUDA runtime (``cuda_link_flags``): the module needs
  only the driver at run time.
* ``mmrprune._cuda_emu`` (and the C++ test harness): the same ``csrc/cuda`` sources, each
  ``.cu`` rewritten by ``csrc/emu/cu_rewrite.py`` and compiled by the host compiler with
  ``EMU_CXX_FLAGS`` and ``-include csrc/emu/cuda_emu.h``; needs the CUDA headers only.

Command line (for shell scripts)::

    python3 csrc/build_recipe.py cuda-module OUT_DIR [--report FILE]
        compiles and links mmrprune._cuda into OUT_DIR exactly as setup.py does
        (MMRPRUNE_CUDA_ARCHS, CXX, NVCC honoured); --report appends ptxas's
        resource usage (registers, stack, spills) to FILE.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from glob import glob

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA_DIR = os.path.join(ROOT, "csrc", "cuda")
EMU_DIR = os.path.join(ROOT, "csrc", "emu")

CXX_FLAGS = ["-O3", "-std=gnu++17", "-fPIC", "-fvisibility=hidden", "-pthread",
             # a*b+c contracted to FMA in the dot kernels; no other fast-math
             "-ffp-contract=fast", "-Wall", "-Wno-psabi"]
# mmrprune._cpu only: its threads are an OpenMP region, so that they are torch's own
# intra-op threads (libgomp.so.1 resolves to the copy torch loaded; csrc/cpu/select.cpp
# run_crews says why)
CPU_OPENMP_FLAGS = ["-fopenmp"]
NVCC_FLAGS = ["-O3", "-std=c++17", "-Xcompiler", "-fPIC", "-Xcompiler", "-fvisibility=hidden"]
# Emulated kernels: no contraction (the host would otherwise fuse where nvcc may not, and the
# kernels' explicit __fmul_rn/__fsub_rn must stay two roundings), no type-based aliasing
# assumptions (the kernels reinterpret uint4 loads), -O1 -g so sanitizer reports have lines.
# -w: the CUDA headers are not written for a host-only g++ and warn a lot.
EMU_CXX_FLAGS = ["-std=gnu++17", "-O1", "-g", "-fPIC", "-fvisibility=hidden", "-fno-strict-aliasing",
                 "-ffp-contract=off", "-w"]
SANITIZERS = {"asan": ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined",
                       "-fno-omit-frame-pointer"],
              "tsan": ["-fsanitize=thread"]}
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
    """The toolkit root (include/, lib64/) of ``nvcc`` (or of the environment), or None."""
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


def cuda_link_flags(home) -> list:
    libdir = next((d for d in (os.path.join(home, "lib64"), os.path.join(home, "lib")) if os.path.isdir(d)),
                  os.path.join(home, "lib64"))
    return [f"-L{libdir}", "-lcudart_static", "-ldl", "-lrt", "-pthread"]


def cxx():
    return os.environ.get("CXX") or (sysconfig.get_config_var("CXX") or "g++").split()[0] or "g++"


def python_includes() -> list:
    import pybind11
    return [pybind11.get_include(), sysconfig.get_paths()["include"]]


def cu_sources():
    return sorted(glob(os.path.join(CUDA_DIR, "*.cu")))


def cpp_sources():
    return sorted(glob(os.path.join(CUDA_DIR, "*.cpp")))


# ----------------------------------------------------------------------------- commands
def cxx_command(compiler, src, obj, includes, extra=()) -> list:
    return [compiler, "-c", src, "-o", obj, "-MMD", "-MF", obj + ".d", *CXX_FLAGS,
            *[f"-I{p}" for p in includes], *extra]


def nvcc_command(nvcc, src, obj, archs, includes, extra=()) -> list:
    return [nvcc, "-c", src, "-o", obj, *NVCC_FLAGS, *gencode(archs), *[f"-I{p}" for p in includes],
            "-MD", "-MF", obj + ".d", *extra]


def link_command(compiler, out, objs, extra=()) -> list:
    return [compiler, "-shared", "-o", out, *objs, *extra]


def emu_rewrite(src, build_dir) -> str:
    """Rewrite one ``.cu`` into ``build_dir`` (unchanged text is not rewritten); returns the path."""
    sys.path.insert(0, EMU_DIR)
    try:
        import cu_rewrite
    finally:
        sys.path.pop(0)
    os.makedirs(build_dir, exist_ok=True)
    out = os.path.join(build_dir, os.path.basename(src) + ".emu.cpp")
    cu_rewrite.rewrite_file(src, out, display_name=os.path.relpath(src, ROOT))
    return out


def emu_command(compiler, src, obj, cuda_inc, extra=()) -> list:
    """Compile one rewritten ``.cu`` (or a ``.cpp`` that calls the launchers) for the emulator."""
    return [compiler, "-c", src, "-o", obj, "-MMD", "-MF", obj + ".d", *EMU_CXX_FLAGS,
            "-include", os.path.join(EMU_DIR, "cuda_emu.h"), f"-I{cuda_inc}", f"-I{CUDA_DIR}", *extra]


def emu_host_command(compiler, src, obj, cuda_inc, includes=(), extra=()) -> list:
    """Compile a host ``.cpp`` (bindings.cpp, a test harness) for linking with emulated kernels."""
    return [compiler, "-c", src, "-o", obj, "-MMD", "-MF", obj + ".d", *EMU_CXX_FLAGS,
            f"-I{cuda_inc}", f"-I{CUDA_DIR}", *[f"-I{p}" for p in includes], *extra]


EMU_MODULE_DEFINE = "-DMMRPRUNE_CUDA_MODULE=_cuda_emu"  # bindings.cpp's PYBIND11_MODULE name


def _run(cmd, **kw):
    print(" ".join(cmd), flush=True)
    return subprocess.run(cmd, check=True, **kw)


def build_cuda_module(out_dir, report=None) -> str:
    """Compile and link ``mmrprune._cuda`` into ``out_dir`` with the recipe above (serially)."""
    nvcc = find_nvcc()
    if nvcc is None:
        raise SystemExit("nvcc not found (PATH, NVCC, CUDA_HOME, CUDA_PATH, /usr/local/cuda)")
    home = cuda_home(nvcc)
    if home is None:
        raise SystemExit(f"cannot find the CUDA toolkit (include/cuda_runtime.h) for {nvcc}; set CUDA_HOME")
    os.makedirs(out_dir, exist_ok=True)
    archs, objs = cuda_archs(), []
    for src in cu_sources():
        obj = os.path.join(out_dir, os.path.basename(src) + ".o")
        extra = ["--resource-usage"] if report else []
        proc = subprocess.run(nvcc_command(nvcc, src, obj, archs, python_includes(), extra),
                              capture_output=True, text=True)
        sys.stdout.write(proc.stdout)
        if report:
            with open(report, "a") as f:
                f.write(proc.stderr)
        if proc.returncode:
            sys.stderr.write(proc.stderr)
            raise SystemExit(f"nvcc failed on {src}")
        objs.append(obj)
    for src in cpp_sources():
        obj = os.path.join(out_dir, os.path.basename(src) + ".o")
        _run(cxx_command(cxx(), src, obj, [*python_includes(), os.path.join(home, "include")]))
        objs.append(obj)
    out = os.path.join(out_dir, "_cuda" + sysconfig.get_config_var("EXT_SUFFIX"))
    _run(link_command(cxx(), out, objs, cuda_link_flags(home)))
    return out


def main(argv) -> int:
    if len(argv) >= 2 and argv[0] == "cuda-module":
        report = argv[argv.index("--report") + 1] if "--report" in argv else None
        print(f"built {build_cuda_module(argv[1], report)}")
        return 0
    sys.stderr.write(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
