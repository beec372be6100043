"""Build and install mmrprune.

The Python package is ``mmrprune``; the Triton kernels live in the top-level
``triton_kernels/`` folder but install as ``mmrprune.triton_kernels`` so they
never shadow Triton's own ``triton_kernels`` package.

Native extensions (plain pybind11 modules, no torch headers; see csrc/README.md):

* ``mmrprune._cpu``  from ``csrc/cpu/*.cpp`` with the host C++ compiler.  No
  ``-march``: the SIMD kernels are compiled per ISA with function target
  attributes and picked at load time, so the binary runs on any x86-64.
* ``mmrprune._cuda`` from ``csrc/cuda/*.cu`` (nvcc) + ``csrc/cuda/*.cpp``,
  linked against the static CUDA runtime (not torch's CUDAExtension: the CPU
  torch wheel cannot link it).  ``MMRPRUNE_CUDA=1`` forces it (fails if nvcc
  or the sources are missing), ``=0`` skips it, unset builds it when nvcc is
  found (PATH, ``CUDA_HOME``/``CUDA_PATH`` or /usr/local/cuda).  A compile error
  in a CUDA source fails the build.  ``MMRPRUNE_CUDA_ARCHS`` (default
  ``"80;90"``) lists the SASS targets; PTX of the highest is embedded too.

Objects are compiled by ninja when it is installed (incremental rebuilds with
header dependencies), else by a pool of ``MAX_JOBS`` (default 2) compiler
processes.  The build facts go to the generated ``mmrprune/_build_config.py``.

``python setup.py check_cuda`` compiles every CUDA source to object files for
each arch (no link), the CI check for machines without a GPU.
"""
import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from glob import glob

from setuptools import Command, Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))
CPU_SOURCES = sorted(glob(os.path.join("csrc", "cpu", "*.cpp")))
CUDA_CU = sorted(glob(os.path.join("csrc", "cuda", "*.cu")))
CUDA_CPP = sorted(glob(os.path.join("csrc", "cuda", "*.cpp")))

CXX_FLAGS = ["-O3", "-std=gnu++17", "-fPIC", "-fvisibility=hidden", "-pthread",
             # a*b+c contracted to FMA in the dot kernels; no other fast-math
             "-ffp-contract=fast", "-Wall", "-Wno-psabi"]
SIMD_TARGETS = "avx512f / avx2+fma / sse2 (x86-64), picked at load time from CPUID"


def _env_flag(name):
    v = os.environ.get(name)
    if v is None or v.strip() == "":
        return None
    if v.strip() not in ("0", "1"):
        raise SystemExit(f"{name} must be 0 or 1, got {v!r}")
    return v.strip() == "1"


def _find_nvcc():
    found = shutil.which("nvcc")
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
            return os.path.join(home, "bin", "nvcc")
    return None


