"""Performance targets (a)-(d) of the GPU session as benchmark records (goals.py lists them).

    python3 bench/gpu/targets.py --out targets.json [--dry-run]

Each case is one ``mmrprune.bench.speed.run_sweep`` (bf16, lam 0.5): on CUDA every call is
timed by ``triton.testing.do_bench`` (median, p20, p80) and every record also carries the
bf16 batched Gram matmul of the same shape (``gram_ms``, ``gram_share``), rounds/k where
the backend counts rounds, and the speed-ups over the ``torch`` fallback and the ``anchor``
loop where those ran.  Added here: ``target``, ``workspace_estimate_bytes`` (the library's
own estimate for the call), ``peak_alloc_bytes`` (measured: the CUDA caching allocator's
peak over one call minus what was allocated before it; None on CPU), ``cuda_sim_mode``
(the similarity source the cuda backend picks for the shape), ``cuda_cluster_ctas`` (Gram mode:
CTAs per image of the launch, a thread-block cluster when > 1, by the launcher's
rules on this device, bench/gpu_model.py ``cluster_ctas`` and ``dpp_cluster_ctas``; the dry run's device is the emulator's
H100), ``bmm_out_dtype`` (whether
this torch's bmm writes fp32 from bf16 operands, the Gram mode's fast path) and the
CUDA/Python/NumPy versions.  The JSON list (docs/contract.md, "Benchmark records") is rewritten after each case.
``--dry-run`` runs the same sweep on CPU at tiny shapes (cuda_emu, the Triton interpreter,
a perf_counter timer): the plumbing, not speed.
"""
from __future__ import annotations

import argparse

from common import TARGET, exit_status, record_fields, write_json  # first: sys.path, --dry-run's env
from goals import CASES, DTYPE, KEEP_RATIO, LAM

import torch  # noqa: E402

from mmrprune.backends import cuda_backend as cb  # noqa: E402
from mmrprune.bench import speed  # noqa: E402
from mmrprune.reference import LAM_METHODS, budget  # noqa: E402
from mmrprune.validation import validate  # noqa: E402
from mmrprune.workspace import estimate_bytes  # noqa: E402


def shape_of(case) -> speed.Shape:
    if TARGET.dry_run:
        b, n, d = case.dry_shape
        return speed.Shape(f"{case.preset}-tiny", b, n, d, "random")
    return speed.make_shapes([case.preset], batch=case.batch)[0]


