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
PREPARE_CU = os.path.join(flags.CUDA_DIR, "prepare.cu")


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


def build(out_dir, cu_source=GREEDY_CU, sanitizer=None, prepare_o=None):
    """Harness executable linked with the emulated ``cu_source`` and prepare.cu (``sanitizer``:
    None, "asan" or "tsan", from flags.SANITIZERS; ``prepare_o``: prepare.cu already compiled
    with that sanitizer).  Returns its path."""
    os.makedirs(out_dir, exist_ok=True)
    extra = flags.SANITIZERS[sanitizer] if sanitizer else []
    kern_o, main_o = compile_cu(cu_source, out_dir, extra), os.path.join(out_dir, "harness.o")
    prepare_o = prepare_o or compile_cu(PREPARE_CU, out_dir, extra)
    _run([flags.cxx(), "-c", HARNESS, "-o", main_o, *compile_flags(extra)])
    exe = os.path.join(out_dir, "harness")
    _run([flags.cxx(), "-o", exe, main_o, kern_o, prepare_o, *extra])
    return exe


def build_many(specs, jobs=2):
    """``{name: (out_dir, cu_source, sanitizer[, prepare_source])}`` -> ``{name: exe or the build
    error}``, in parallel; prepare.cu is compiled once per sanitizer and linked into each (a spec
    with its own prepare source, a mutant, compiles that instead)."""
    def prep(san):
        out_dir = os.path.join(os.path.dirname(next(iter(specs.values()))[0]), f"prepare_{san or 'plain'}")
        os.makedirs(out_dir, exist_ok=True)
        try:
            return san, compile_cu(PREPARE_CU, out_dir, flags.SANITIZERS[san] if san else [])
        except Exception as exc:
            return san, exc

    def one(item):
        name, (out_dir, src, san, *own_prepare) = item
        try:
            if own_prepare:
                os.makedirs(out_dir, exist_ok=True)
                return name, build(out_dir, src, san, compile_cu(own_prepare[0], out_dir,
                                                                 flags.SANITIZERS[san] if san else []))
            if isinstance(prepared[san], Exception):
                raise prepared[san]
            return name, build(out_dir, src, san, prepared[san])
        except Exception as exc:  # reported by the test that needs this variant
            return name, exc
    with ThreadPoolExecutor(jobs) as pool:
        prepared = dict(pool.map(prep, sorted({spec[2] for spec in specs.values()}, key=str)))
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


def write_case(case_dir, prepared, x_offset=0, smem_state=-1, kernel_prepare=False):
    """Writes cuda_backend.prepare()'s arguments for the harness (see harness.cpp).
    kernel_prepare: the harness runs the prepare kernel first, on the raw weights (as the op
    does); else the case holds the prepare kernel's outputs, computed here, and the harness runs
    the greedy kernels only."""
    from mmrprune.backends import cuda_emu_backend as emu
    os.makedirs(case_dir, exist_ok=True)
    a = prepared if kernel_prepare else emu.KERNELS.complete(prepared)
    rows = a.rows
    gram = a.gram
    args = dict(kind="dpp" if a.dpp else "maxsim", mode="gram" if gram is not None else "row",
                dtype=_dtype_code(emu.KERNELS.ext, rows.dtype), rows=rows.shape[0], dim=rows.shape[1], batch=a.starts.shape[0],
                k_max=a.k_max, lam=repr(float(a.lam)), smem_state=smem_state, x_offset=x_offset,
                ld=gram.shape[1] if gram is not None else 0)
    if kernel_prepare:
        args.update(prepare=emu.KERNELS.ext.SCORE_KINDS[a.score_kind], width=a.width, pool_lam=repr(float(a.pool_lam)),
                    norms=int(gram is not None and a.inv_norm is None))
    with open(os.path.join(case_dir, "args.txt"), "w") as f:
        f.write("".join(f"{k} {v}\n" for k, v in args.items()))
    _write(os.path.join(case_dir, "x.bin"), rows)
    for key, name in (("score", "score"), ("starts", "starts"), ("lengths", "lengths"), ("ks", "ks"),
                      ("first_score", "first"), ("eligible", "eligible"), ("gram", "gram"),
                      ("inv_norm", "inv"), ("sqn", "sqn"), ("weights", "weights")):
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
