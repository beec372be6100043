"""Per-kernel resources from a ptxas ``-v`` report, with the occupancy they allow.

    python bench/ptxas_report.py REPORT [--json OUT] [--update-committed]

REPORT is the text ptxas writes with ``-Xptxas -v`` (bench/cuda_compile_check.sh collects it
for every ``csrc/cuda`` kernel, sm_80 and sm_90).  Prints one line per kernel and arch and exits
1 when any kernel has spill stores/loads or a stack frame.  ``--json`` writes flat records;
``--update-committed`` rewrites bench/results/ptxas_resources.json (from the repository root).

Occupancy is computed, not measured: resident blocks per SM from registers (allocated per warp
in units of 256), threads, and shared memory (static + the dynamic bytes the launcher asks for at
target (b): N = 2691, D = 3584, plus the 1 KiB the runtime reserves per block), against the
per-SM limits of compute capability 8.0 and 9.0 (CUDA C++ Programming Guide, "Technical
Specifications per Compute Capability": 64K 32-bit registers, 2048 threads, 32 blocks, 64 warps;
shared memory 164 KiB (8.0) / 228 KiB (9.0) per SM).  The Gram-mode maxsim kernel runs
min(1024, roundup32(N)) threads: 1024 at (b)-(d) (576 at (a)).  The Gram-mode DPP kernel with its Cholesky
rows in shared memory runs only where they fit, not at (b): its dynamic bytes are (a)'s.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys

COMMITTED = "bench/results/ptxas_resources.json"
LIMITS = {  # per SM: registers, threads, blocks, warps, shared memory bytes; reserved smem per block
    "sm_80": dict(regs=65536, threads=2048, blocks=32, warps=64, smem=164 * 1024, reserved=1024),
    "sm_90": dict(regs=65536, threads=2048, blocks=32, warps=64, smem=228 * 1024, reserved=1024),
}
N_B, D_B, MAX_ROUND = 2691, 3584, 8   # target (b), and kMaxRound (csrc/cuda/greedy.h)
PREPARE_THREADS = 256                 # kPrepareThreads (csrc/cuda/prepare.cu)
N_A, K_A = 576, 64                     # target (a)
DTYPES = {"13__nv_bfloat16": "bf16", "6__half": "fp16", "f": "fp32"}

_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\d+)'.*?"
                    r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads.*?"
                    r"Used (\d+) registers(?:, used \d+ barriers)?(?:, (\d+) bytes smem)?", re.S)


def _label(mangled: str) -> tuple:
    """(short name, threads per block, dynamic smem bytes at target (b))."""
    m = re.search(r"(inv_norm_kernel|greedy_maxsim_kernel|greedy_dpp_kernel)I(\w+?)Lb([01])", mangled)
    if m:
        kind, dtype, vec = m.groups()
        threads = {"inv_norm_kernel": 256, "greedy_maxsim_kernel": 1024, "greedy_dpp_kernel": 512}[kind]
        dyn = {"inv_norm_kernel": 0, "greedy_maxsim_kernel": MAX_ROUND * D_B * 4, "greedy_dpp_kernel": D_B * 4}[kind]
        return f"{kind}<{DTYPES.get(dtype, dtype)}, vec={vec}>", threads, dyn
    m = re.search(r"greedy_maxsim_gram_kernelILb([01])ELi(\d+)E", mangled)
    if m:
        smem = m.group(1) == "1"
        return f"greedy_maxsim_gram_kernel<smem={m.group(1)}, own={m.group(2)}>", 1024, 5 * N_B if smem else 0
    m = re.search(r"greedy_maxsim_gram_cluster_kernelILi(\d+)E", mangled)
    if m:  # several CTAs per image (sm_90; an empty body on sm_80): its figure is (d)'s 16 CTAs of 1024
        # threads (at (b) 3 of 928), m of kOwn slots per thread in dynamic shared memory
        return f"greedy_maxsim_gram_cluster_kernel<own={m.group(1)}>", 1024, int(m.group(1)) * 1024 * 4
    m = re.search(r"greedy_dpp_gram_cluster_kernelILb([01])E", mangled)
    if m:  # several CTAs per image (sm_90; empty on sm_80): (b)'s 11 CTAs, so c_smem=1 holds (a)'s
        # 3 CTAs' shares of the rows (rows in shared memory do not fit at (b)); + the staged row
        k_b = round(N_B * 0.25)
        dyn = (K_A + -(-N_A // 3) * K_A) * 4 if m.group(1) == "1" else k_b * 4
        return f"greedy_dpp_gram_cluster_kernel<c_smem={m.group(1)}>", 512, dyn
    m = re.search(r"greedy_dpp_gram_kernelILb([01])E", mangled)
    if m:  # Cholesky rows in shared memory (c_smem=1): they do not fit at (b), so its figure is (a)'s
        return f"greedy_dpp_gram_kernel<c_smem={m.group(1)}>", 512, N_A * K_A * 4 if m.group(1) == "1" else 0
    if "prepare_kernel" in mangled:   # anonymous-namespace names carry a per-file hash: keep the plain name
        return "prepare_kernel", PREPARE_THREADS, 0
    return mangled, 1024, 0


def occupancy(arch: str, regs: int, threads: int, smem: int) -> dict:
    """Resident blocks per SM and the fraction of the SM's warps they fill, with the limiter."""
    lim = LIMITS[arch]
    warps = -(-threads // 32)
    per_warp = -(-max(regs, 1) * 32 // 256) * 256
    by = {"threads": lim["threads"] // threads, "blocks": lim["blocks"],
          "registers": (lim["regs"] // per_warp) // warps,
          "smem": lim["smem"] // (smem + lim["reserved"])}
    blocks = min(by.values())
    limiter = min(by, key=lambda k: (by[k], k != "registers"))
    return {"blocks_per_sm": blocks, "occupancy": round(blocks * warps / lim["warps"], 4), "limiter": limiter}


def parse(text: str) -> list:
    """One record per (kernel, arch) entry of a ptxas -v report."""
    out = []
    for m in _ENTRY.finditer(text):
        mangled, arch, stack, st, ld, regs, smem = m.groups()
        label, threads, dyn = _label(mangled)
        rec = dict(arch=arch, kernel=label, regs=int(regs), stack=int(stack), spill_st=int(st), spill_ld=int(ld),
                   smem_static=int(smem or 0), threads=threads, smem_dynamic_b=dyn)
        if arch in LIMITS:
            rec.update(occupancy(arch, rec["regs"], threads, rec["smem_static"] + dyn))
        out.append(rec)
    return sorted(out, key=lambda r: (r["arch"], r["kernel"]))


def bad(records: list) -> list:
    return [r for r in records if r["stack"] or r["spill_st"] or r["spill_ld"]]


def nvcc_version() -> str:
    try:
        out = subprocess.run([os.environ.get("NVCC", "nvcc"), "--version"], capture_output=True, text=True).stdout
    except OSError:
        return "unknown"
    m = re.search(r"release ([\d.]+)", out)
    return m.group(1) if m else "unknown"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("report")
    ap.add_argument("--json", help="write the records here (not into bench/results/)")
    ap.add_argument("--update-committed", action="store_true", help=f"rewrite {COMMITTED}")
    a = ap.parse_args(argv)
    if a.json:
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        from mmrprune.bench.records import refuse_committed
        refuse_committed({"--json": a.json}, ap.error)
    with open(a.report) as f:
        recs = parse(f.read())
    if not recs:
        print(f"FAIL: no ptxas entries in {a.report} (was it built with -Xptxas -v?)")
        return 1
    for r in recs:
        print(f"{r['arch']} {r['kernel']:42s} regs={r['regs']:>3} stack={r['stack']} spill_st={r['spill_st']} "
              f"spill_ld={r['spill_ld']} smem={r['smem_static']}+{r['smem_dynamic_b']} threads={r['threads']} "
              f"occupancy={r.get('occupancy', '?')} ({r.get('blocks_per_sm', '?')} blocks/SM, {r.get('limiter', '?')})")
    version = nvcc_version()
    for r in recs:
        r["nvcc"] = version
    targets = ([a.json] if a.json else []) + ([COMMITTED] if a.update_committed else [])
    for path in targets:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path, "w") as f:
            json.dump(recs, f, indent=1)
            f.write("\n")
    failing = bad(recs)
    if failing:
        print(f"FAIL: {len(failing)} kernel(s) with a stack frame or spills: "
              + ", ".join(f"{r['arch']} {r['kernel']}" for r in failing))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
