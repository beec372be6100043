"""Correctness smoke of the GPU session: the fused kernels against the float64 reference.

    python3 bench/gpu/smoke.py --out smoke.json [--budget-s 75] [--dry-run]

For the ``cuda`` and ``triton`` backends (``--dry-run``: ``cuda_emu`` and Triton's
interpreter on CPU tensors, tiny shapes), in both similarity modes (row / Gram), in
float32, float16 and bfloat16, every method the backend runs in a fused kernel, padded
(``select`` with ``lengths``, an empty and a one-token image included) and packed
(``select_varlen``, whose picks must equal the padded call's):

* ``real``: the bundled DINOv2 tokens and their [CLS] attention (``mmrprune.data``);
* ``gaussian``: seeded Gaussian tokens with distinct importance, where the reference's
  score margins are mostly wide enough for exact indices;
* ``fuzz``: the seeded hostile problems of ``tests/test_fuzz.py`` (duplicates, ties,
  zero vectors, empty images);
* ``graph`` (last: a failed capture can leave the CUDA context unusable): CUDA-graph capture
  of ``select(..., check_finite=False)`` on both backends replays the eager picks, also after
  new values are copied into the captured inputs (the dry run cannot capture CPU tensors: it
  checks the same call, on the host path the GPU takes, makes no host sync and gives the
  eager picks).

Each image's picks must equal the reference's exactly when every score margin of the
reference exceeds the dtype's tolerance (``tests/certify.py``: ``reference_margin``),
else pass the step certificate (``check_certificate``).  Where a backend reports rounds
and its picks equal ``reference.select_rounds``'s order, the round counts must be equal
(DPP: one per pick; the fuzz problems, built of exact ties, only 1 <= rounds <= k).
Work stops at ``--budget-s`` seconds (the JSON then says ``"complete": false``); the
JSON is rewritten after every group.  Exit status 1 when any check failed.
"""
from __future__ import annotations

import argparse
import hashlib
import time
from dataclasses import dataclass
from typing import Optional

# first: sys.path, --dry-run's env
from common import MODES, TARGET, kernel_methods, max_round, tuning, write_json

import numpy as np  # noqa: E402
import torch  # noqa: E402

import certify as C  # noqa: E402
import mmrprune  # noqa: E402
from mmrprune import dispatch  # noqa: E402
from mmrprune import reference as R  # noqa: E402

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
FATAL = ("CUDA error", "illegal memory access", "device-side assert", "unspecified launch failure")
MAX_FAILURES = 40


@dataclass
class Problem:
    """A padded batch ``x [B, N, D]`` (float64, rows past ``lengths[b]`` are padding)."""
    name: str
    x: np.ndarray
    w: Optional[np.ndarray]
    lengths: list
    k: int
    lam: float = 0.5
    method: Optional[str] = None   # the fuzz problems bring their own method
    dtypes: Optional[tuple] = None  # None: every dtype
    # round counts must equal the reference's; off for the fuzz problems, whose exact ties
    # (duplicates, sim == m) a float32 round check may break either way without changing a pick
    exact_rounds: bool = True


def real_problem() -> Problem:
    from mmrprune.data import load_dinov2
    d = load_dinov2()
    n, dim = TARGET.size(1024, 20), TARGET.size(384, 32)
    lengths = [n, TARGET.size(700, 13), 0, 1]
    x = d["tokens"][:len(lengths), :n, :dim].astype(np.float64)
    w = d["cls_attention"][:len(lengths), :n].astype(np.float64)
    return Problem("real", x, w, lengths, k=TARGET.size(64, 4))