def _cuda_home(nvcc):
    """The toolkit root (include/, lib64/) of this nvcc; nvcc on PATH may be a wrapper script."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"),
                  os.path.dirname(os.path.dirname(os.path.realpath(nvcc))), "/usr/local/cuda"]
    for home in candidates:
        if home and os.path.exists(os.path.join(home, "include", "cuda_runtime.h")):
            return home
    raise SystemExit(f"cannot find the CUDA toolkit (include/cuda_runtime.h) for {nvcc}; set CUDA_HOME")


def _cuda_archs():
    raw = os.environ.get("MMRPRUNE_CUDA_ARCHS", "80;90")
    archs = [a.strip().replace(".", "") for a in raw.replace(",", ";").split(";") if a.strip()]
    if not archs or not all(a.rstrip("af").isdigit() for a in archs):
        raise SystemExit(f"MMRPRUNE_CUDA_ARCHS: expected e.g. '80;90', got {raw!r}")
    return archs


def _gencode(archs):
    flags = []
    for a in archs:
        flags += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    top = max(archs, key=lambda a: int(a.rstrip("af")))
    flags += ["-gencode", f"arch=compute_{top},code=compute_{top}"]  # PTX for newer GPUs
    return flags


def _cuda_plan():
    """(build_cuda, nvcc, reason) from MMRPRUNE_CUDA, nvcc and the sources present."""
    want = _env_flag("MMRPRUNE_CUDA")
    if want is False:
        return False, None, "skipped (MMRPRUNE_CUDA=0)"
    nvcc = _find_nvcc()
    if nvcc is None:
        if want:
            raise SystemExit("MMRPRUNE_CUDA=1 but nvcc was not found on PATH, CUDA_HOME, CUDA_PATH or /usr/local/cuda")
        return False, None, "skipped (nvcc not found)"
    if not CUDA_CU:
        if want:
            raise SystemExit("MMRPRUNE_CUDA=1 but csrc/cuda/ has no .cu sources")
        return False, nvcc, "skipped (csrc/cuda/ has no .cu sources yet)"
    return True, nvcc, "built"


def _nvcc_version(nvcc):
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True).stdout
        return out.strip().splitlines()[-1]
    except Exception as exc:  # pragma: no cover - only for the report
        return f"unknown ({exc})"


def _cxx():
    return os.environ.get("CXX") or sysconfig.get_config_var("CXX").split()[0] or "g++"


def _cxx_version(cxx):
    try:
        return subprocess.run([cxx, "--version"], capture_output=True, text=True, check=True).stdout.splitlines()[0]
    except Exception as exc:  # pragma: no cover
        return f"unknown ({exc})"


def _includes():
    import pybind11
    return [pybind11.get_include(), sysconfig.get_paths()["include"]]


def _jobs():
    return max(1, int(os.environ.get("MAX_JOBS", "2")))


def _compile_all(jobs, build_dir):
    """Compile [(cmd, obj)] with ninja (incremental) or a process pool; raise on any error."""
    os.makedirs(build_dir, exist_ok=True)
    ninja = shutil.which("ninja")
    if ninja:
        lines = ["ninja_required_version = 1.3", ""]
        for i, (cmd, obj, dep) in enumerate(jobs):
            lines += [f"rule cc{i}", f"  command = {' '.join(shlex.quote(c) for c in cmd)}",
                      f"  description = compile {os.path.relpath(obj, build_dir)}"]
            if dep:
                lines += [f"  depfile = {dep}", "  deps = gcc"]
            # ninja's log remembers each command line, so changed flags or archs rebuild too
            lines += [f"build {obj}: cc{i}", ""]
        with open(os.path.join(build_dir, "build.ninja"), "w") as f:
            f.write("\n".join(lines))
        subprocess.run([ninja, "-C", build_dir, "-j", str(_jobs())], check=True)
        return
    def run(job):
        cmd, obj, _ = job
        os.makedirs(os.path.dirname(obj), exist_ok=True)
        print(" ".join(cmd), flush=True)
        return subprocess.run(cmd).returncode
    with ThreadPoolExecutor(_jobs()) as pool:
        codes = list(pool.map(run, jobs))
    if any(codes):
        raise SystemExit("compilation failed (see the compiler errors above)")


def _cxx_job(cxx, src, obj, extra):
    dep = obj + ".d"
    return ([cxx, "-c", os.path.join(ROOT, src), "-o", obj, "-MMD", "-MF", dep, *CXX_FLAGS,
             *[f"-I{p}" for p in _includes()], *extra], obj, dep)


def _nvcc_job(nvcc, src, obj, archs):
    cmd = [nvcc, "-c", os.path.join(ROOT, src), "-o", obj, "-O3", "-std=c++17",
           "-Xcompiler", "-fPIC", "-Xcompiler", "-fvisibility=hidden", *_gencode(archs),
           *[f"-I{p}" for p in _includes()]]
    dep = obj + ".d"
    return (cmd + ["-MD", "-MF", dep], obj, dep)


class BuildExt(build_ext):
    """Compiles each extension's objects with ninja/a pool, links with the C++ compiler,
    then writes mmrprune/_build_config.py."""

    def run(self):
        # setuptools builds into build/lib and copies to the source tree afterwards
        # (with inplace reset to 0 meanwhile), so remember whether to copy the config too
        to_source = bool(self.inplace or getattr(self, "editable_mode", False))
        self.facts = {}
        super().run()
        self._write_config(os.path.join(os.path.abspath(self.build_lib), "mmrprune"))
        if to_source:
            self._write_config(os.path.join(ROOT, "mmrprune"))

    def build_extension(self, ext):
        out = self.get_ext_fullpath(ext.name)
        os.makedirs(os.path.dirname(out), exist_ok=True)
        tmp = os.path.join(os.path.abspath(self.build_temp), ext.name.replace(".", "_"))
        cxx = _cxx()
        if ext.name == "mmrprune._cpu":
            jobs = [_cxx_job(cxx, s, os.path.join(tmp, os.path.basename(s) + ".o"), []) for s in ext.sources]
            _compile_all(jobs, tmp)
            link_extra = ["-pthread"]
            self.facts.update(cpu_compiler=_cxx_version(cxx), cpu_flags=" ".join(CXX_FLAGS),
                              cpu_simd=SIMD_TARGETS, cpu_threads="std::thread over images (no OpenMP)")
        else:  # mmrprune._cuda
            nvcc, archs = ext._nvcc, ext._archs
            cuda_home = _cuda_home(nvcc)
            inc = os.path.join(cuda_home, "include")
            jobs = [_nvcc_job(nvcc, s, os.path.join(tmp, os.path.basename(s) + ".o"), archs) for s in CUDA_CU]
            jobs += [_cxx_job(cxx, s, os.path.join(tmp, os.path.basename(s) + ".o"), [f"-I{inc}"]) for s in CUDA_CPP]
            _compile_all(jobs, tmp)
            self.facts.update(cuda_archs=";".join(archs), cuda_nvcc=_nvcc_version(nvcc),
                              cuda_flags=" ".join(["-O3", *_gencode(archs)]))
            if not CUDA_CPP:
                # kernels compiled (so syntax errors fail the build) but no PYBIND11_MODULE(_cuda) yet
                print("mmrprune: csrc/cuda/ has no .cpp binding module yet; CUDA objects compiled, "
                      "extension not linked", file=sys.stderr)
                self.facts.update(cuda_built=False, cuda_status="kernels compiled, not linked (no csrc/cuda/*.cpp module)")
                return
            libdir = next((d for d in (os.path.join(cuda_home, "lib64"), os.path.join(cuda_home, "lib"))
                           if os.path.isdir(d)), os.path.join(cuda_home, "lib64"))
            # static cudart: the module needs only the driver (libcuda.so) at run time
            link_extra = [f"-L{libdir}", "-lcudart_static", "-ldl", "-lrt", "-pthread"]
            self.facts.update(cuda_built=True)
        objs = [j[1] for j in jobs]
        cmd = [cxx, "-shared", "-o", out, *objs, *link_extra]
        print(" ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)

    def _write_config(self, pkg_dir):
        _, nvcc, reason = CUDA_PLAN
        facts = dict(self.facts)
        facts.setdefault("cuda_built", False)
        facts.setdefault("cuda_status", reason)
        if nvcc and "cuda_nvcc" not in facts:
            facts["cuda_nvcc"] = _nvcc_version(nvcc)
        os.makedirs(pkg_dir, exist_ok=True)
        path = os.path.join(pkg_dir, "_build_config.py")
        with open(path, "w") as f:
            f.write('"""Generated by setup.py build_ext; do not edit (git-ignored)."""\n')
            f.write(f"BUILD = {facts!r}\n")
        print(f"wrote {path}")


class CheckCuda(Command):
    """Compile every csrc/cuda source for each arch to object files (no link, no GPU needed)."""
    description = "compile the CUDA sources for MMRPRUNE_CUDA_ARCHS (default 80;90) as a CI check"
    user_options = []

    def initialize_options(self):
        pass

    def finalize_options(self):
        pass

    def run(self):
        nvcc = _find_nvcc()
        if nvcc is None:
            raise SystemExit("check_cuda: nvcc not found")
        if not CUDA_CU:
            print("check_cuda: csrc/cuda/ has no .cu sources; nothing to check")
            return
        tmp = os.path.join(ROOT, "build", "check_cuda")
        inc = os.path.join(_cuda_home(nvcc), "include")
        jobs = []
        for a in _cuda_archs():
            jobs += [_nvcc_job(nvcc, s, os.path.join(tmp, f"sm{a}", os.path.basename(s) + ".o"), [a]) for s in CUDA_CU]
        jobs += [_cxx_job(_cxx(), s, os.path.join(tmp, "host", os.path.basename(s) + ".o"), [f"-I{inc}"])
                 for s in CUDA_CPP]
        _compile_all(jobs, tmp)
        print(f"check_cuda: {len(jobs)} object(s) compiled under {tmp}")


def _extensions():
    exts = [Extension("mmrprune._cpu", sources=CPU_SOURCES)]
    build_cuda, nvcc, reason = CUDA_PLAN
    if build_cuda:
        ext = Extension("mmrprune._cuda", sources=CUDA_CU + CUDA_CPP)
        ext._nvcc, ext._archs = nvcc, _cuda_archs()
        exts.append(ext)
    else:
        print(f"mmrprune: CUDA extension {reason}", file=sys.stderr)
    return exts


CUDA_PLAN = _cuda_plan()
setup(
    name="mmrprune",
    version="0.1.0",
    description="Exact, batched greedy visual-token selection (MMR, DivPrune, DPP, D2Pruner) for multimodal LLMs",
    python_requires=">=3.9",
    packages=find_packages(include=["mmrprune", "mmrprune.*"]) + ["mmrprune.triton_kernels"],
    package_dir={"mmrprune.triton_kernels": "triton_kernels"},
    package_data={"mmrprune.data": ["*.npz"]},
    ext_modules=_extensions(),
    cmdclass={"build_ext": BuildExt, "check_cuda": CheckCuda},
    install_requires=["numpy", "torch>=2.3"],
    extras_require={
        "triton": ["triton>=3.2"],
        "test": ["pytest", "pytest-benchmark"],
        "realdata": ["onnx", "onnxruntime", "pillow", "scikit-image"],
        "bench": ["matplotlib"],
        "hf": ["transformers>=5.23,<6"],
    },
    entry_points={"console_scripts": ["mmrprune-bench = mmrprune.bench.cli:main"],
                  # inert unless MMRPRUNE_VLLM is set (see mmrprune/integrations/vllm.py)
                  "vllm.general_plugins": ["mmrprune = mmrprune.integrations.vllm:register"]},
)
