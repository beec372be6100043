"""Build and install mmrprune.

The Python package is ``mmrprune``, the Triton kernels included
(``mmrprune/triton_kernels/``).

Native extensions (plain pybind11 modules, no torch headers; see csrc/README.md):

* ``mmrprune._cpu``  from ``csrc/cpu/*.cpp`` with the host C++ compiler.  No
  ``-march``: the SIMD kernels are compiled per ISA with function target
  attributes and picked at load time, so the binary runs on any x86-64.
* ``mmrprune._cuda`` from ``csrc/cuda/*.cu`` (nvcc) + ``csrc/cuda/*.cpp``,
  linked against the static CUDA runtime (not torch's CUDAExtension: the CPU
  torch wheel cannot link it).  ``MMRPRUNE_CUDA=1`` forces it (fails if nvcc
  is missing), ``=0`` skips it, unset builds it when nvcc is
  found (PATH, ``CUDA_HOME``/``CUDA_PATH`` or /usr/local/cuda).  A compile error
  in a CUDA source fails the build.  ``MMRPRUNE_CUDA_ARCHS`` (default
  ``"80;90"``) lists the SASS targets; PTX of the highest is embedded too.

Objects are compiled by ninja when it is installed (incremental rebuilds with
header dependencies), else by a pool of ``MAX_JOBS`` (default 2) compiler
processes.  The build facts go to the generated ``mmrprune/_build_config.py``.

``MMRPRUNE_SANITIZE`` (e.g. ``address,undefined``) builds ``mmrprune._cpu`` with
``-fsanitize=<value>`` for the sanitizer CI job (``.ci/sanitize.sh``); ``CXXFLAGS`` and
``LDFLAGS`` are appended to the C++ compile and link lines of ``mmrprune._cpu``.

``python setup.py check_cuda`` compiles every CUDA source to object files for
each arch (no link), the CI check for machines without a GPU.
"""
import os
import shlex
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from glob import glob

from setuptools import Command, Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))
CPU_SOURCES = sorted(glob(os.path.join("csrc", "cpu", "*.cpp")))
CUDA_CU = sorted(glob(os.path.join("csrc", "cuda", "*.cu")))
CUDA_CPP = sorted(glob(os.path.join("csrc", "cuda", "*.cpp")))

sys.path.insert(0, os.path.join(ROOT, "csrc"))
import build_recipe as recipe  # noqa: E402  every flag and link line (csrc/build_recipe.py)

CXX_FLAGS = recipe.CXX_FLAGS
SIMD_TARGETS = "avx512f / avx2+fma / sse2 (x86-64), picked at load time from CPUID"


def _env_flag(name):
    v = os.environ.get(name)
    if v is None or v.strip() == "":
        return None
    if v.strip() not in ("0", "1"):
        raise SystemExit(f"{name} must be 0 or 1, got {v!r}")
    return v.strip() == "1"


_find_nvcc = recipe.find_nvcc
_cuda_archs = recipe.cuda_archs
_gencode = recipe.gencode


def _cuda_home(nvcc):
    """The toolkit root (include/, lib64/) of this nvcc; nvcc on PATH may be a wrapper script."""
    home = recipe.cuda_home(nvcc)
    if home is None:
        raise SystemExit(f"cannot find the CUDA toolkit (include/cuda_runtime.h) for {nvcc}; set CUDA_HOME")
    return home


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
    return True, nvcc, "built"


def _nvcc_version(nvcc):
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True).stdout
        return out.strip().splitlines()[-1]
    except Exception as exc:  # pragma: no cover - only for the report
        return f"unknown ({exc})"


def _cpu_user_flags():
    """(compile, link) flags for mmrprune._cpu from MMRPRUNE_SANITIZE, CXXFLAGS and LDFLAGS."""
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
    compile_flags += shlex.split(os.environ.get("CXXFLAGS", ""))
    link_flags += shlex.split(os.environ.get("LDFLAGS", ""))
    return compile_flags, link_flags



_cxx = recipe.cxx


def _cxx_version(cxx):
    try:
        return subprocess.run([cxx, "--version"], capture_output=True, text=True, check=True).stdout.splitlines()[0]
    except Exception as exc:  # pragma: no cover
        return f"unknown ({exc})"


_includes = recipe.python_includes


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
    return (recipe.cxx_command(cxx, os.path.join(ROOT, src), obj, _includes(), extra), obj, obj + ".d")


def _nvcc_job(nvcc, src, obj, archs):
    return (recipe.nvcc_command(nvcc, os.path.join(ROOT, src), obj, archs, _includes()), obj, obj + ".d")


