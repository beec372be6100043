"""Builds and drives the native emulator harness (tests/emu/harness.cpp) for the sanitizer and
mutation tests.  The flags come from csrc/build_flags.py, as for the ``mmrprune._cuda_emu``
module that setup.py builds; only ``-fsanitize=...`` is added.
"""
from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "csrc"))
import build_flags as flags  # noqa: E402

sys.path.pop(0)

HARNESS = os.path.join(ROOT, "tests", "emu", "harness.cpp")
GREEDY_CU = os.path.join(flags.CUDA_DIR, "greedy.cu")


def _run(cmd):
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"build failed: {' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}")


def compile_flags(extra=()) -> list:
    """The host compiler flags of the emulated build (setup.py's ``mmrprune._cuda_emu``) + ``extra``."""
    cuda_inc = flags.cuda_include_dir()
    if cuda_inc is None:
        raise RuntimeError("CUDA headers not found")
    return [*flags.EMU_CXX_FLAGS, *[f"-I{d}" for d in flags.emu_include_dirs(cuda_inc)], *extra]


def compile_cu(cu_source, out_dir, extra=()) -> str:
    """``cu_source`` rewritten for the emulator and compiled to ``out_dir/<name>.o``; returns that path."""
    obj = os.path.join(out_dir, os.path.basename(cu_source) + ".o")
    _run([flags.cxx(), "-c", flags.emu_rewrite(cu_source, out_dir), "-o", obj, *compile_flags(extra)])
    return obj


def build(out_dir, cu_source=GREEDY_CU, sanitizer=None):
    """Harness executable linked with the emulated ``cu_source`` (``sanitizer``: None, "asan"
    or "tsan", from flags.SANITIZERS).  Returns its path."""
    os.makedirs(out_dir, exist_ok=True)
    extra = flags.SANITIZERS[sanitizer] if sanitizer else []
    kern_o, main_o = compile_cu(cu_source, out_dir, extra), os.path.join(out_dir, "harness.o")
    _run([flags.cxx(), "-c", HARNESS, "-o", main_o, *compile_flags(extra)])
    exe = os.path.join(out_dir, "harness")
    _run([flags.cxx(), "-o", exe, main_o, kern_o, *extra])
    return exe


def build_many(specs, jobs=2):
    """``{name: (out_dir, cu_source, sanitizer)}`` -> ``{name: exe or the build error}``, in parallel."""
    def one(item):
        name, (out_dir, src, san) = item
        try:
            return name, build(out_dir, src, san)
        except Exception as exc:  # reported by the test that needs this variant
            return name, exc
    with ThreadPoolExecutor(jobs) as pool:
        return dict(pool.map(one, specs.items()))


def _write(path, t):
    t = t.contiguous()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    t.numpy().tofile(path)


def _dtype_code(ext, dtype):
    """csrc/cuda/greedy.h's DType code of a feature dtype, as the module exports it."""
    return {torch.float32: ext.DTYPE_FLOAT32, torch.float16: ext.DTYPE_FLOAT16,
            torch.bfloat16: ext.DTYPE_BFLOAT16}[dtype]


def write_case(case_dir, prepared, x_offset=0, smem_state=-1):
    """Writes cuda_backend.prepare()'s arguments for the harness (see harness.cpp)."""
    from mmrprune.backends import cuda_emu_backend as emu
    os.makedirs(case_dir, exist_ok=True)
    a = emu.KERNELS.complete(prepared)   # the harness runs the greedy kernels only
    rows = a.rows
    gram = a.gram
    args = dict(kind="dpp" if a.dpp else "maxsim", mode="gram" if gram is not None else "row",
                dtype=_dtype_code(emu.KERNELS.ext, rows.dtype), rows=rows.shape[0], dim=rows.shape[1], batch=a.starts.shape[0],
                k_max=a.k_max, lam=repr(float(a.lam)), smem_state=smem_state, x_offset=x_offset,
                ld=gram.shape[1] if gram is not None else 0)
    with open(os.path.join(case_dir, "args.txt"), "w") as f:
        f.write("".join(f"{k} {v}\n" for k, v in args.items()))
    _write(os.path.join(case_dir, "x.bin"), rows)
    for key, name in (("score", "score"), ("starts", "starts"), ("lengths", "lengths"), ("ks", "ks"),
                      ("first_score", "first"), ("eligible", "eligible"), ("gram", "gram"),
                      ("inv_norm", "inv"), ("sqn", "sqn")):
        path = os.path.join(case_dir, f"{name}.bin")
        if getattr(a, key) is not None:
            _write(path, getattr(a, key))
        elif os.path.exists(path):
            os.remove(path)


def run_case(exe, case_dir, env=None, timeout=300):
    """Runs the harness on a case: (completed process, picks [batch, k_max] or None)."""
    out = os.path.join(case_dir, "out.bin")
    if os.path.exists(out):
        os.remove(out)
    full_env = dict(os.environ, **(env or {}))
    full_env.setdefault("ASAN_OPTIONS", "detect_leaks=0:abort_on_error=0")
    full_env.setdefault("TSAN_OPTIONS", "halt_on_error=1")
    proc = subprocess.run([exe, case_dir], capture_output=True, text=True, env=full_env, timeout=timeout)
    picks = None
    if proc.returncode == 0 and os.path.exists(out):
        with open(os.path.join(case_dir, "args.txt")) as f:
            kv = dict(line.split() for line in f)
        picks = np.fromfile(out, dtype=np.int64).reshape(int(kv["batch"]), int(kv["k_max"]))
    return proc, picks
