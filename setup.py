"""Build and install mmrprune: the package (the Triton kernels in ``mmrprune/triton_kernels/``
included) and its native modules, compiled against the installed torch by
``torch.utils.cpp_extension`` (ninja: incremental, header-aware rebuilds).  The flags are in
``csrc/build_flags.py``; csrc/README.md describes the modules.

* ``mmrprune._cpu`` from ``csrc/cpu/*.cpp``.  No ``-march``: the SIMD kernels are compiled per
  ISA with function target attributes and picked at load time.
* ``mmrprune._cuda`` from ``csrc/cuda/*.cu`` (nvcc) + ``csrc/cuda/*.cpp``, linked against the
  static CUDA runtime and torch's CPU libraries only (a ``CppExtension``, not a
  ``CUDAExtension``: the CPU torch wheel has no CUDA libraries to link).  ``MMRPRUNE_CUDA=1``
  requires it, ``=0`` skips it, unset builds it when nvcc is found (PATH, ``NVCC``,
  ``CUDA_HOME``/``CUDA_PATH``, /usr/local/cuda).  ``MMRPRUNE_CUDA_ARCHS`` (default ``"80;90"``)
  lists the SASS targets; PTX of the highest is embedded too.
* ``mmrprune._cuda_emu`` from the same sources, each ``.cu`` rewritten for the CPU emulator
  (csrc/emu): built whenever the CUDA headers are found; ``MMRPRUNE_CUDA_EMU=0`` skips it, ``=1``
  requires it.

``MMRPRUNE_SANITIZE`` (e.g. ``address,undefined``) builds ``mmrprune._cpu`` with
``-fsanitize=<value>`` (``.ci/sanitize.sh``), and ``CXXFLAGS`` is appended to its compile lines;
``LDFLAGS`` goes on every link line (setuptools), ``MAX_JOBS`` caps ninja's parallel jobs.
The build facts go to the generated ``mmrprune/_build_config.py``.

``python setup.py check_cuda [--build-dir DIR] [--resource-usage]`` compiles and links the CUDA
module alone (as ``DIR/_cuda*.so``, default ``build/check_cuda``): the CI check without a GPU.
"""
import os
import shlex
import subprocess
import sys
import sysconfig
from glob import glob

from setuptools import Command, find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
CPU_SOURCES = sorted(glob(os.path.join("csrc", "cpu", "*.cpp")))
CUDA_CU = sorted(glob(os.path.join("csrc", "cuda", "*.cu")))
CUDA_CPP = sorted(glob(os.path.join("csrc", "cuda", "*.cpp")))
SIMD_TARGETS = "avx512f / avx2+fma / sse2 (x86-64), picked at load time from CPUID"

sys.path.insert(0, os.path.join(ROOT, "csrc"))
import build_flags as F  # noqa: E402
sys.path.pop(0)


def _env_flag(name):
    v = os.environ.get(name, "").strip()
    if v == "":
        return None
    if v not in ("0", "1"):
        raise SystemExit(f"{name} must be 0 or 1, got {v!r}")
    return v == "1"


def _cuda_plan():
    """(nvcc or None, status) of mmrprune._cuda from MMRPRUNE_CUDA and nvcc."""
    want = _env_flag("MMRPRUNE_CUDA")
    if want is False:
        return None, "skipped (MMRPRUNE_CUDA=0)"
    nvcc = F.find_nvcc()
    if nvcc is None:
        if want:
            raise SystemExit("MMRPRUNE_CUDA=1 but nvcc was not found on PATH, NVCC, CUDA_HOME, CUDA_PATH "
                             "or /usr/local/cuda")
        return None, "skipped (nvcc not found)"
    if F.cuda_home(nvcc) is None:
        raise SystemExit(f"cannot find the CUDA toolkit (include/cuda_runtime.h) of {nvcc}; set CUDA_HOME")
    return nvcc, "built"


def _cuda_emu_plan():
    """(CUDA include dir or None, status) of mmrprune._cuda_emu: built whenever the CUDA headers
    are present (no GPU, driver or nvcc run needed)."""
    want = _env_flag("MMRPRUNE_CUDA_EMU")
    if want is False:
        return None, "skipped (MMRPRUNE_CUDA_EMU=0)"
    inc = F.cuda_include_dir()
    if inc is None:
        if want:
            raise SystemExit("MMRPRUNE_CUDA_EMU=1 but the CUDA headers (cuda_runtime.h, cuda_fp16.h, cuda_bf16.h) "
                             "were not found under CUDA_HOME, CUDA_PATH, nvcc's toolkit or /usr/local/cuda")
        return None, ("skipped (CUDA headers not found: install the CUDA toolkit headers, e.g. nvcc's "
                      "include/ dir, or set CUDA_HOME)")
    return inc, f"built (CUDA headers {inc})"