def _emu_jobs(cxx, tmp, cuda_inc):
    """mmrprune._cuda_emu: the same csrc/cuda sources, .cu rewritten for csrc/emu/cuda_emu.h."""
    jobs = []
    for s in CUDA_CU:
        src = recipe.emu_rewrite(os.path.join(ROOT, s), tmp)
        obj = os.path.join(tmp, os.path.basename(s) + ".o")
        jobs.append((recipe.emu_command(cxx, src, obj, cuda_inc), obj, obj + ".d"))
    for s in CUDA_CPP:
        obj = os.path.join(tmp, os.path.basename(s) + ".o")
        jobs.append((recipe.emu_host_command(cxx, os.path.join(ROOT, s), obj, cuda_inc, _includes(),
                                             [recipe.EMU_MODULE_DEFINE]), obj, obj + ".d"))
    return jobs


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
            user_compile, user_link = _cpu_user_flags()
            compile_extra = recipe.CPU_OPENMP_FLAGS + user_compile
            jobs = [_cxx_job(cxx, s, os.path.join(tmp, os.path.basename(s) + ".o"), compile_extra) for s in ext.sources]
            _compile_all(jobs, tmp)
            link_extra = ["-pthread", *recipe.CPU_OPENMP_FLAGS, *user_link]
            self.facts.update(cpu_compiler=_cxx_version(cxx), cpu_flags=" ".join(CXX_FLAGS + compile_extra),
                              cpu_simd=SIMD_TARGETS,
                              cpu_threads="OpenMP (torch's libgomp): images over threads, spare threads help one image")
        elif ext.name == "mmrprune._cuda_emu":
            jobs = _emu_jobs(cxx, tmp, ext._cuda_inc)
            try:
                _compile_all(jobs, tmp)
            except (SystemExit, subprocess.CalledProcessError) as exc:
                # the headers are here, so a failure is a bug in csrc/ or csrc/emu/: never silent
                raise SystemExit(f"mmrprune: building the CUDA emulator module mmrprune._cuda_emu failed ({exc}); "
                                 "set MMRPRUNE_CUDA_EMU=0 to skip it") from exc
            link_extra = ["-pthread"]
            self.facts.update(cuda_emu_built=True, cuda_emu_flags=" ".join(recipe.EMU_CXX_FLAGS))
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
            # static cudart: the module needs only the driver (libcuda.so) at run time
            link_extra = recipe.cuda_link_flags(cuda_home)
            self.facts.update(cuda_built=True)
        objs = [j[1] for j in jobs]
        cmd = recipe.link_command(cxx, out, objs, link_extra)
        print(" ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)

    def _write_config(self, pkg_dir):
        _, nvcc, reason = CUDA_PLAN
        facts = dict(self.facts)
        facts.setdefault("cuda_built", False)
        facts.setdefault("cuda_status", reason)
        facts.setdefault("cuda_emu_built", False)
        facts.setdefault("cuda_emu_status", CUDA_EMU_PLAN[1])
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
    cuda_inc, emu_reason = CUDA_EMU_PLAN
    if cuda_inc:
        ext = Extension("mmrprune._cuda_emu", sources=CUDA_CU + CUDA_CPP)
        ext._cuda_inc = cuda_inc
        exts.append(ext)
    else:
        print(f"mmrprune: CUDA emulator module {emu_reason}", file=sys.stderr)
    return exts


def _cuda_emu_plan():
    """(CUDA include dir or None, status) of mmrprune._cuda_emu: built whenever the CUDA headers
    are present (no GPU, driver or nvcc run needed); MMRPRUNE_CUDA_EMU=0 skips, =1 requires it."""
    want = _env_flag("MMRPRUNE_CUDA_EMU")
    if want is False:
        return None, "skipped (MMRPRUNE_CUDA_EMU=0)"
    if not CUDA_CU or not CUDA_CPP:
        if want:
            raise SystemExit("MMRPRUNE_CUDA_EMU=1 but csrc/cuda/ has no .cu sources or no .cpp binding module")
        return None, "skipped (csrc/cuda/ has no .cu sources or no binding module)"
    inc = recipe.cuda_include_dir()
    if inc is None:
        if want:
            raise SystemExit("MMRPRUNE_CUDA_EMU=1 but the CUDA headers (cuda_runtime.h, cuda_fp16.h, cuda_bf16.h) "
                             "were not found under CUDA_HOME, CUDA_PATH, nvcc's toolkit or /usr/local/cuda")
        return None, ("skipped (CUDA headers not found: install the CUDA toolkit headers, e.g. nvcc's "
                      "include/ dir, or set CUDA_HOME)")
    return inc, f"built (CUDA headers {inc})"


CUDA_PLAN = _cuda_plan()
CUDA_EMU_PLAN = _cuda_emu_plan()


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