def gaussian_problems() -> list:
    # N, D and k multiples of 16, like the real tokens': Triton compiles a kernel per class of its
    # integer arguments (1, multiple of 16, other), so these reuse the real tokens' kernels
    out = []
    n, dim = TARGET.size(208, 16), TARGET.size(48, 8)
    for seed in range(TARGET.size(2, 1)):
        x = C.gaussian_tokens(n, dim, batch=3, seed=seed)
        w = C.distinct_importance(n, batch=3, seed=seed)
        out.append(Problem(f"gaussian{seed}", x, w, [n, n // 2, 1], k=TARGET.size(32, 4)))
    return out


def fuzz_problems() -> list:
    from test_fuzz import _problem
    out = []
    for seed in range(TARGET.size(48, 3)):
        x, w, lengths, method, lam, k = _problem(seed)
        # the integer palettes are exact in every dtype: cycle them over the seeds
        out.append(Problem(f"fuzz{seed}", x, w, [int(v) for v in lengths], k, lam, method,
                           dtypes=(DTYPES[seed % len(DTYPES)],), exact_rounds=False))
    return out


class Smoke:
    def __init__(self, out_path: str, budget_s: float):
        self.out_path, self.budget_s = out_path, budget_s
        self.start = time.perf_counter()
        self.counts = {}            # group -> check name -> count
        self.failures = []
        self.cases = {"run": 0, "skipped_for_budget": 0}
        self.complete = True
        self.aborted = None
        self._refs = {}

    # ------------------------------------------------------------------ bookkeeping
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def out_of_time(self) -> bool:
        return self.elapsed() > self.budget_s

    def count(self, group: str, what: str, n: int = 1) -> None:
        g = self.counts.setdefault(group, {})
        g[what] = g.get(what, 0) + n

    def fail(self, group: str, where: dict, exc: BaseException) -> None:
        msg = f"{type(exc).__name__}: {exc}"
        self.count(group, "failed")
        if len(self.failures) < MAX_FAILURES:
            self.failures.append({"group": group, **where, "error": msg[:800]})
        if any(s in msg for s in FATAL):
            self.aborted = f"stopped after a CUDA error (the context is unusable): {msg[:300]}"

    def save(self) -> None:
        write_json(self.out_path, {
            "target": TARGET.name, "device": TARGET.device_name(), "backends": list(TARGET.backends),
            "complete": self.complete and self.aborted is None, "aborted": self.aborted,
            "budget_s": self.budget_s, "seconds": round(self.elapsed(), 2), "cases": self.cases,
            "checks": self.counts, "failures": self.failures,
            "passed": not self.failures and self.aborted is None})

    # ------------------------------------------------------------------ reference facts
    def reference(self, problem: Problem, b: int, method: str, x64, w64, kb: int, rounds_limit: int):
        # keyed by the values the backend saw: float16 tokens cast to float32 share their reference
        digest = hashlib.blake2b(x64.tobytes() + (b"" if w64 is None else w64.tobytes()), digest_size=16).digest()
        key = (problem.name, b, method, rounds_limit, digest)
        if key not in self._refs:
            margin = C.reference_margin(x64, w64, kb, method, lam=problem.lam)
            order = R.select_one(x64, w64, kb, method, problem.lam)
            rounds = None
            if method in R.ROUND_METHODS:
                r_order, rounds = R.select_rounds(x64, w64, kb, method, problem.lam, rounds_limit)
                assert np.array_equal(r_order, order), "select_rounds and select_one disagree"
            self._refs[key] = (margin, order, rounds)
        return self._refs[key]

    # ------------------------------------------------------------------ one call of one backend
    def check_case(self, group: str, problem: Problem, backend: str, mode: str, dtype, method: str) -> None:
        where = {"problem": problem.name, "backend": backend, "mode": mode, "dtype": str(dtype).replace("torch.", ""),
                 "method": method}
        dev = TARGET.device
        lengths = problem.lengths
        xt = torch.from_numpy(problem.x).to(dtype)
        wt = None if problem.w is None else torch.from_numpy(problem.w).to(torch.float32)
        kw = {"lam": problem.lam} if method in R.LAM_METHODS else {}
        kw.update(tuning(mode, backend))
        try:
            out, stats = mmrprune.select(xt.to(dev), None if wt is None else wt.to(dev), k=problem.k, method=method,
                                         lengths=torch.tensor(lengths, device=dev), backend=backend,
                                         order="selection", return_stats=True, **kw)
            segs = [xt[b, :n] for b, n in enumerate(lengths)]
            cu = torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), device=dev)
            packed_w = None if wt is None else torch.cat([wt[b, :n] for b, n in enumerate(lengths)]).to(dev)
            flat, cu_k = mmrprune.select_varlen(torch.cat(segs).to(dev), packed_w, cu, k=problem.k, method=method,
                                                backend=backend, order="selection", **kw)
            TARGET.synchronize()
        except Exception as exc:  # a crash or a bad argument path is a finding, never a traceback
            self.fail(group, where, exc)
            return
        out, flat, cu_k, cu = out.cpu().numpy(), flat.cpu().numpy(), cu_k.cpu().numpy(), cu.cpu().numpy()
        rounds = stats.get("rounds")
        rounds = None if rounds is None else rounds.cpu().numpy()
        tol = C.tol_for(dtype)
        limit = max_round(backend)
        for b, n in enumerate(lengths):
            at = dict(where, image=b)
            try:
                kb = min(problem.k, n)
                picks = out[b]
                assert (picks[kb:] == -1).all() and (picks[:kb] >= 0).all(), \
                    f"expected {kb} picks then -1 padding, got {picks.tolist()}"
                packed = flat[cu_k[b]:cu_k[b + 1]] - cu[b]
                assert np.array_equal(packed, picks[:kb]), \
                    f"select_varlen picked {packed.tolist()}, the padded call {picks[:kb].tolist()}"
                self.count(group, "varlen_equal")
                if kb == 0:
                    continue
                x64, w64 = C.to_f64(xt[b, :n]), None if wt is None else C.to_f64(wt[b, :n])
                margin, order, ref_rounds = self.reference(problem, b, method, x64, w64, kb, limit)
                if margin > tol:
                    assert np.array_equal(picks[:kb], order), \
                        f"margins {margin:.3g} > tol {tol:g} but picks {picks[:kb].tolist()} " \
                        f"!= reference {order.tolist()}"
                    self.count(group, "exact")
                else:
                    C.check_certificate(x64, w64, picks, method=method, lam=problem.lam, tol=tol, k=kb)
                    self.count(group, "certificate")
                if rounds is None:
                    continue
                if method == "dpp":
                    assert rounds[b] == kb, f"dpp reported {rounds[b]} rounds for {kb} picks"
                    self.count(group, "rounds_equal")
                elif not problem.exact_rounds:
                    assert 1 <= rounds[b] <= kb, f"{rounds[b]} rounds for {kb} picks"
                    self.count(group, "rounds_in_range")
                elif ref_rounds is not None and np.array_equal(picks[:kb], order):
                    assert rounds[b] == ref_rounds, \
                        f"{rounds[b]} rounds, reference.select_rounds (max_round {limit}) counts {ref_rounds}"
                    self.count(group, "rounds_equal")
                else:
                    self.count(group, "rounds_not_comparable")   # picks differ within the certificate
            except AssertionError as exc:
                self.fail(group, at, exc)

    def run_group(self, group: str, problems: list) -> None:
        t0 = time.perf_counter()
        for problem in problems:
            for backend in TARGET.backends:
                methods = kernel_methods(backend)
                if problem.method is not None:
                    if problem.method not in methods:
                        continue
                    methods = (problem.method,)
                for mode in MODES:
                    for i, method in enumerate(methods):
                        for dtype in self.dtypes(problem, backend, i):
                            if self.aborted:
                                return
                            if self.out_of_time():
                                self.complete = False
                                self.cases["skipped_for_budget"] += 1
                                continue
                            self.check_case(group, problem, backend, mode, dtype, method)
                            self.cases["run"] += 1
        print(f"[smoke] {group}: {self.counts.get(group, {})} in {time.perf_counter() - t0:.1f} s", flush=True)
        self.save()

    @staticmethod
    def dtypes(problem: Problem, backend: str, method_index: int) -> tuple:
        if problem.dtypes is not None:
            return problem.dtypes if backend != "triton" else (torch.float32,)  # Triton: JIT compiles per dtype
        if TARGET.dry_run:   # the interpreter is slow: one dtype per method, every dtype over the methods
            return (DTYPES[method_index % len(DTYPES)],)
        return DTYPES

    # ------------------------------------------------------------------ CUDA-graph capture
    def graph_group(self) -> None:
        """``select(check_finite=False)`` of each kernel backend, captured in a CUDA graph: the
        replay gives the eager picks, and after new values are copied into the captured inputs
        a second replay gives the new values' eager picks (nothing read from the data at
        capture time is baked in).  The dry run cannot capture CPU tensors: it runs the call a
        capture would record with the host path the GPU takes (host_ops.accelerator_host_path)
        and checks it makes no host sync, which is what a capture refuses, and that it gives
        the eager picks."""
        dev = TARGET.device
        g = torch.Generator().manual_seed(0)
        b, n, dim, k = 2, TARGET.size(256, 16), TARGET.size(128, 8), TARGET.size(16, 4)
        data = [(torch.randn(b, n, dim, generator=g).to(dev, torch.bfloat16), torch.rand(b, n, generator=g).to(dev))
                for _ in range(2)]
        for backend in TARGET.backends:
            for mode in MODES:
                for method in kernel_methods(backend):
                    where = {"group": "graph", "backend": backend, "mode": mode, "dtype": "bfloat16",
                             "method": method}
                    kw = dict(k=k, method=method, backend=backend, order="selection", check_finite=False,
                              **tuning(mode, backend))
                    if method in R.LAM_METHODS:
                        kw["lam"] = 0.5
                    try:
                        eager = [mmrprune.select(x, w, **kw) for x, w in data]
                        if TARGET.dry_run:
                            self._graph_dry(data[0], kw, eager[0])
                        else:
                            self._graph_capture(data, kw, eager)
                    except Exception as exc:
                        self.fail("graph", where, exc)
                    self.cases["run"] += 1
        print(f"[smoke] graph: {self.counts.get('graph', {})}", flush=True)
        self.save()

    def _graph_capture(self, data, kw, eager) -> None:
        (x0, w0), (x1, w1) = data
        x, w = x0.clone(), w0.clone()                           # the graph's static inputs
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            mmrprune.select(x, w, **kw)                         # warm-up (JIT, caches) outside the capture
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = mmrprune.select(x, w, **kw)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, eager[0]), f"replayed {out.tolist()} != eager {eager[0].tolist()}"
        x.copy_(x1)
        w.copy_(w1)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, eager[1]), \
            f"replayed on new inputs {out.tolist()} != their eager picks {eager[1].tolist()}"
        self.count("graph", "captured_and_replayed")

    def _graph_dry(self, data, kw, eager) -> None:
        import collections

        from host_ops import OpCounter, accelerator_host_path
        x, w = data
        read_backs = collections.Counter()
        with accelerator_host_path(read_backs), OpCounter() as ops:
            again = mmrprune.select(x, w, **kw)
        syncs = ops.syncs() + read_backs["read_back"]
        assert syncs == 0, f"{syncs} host sync(s) (read-backs {read_backs['read_back']}): a capture would refuse " \
                           f"the call; ops {dict(ops.ops)}"
        assert torch.equal(again, eager), f"{again.tolist()} != eager {eager.tolist()}"
        self.count("graph", "no_sync_eager_equal")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="JSON result file")
    p.add_argument("--budget-s", type=float, default=75.0, help="stop starting new cases after this long")
    p.add_argument("--dry-run", action="store_true", help="CPU: cuda_emu and the Triton interpreter, tiny shapes")
    args = p.parse_args(argv)
    for backend in TARGET.backends:
        ok, why = dispatch.status(backend)
        if not ok:
            raise SystemExit(f"smoke: backend {backend!r} is not available: {why}")
    smoke = Smoke(args.out, args.budget_s)
    smoke.save()
    smoke.run_group("real", [real_problem()])
    smoke.run_group("gaussian", gaussian_problems())
    smoke.run_group("fuzz", fuzz_problems())
    smoke.graph_group()   # last: a capture that fails can leave the CUDA context unusable
    smoke.save()
    state = "complete" if smoke.complete else f"INCOMPLETE (budget {args.budget_s:g} s reached)"
    print(f"[smoke] {smoke.cases['run']} cases, {len(smoke.failures)} failure(s) recorded, {state}, "
          f"{smoke.elapsed():.1f} s", flush=True)
    for f in smoke.failures[:10]:
        print(f"[smoke] FAILED {f}", flush=True)
    return 1 if smoke.failures or smoke.aborted else 0


if __name__ == "__main__":
    raise SystemExit(main())