# pip installs ninja next to this interpreter, which is on PATH only in an activated venv
os.environ["PATH"] = os.pathsep.join([sysconfig.get_path("scripts"), os.environ.get("PATH", "")])
NVCC, CUDA_STATUS = _cuda_plan()
EMU_INC, EMU_STATUS = _cuda_emu_plan()
try:
    import torch
    import torch.utils.cpp_extension as cpp_extension
    from torch.utils.cpp_extension import BuildExtension, CppExtension
except ImportError as exc:
    raise SystemExit(f"mmrprune's native modules are built against the installed torch ({exc}): install torch "
                     "first (bash scripts/setup.sh does), then build without isolation: "
                     "pip install --no-build-isolation -e .") from exc
# cpp_extension compiles .cu sources with its CUDA_HOME/bin/nvcc, which it leaves unset under a
# CPU torch (our kernels need only nvcc and the static runtime): the toolkit of the nvcc found here
if F.find_nvcc():
    cpp_extension.CUDA_HOME = F.cuda_home(F.find_nvcc())


def _cpu_user_flags():
    """(compile, link) flags for mmrprune._cpu from MMRPRUNE_SANITIZE and CXXFLAGS."""
    compile_flags, link_flags = [], []
    sanitize = os.environ.get("MMRPRUNE_SANITIZE", "").strip()
    if sanitize:
        if not all(part.strip().isidentifier() for part in sanitize.split(",")):
            raise SystemExit(f"MMRPRUNE_SANITIZE: expected sanitizer names such as 'address,undefined', got {sanitize!r}")
        # -fno-sanitize-recover: a UBSan finding aborts (and fails the job) instead of printing and going on
        san = [f"-fsanitize={sanitize}", "-fno-sanitize-recover=all"]
        # -O1 (after CXX_FLAGS' -O3, so it wins): the usual sanitizer level, and the build's
        # slowest part (dots.cpp compiled per ISA) takes a fraction of the -O3 time
        compile_flags += san + ["-O1", "-fno-omit-frame-pointer", "-g"]
        link_flags += san
    # setuptools gives the ninja compile lines the interpreter's CFLAGS, not the user's CXXFLAGS
    compile_flags += shlex.split(os.environ.get("CXXFLAGS", ""))
    return compile_flags, link_flags


def _cuda_extension(name, nvcc, archs, nvcc_extra=()):
    home = F.cuda_home(nvcc)
    return CppExtension(name, CUDA_CU + CUDA_CPP, include_dirs=[os.path.join(home, "include")],
                        library_dirs=[F.cuda_lib_dir(home)], libraries=list(F.CUDA_LIBRARIES),
                        extra_compile_args={"cxx": list(F.CXX_FLAGS),
                                            "nvcc": F.NVCC_FLAGS + F.gencode(archs) + list(nvcc_extra)},
                        extra_link_args=["-pthread"])


def _extensions():
    user_compile, user_link = _cpu_user_flags()
    exts = [CppExtension("mmrprune._cpu", CPU_SOURCES,
                         extra_compile_args={"cxx": F.CXX_FLAGS + F.CPU_OPENMP_FLAGS + user_compile},
                         extra_link_args=["-pthread", *F.CPU_OPENMP_FLAGS, *user_link])]
    if NVCC:
        exts.append(_cuda_extension("mmrprune._cuda", NVCC, F.cuda_archs()))
    else:
        print(f"mmrprune: CUDA extension {CUDA_STATUS}", file=sys.stderr)
    if EMU_INC:
        # the .cu sources are replaced by their rewrites at build time (BuildExt.build_extensions)
        exts.append(CppExtension("mmrprune._cuda_emu", CUDA_CU + CUDA_CPP, include_dirs=F.emu_include_dirs(EMU_INC),
                                 extra_compile_args={"cxx": F.EMU_CXX_FLAGS + [F.EMU_MODULE_DEFINE]},
                                 extra_link_args=["-pthread"]))
    else:
        print(f"mmrprune: CUDA emulator module {EMU_STATUS}", file=sys.stderr)
    return exts


def _version_line(cmd, last=False):
    try:
        lines = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()
        return lines[-1 if last else 0]
    except Exception as exc:  # pragma: no cover - only for the report
        return f"unknown ({exc})"