def k_of(case, shape) -> int | None:
    """The case's fixed k (scaled to a quarter of the tiny shape in the dry run), or None: keep 25 %."""
    if case.k is None:
        return None
    return max(1, shape.tokens // 4) if TARGET.dry_run else case.k


def cluster_ctas_here(batch: int, tokens: int, method: str = "mmr") -> int:
    """CTAs per image of the cuda backend's Gram-mode launch on this device (the launchers' rules,
    csrc/cuda/greedy.cu cluster_shape and launch_dpp_gram_cluster, as bench/gpu_model.py states them)."""
    import os
    import sys
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from gpu_model import cluster_ctas, dpp_cluster_ctas
    rule = dpp_cluster_ctas if method == "dpp" else cluster_ctas
    if TARGET.dry_run:   # cuda_emu's device: compute capability CUDA_EMU_CC_MAJOR (9), CUDA_EMU_SMS (132)
        return rule(batch, tokens, int(os.environ.get("CUDA_EMU_SMS", 132)),
                    int(os.environ.get("CUDA_EMU_CC_MAJOR", 9)))
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return rule(batch, tokens, props.multi_processor_count, props.major)


def memory_facts(rec: dict, shape, k: int, x, w) -> dict:
    """``workspace_estimate_bytes``, ``cuda_sim_mode`` and (CUDA) ``peak_alloc_bytes`` of one
    call on the case's inputs ``x``, ``w``."""
    backend, method = rec["backend"], rec["method"]
    if backend == "anchor":
        return {}
    dtype = x.dtype
    facts = {}
    if backend == TARGET.cuda_backend:
        rows = shape.batch * shape.tokens
        gram = cb.use_gram(method, shape.batch, rows, shape.dim, k, shape.tokens, dtype)
        facts["cuda_sim_mode"] = "gram" if gram else "row"
        if gram:
            facts["cuda_cluster_ctas"] = cluster_ctas_here(shape.batch, shape.tokens, method)
        # False: this torch has no bf16 x bf16 -> fp32 bmm, and the Gram runs as an fp32 matmul
        facts["bmm_out_dtype"] = cb._HAS_BMM_OUT_DTYPE
        facts["workspace_estimate_bytes"] = cb.workspace_bytes(method, shape.batch, rows, shape.dim, k,
                                                               shape.tokens, gram=gram)
    else:
        batch = validate(x, w, k=k, keep_ratio=None, lam=LAM if method in LAM_METHODS else None,
                         method=method, method_params={}).batch
        facts["workspace_estimate_bytes"] = estimate_bytes(backend, batch)
    facts["peak_alloc_bytes"] = None
    if not TARGET.dry_run:
        fn, why = speed.make_runner(backend, method, k, LAM, "cuda")
        if fn is not None:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            fn(x, w)
            torch.cuda.synchronize()
            facts["peak_alloc_bytes"] = int(torch.cuda.max_memory_allocated() - before)
    return facts


def one_block_record(rec: dict, k: int, x, w) -> dict:
    """The same cuda call with the cluster turned off (cuda_backend._CLUSTER = 1: one block per
    image), timed like the sweep: the A/B that decides the launchers' cluster-size rules.
    Backend label ``cuda/one-block``, so goals.evaluate never takes it for the cuda record."""
    fn, why = speed.make_runner(rec["backend"], rec["method"], k, LAM, TARGET.device.split(":")[0])
    if fn is None:
        return {"target": rec["target"], "backend": "cuda/one-block", "method": rec["method"], "skipped": why}
    saved = cb._CLUSTER
    cb._CLUSTER = 1
    try:
        if TARGET.dry_run:
            t = speed.time_cpu(lambda: fn(x, w), repeats=1, warmup=0, max_seconds=0.5)
        else:
            t = speed.time_cuda(lambda: fn(x, w), repeats=10, device=TARGET.device)
    finally:
        cb._CLUSTER = saved
    return {"target": rec["target"], "backend": "cuda/one-block", "method": rec["method"], "cuda_cluster_ctas": 1,
            "vs_cluster_ctas": rec.get("cuda_cluster_ctas"), "cluster_median_ms": rec["median_ms"], **t}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="JSON list of benchmark records")
    p.add_argument("--dry-run", action="store_true", help="CPU: cuda_emu and the Triton interpreter, tiny shapes")
    p.add_argument("--cases", default=",".join(c.name for c in CASES), help="comma list of cases (default all)")
    args = p.parse_args(argv)
    wanted = [c for c in CASES if c.name in args.cases.split(",")]
    env = record_fields(__file__, argv)
    records, failed = [], []
    for case in wanted:
        shape = shape_of(case)
        k_fixed = k_of(case, shape)
        backends = [TARGET.cuda_backend, "triton", *case.baselines]
        cfg = speed.Config(shapes=[shape], methods=list(case.methods), backends=backends, dtypes=[DTYPE],
                           device=TARGET.device, k=k_fixed, keep_ratio=KEEP_RATIO, lam=LAM,
                           repeats=TARGET.size(10, 1), warmup=TARGET.size(1, 0), max_seconds=TARGET.size(3.0, 0.5))
        print(f"[targets] ({case.name}) {shape.label()} k={k_fixed or f'{KEEP_RATIO:.0%} of N'} "
              f"methods {','.join(case.methods)} backends {','.join(backends)}", flush=True)
        got, skipped = speed.run_sweep(cfg, env)
        k = budget(shape.tokens, k=k_fixed, keep_ratio=None if k_fixed else KEEP_RATIO)
        x, w = speed.make_inputs(shape, speed.DTYPES[DTYPE], TARGET.device)   # drawn once: (c) is 1.2 GB
        for rec in got:
            rec["target"] = case.name
            try:
                rec.update(memory_facts(rec, shape, k, x, w))
            except Exception as exc:  # a record without its memory facts still counts
                rec["memory_facts_error"] = f"{type(exc).__name__}: {exc}"[:300]
            print(f"[targets] ({case.name}) {rec['backend']:<8} {rec['method']:<9} {rec['median_ms']:.4g} ms"
                  f"  rounds/k {rec.get('rounds_per_k', '-')}  x anchor {rec.get('speedup_vs_anchor')}"
                  f"{'  CTAs/image ' + str(rec['cuda_cluster_ctas']) if 'cuda_cluster_ctas' in rec else ''}", flush=True)
        # B = 1 cases where the launch took a cluster (the dry run: every one, to run the plumbing)
        for rec in [r for r in got if r["backend"] == TARGET.cuda_backend and case.batch == 1
                    and (TARGET.dry_run or r.get("cuda_cluster_ctas", 1) > 1)]:
            ab = one_block_record(rec, k, x, w)
            got.append(ab)
            print(f"[targets] ({case.name}) cuda {rec['method']:<9} one block {ab.get('median_ms', float('nan')):.4g} ms"
                  f" vs {rec['cuda_cluster_ctas']} CTAs {rec['median_ms']:.4g} ms", flush=True)
        for line in skipped:
            print(f"[targets] ({case.name}) skipped: {line}", flush=True)
            if "failed:" in line or not line.startswith(("anchor", "torch")):
                failed.append(f"({case.name}) {line}")
        del x, w
        records += got
        write_json(args.out, records)
    write_json(args.out, records)
    return exit_status("targets", failed)


if __name__ == "__main__":
    raise SystemExit(main())