class BuildExt(BuildExtension):
    """BuildExtension with one ninja folder per module (they share sources, with other flags),
    the emulator's rewritten sources, and the build facts in mmrprune/_build_config.py."""

    def run(self):
        if getattr(self, "editable_mode", False):
            # pip's editable build hands over a fresh temporary folder: ninja could never skip
            # an unchanged object.  The folder of `build_ext --inplace` instead, shared with it.
            self.build_temp = os.path.join(ROOT, "build", f"temp.{sysconfig.get_platform()}-"
                                                          f"{sys.implementation.cache_tag}")
        # setuptools builds into build/lib and copies to the source tree afterwards
        # (with inplace reset to 0 meanwhile), so remember whether to copy the config too
        to_source = bool(self.inplace or getattr(self, "editable_mode", False))
        super().run()
        self._write_config(os.path.join(os.path.abspath(self.build_lib), "mmrprune"))
        if to_source:
            self._write_config(os.path.join(ROOT, "mmrprune"))

    def build_extensions(self):
        for ext in self.extensions:
            if ext.name.endswith("_cuda_emu"):
                # one relative place, whichever build_temp: the object names follow the source paths
                gen = os.path.join(ROOT, "build", "emu_src")
                ext.sources = [os.path.relpath(F.emu_rewrite(os.path.join(ROOT, s), gen)) if s.endswith(".cu") else s
                               for s in ext.sources]
        super().build_extensions()

    def build_extension(self, ext):
        base = self.build_temp
        self.build_temp = os.path.join(base, ext.name.rsplit(".", 1)[-1])
        try:
            super().build_extension(ext)
        except (Exception, SystemExit) as exc:
            if not ext.name.endswith("_cuda_emu"):
                raise
            # the headers are here, so a failure is a bug in csrc/ or csrc/emu/: never silent
            raise SystemExit(f"mmrprune: building the CUDA emulator module mmrprune._cuda_emu failed ({exc}); "
                             "set MMRPRUNE_CUDA_EMU=0 to skip it") from exc
        finally:
            self.build_temp = base

    def _write_config(self, pkg_dir):
        facts = dict(torch=torch.__version__, cpu_compiler=_version_line([F.cxx(), "--version"]),
                     cpu_flags=" ".join(F.CXX_FLAGS + F.CPU_OPENMP_FLAGS + _cpu_user_flags()[0]),
                     cpu_simd=SIMD_TARGETS,
                     cpu_threads="OpenMP (torch's libgomp): images over threads, spare threads help one image",
                     cuda_built=bool(NVCC), cuda_status=CUDA_STATUS,
                     cuda_emu_built=bool(EMU_INC), cuda_emu_status=EMU_STATUS)
        if NVCC:
            facts.update(cuda_archs=";".join(F.cuda_archs()), cuda_nvcc=_version_line([NVCC, "--version"], last=True),
                         cuda_flags=" ".join(F.NVCC_FLAGS + F.gencode(F.cuda_archs())))
        if EMU_INC:
            facts.update(cuda_emu_flags=" ".join(F.EMU_CXX_FLAGS))
        os.makedirs(pkg_dir, exist_ok=True)
        path = os.path.join(pkg_dir, "_build_config.py")
        with open(path, "w") as f:
            f.write('"""Generated by setup.py build_ext; do not edit (git-ignored)."""\n')
            f.write(f"BUILD = {facts!r}\n")
        print(f"wrote {path}")


class CheckCuda(Command):
    """Compile and link the CUDA module alone, into a folder of its own (no GPU needed)."""
    description = "compile and link mmrprune._cuda for MMRPRUNE_CUDA_ARCHS (default 80;90): CI's check"
    user_options = [("build-dir=", "b", "where the module and its objects go (default build/check_cuda)"),
                    ("resource-usage", None, "print ptxas's registers, shared memory, stack and spills per kernel")]
    boolean_options = ["resource-usage"]

    def initialize_options(self):
        self.build_dir = None
        self.resource_usage = 0

    def finalize_options(self):
        self.build_dir = os.path.abspath(self.build_dir or os.path.join(ROOT, "build", "check_cuda"))

    def run(self):
        nvcc = F.find_nvcc()
        if nvcc is None:
            raise SystemExit("check_cuda: nvcc not found (PATH, NVCC, CUDA_HOME, CUDA_PATH, /usr/local/cuda)")
        extra = ["--resource-usage"] if self.resource_usage else []
        # a build_ext of its own (other folders, one module, named _cuda at the folder's top)
        self.distribution.ext_modules = [_cuda_extension("_cuda", nvcc, F.cuda_archs(), extra)]
        build = BuildExtension(self.distribution)
        build.build_lib, build.build_temp = self.build_dir, os.path.join(self.build_dir, "temp")
        build.ensure_finalized()
        build.run()
        print(f"check_cuda: built {build.get_ext_fullpath('_cuda')}")


def _transformers_window():
    """The ``hf`` extra: the transformers releases the HF integration is tested on, stated once
    in mmrprune/integrations/hf/versions.py (which imports nothing, so it runs here)."""
    import runpy
    return runpy.run_path(os.path.join(ROOT, "mmrprune/integrations/hf/versions.py"))["REQUIREMENT"]


setup(
    packages=find_packages(include=["mmrprune", "mmrprune.*"]),
    package_data={"mmrprune.data": ["*.npz"]},
    ext_modules=_extensions(),
    cmdclass={"build_ext": BuildExt, "check_cuda": CheckCuda},
    extras_require={
        "triton": ["triton>=3.2"],
        "test": ["pytest", "pytest-benchmark"],
        "realdata": ["onnx", "onnxruntime", "pillow", "scikit-image"],
        "bench": ["matplotlib"],
        "hf": [_transformers_window()],
    },
)
