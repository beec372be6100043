"""The emulated kernels under AddressSanitizer+UBSan and ThreadSanitizer, and the mutation test.

The native harness (tests/emu/harness.cpp) is linked with csrc/cuda/greedy.cu built for the
emulator (tests/emu_build.py, flags from csrc/build_flags.py) and runs launches that Python
prepared with ``cuda_backend.prepare``; the picks are checked with the step certificate.

* ``asan`` (ASan + UBSan) builds of the unmodified source run every case clean, ``tsan``
  builds the Gram-mode cases and one row-mode case.
  Under TSan every CUDA thread is a fiber and only barriers order memory, so two threads
  touching one word between two barriers (one writing) is a reported race.
* Mutation test: known-bad edits to a copy of greedy.cu must each be caught, by an emulator
  abort, a sanitizer report or wrong picks.  This is what shows the harness can fail.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

import certify
import emu_build
from mmrprune.backends import cuda_backend as cb
from mmrprune.validation import validate

pytestmark = pytest.mark.skipif(emu_build.flags.cuda_include_dir() is None,
                                reason="needs the CUDA headers (nvcc's include/ dir, or CUDA_HOME): "
                                       "install the CUDA toolkit; no GPU needed")

# (name, method, sim, dtype, dim, x_offset, smem_state): small, but every kernel and variant
CASES = [
    ("mmr-row-f32", "mmr", "rows", torch.float32, 64, 0, -1),
    ("fps-row-f32-misaligned", "fps", "rows", torch.float32, 70, 4, -1),
    ("dpp-row-bf16", "dpp", "rows", torch.bfloat16, 40, 0, -1),
    ("divprune-gram-bf16-smem", "divprune", "gram", torch.bfloat16, 48, 0, -1),
    ("hybrid-gram-f16-global", "hybrid", "gram", torch.float16, 48, 0, 0),
    ("dpp-gram-f32", "dpp", "gram", torch.float32, 32, 0, -1),
]
# TSan runs the Gram-mode kernels (whose token state is thread-private by ownership, no barrier)
# and one row-mode kernel: a row-mode case with 1024 fibers costs 20-45 s under TSan here.
TSAN_CASES = ["mmr-row-f32", "divprune-gram-bf16-smem", "hybrid-gram-f16-global", "dpp-gram-f32"]
LENGTHS = [70, 23, 1]
K = 9

# name: (anchor text in greedy.cu, replacement, sanitizer build, cases it runs)
MUTATIONS = {
    # the barrier that publishes a round's staged candidate rows before the warps' pair checks read them
    "drop_syncthreads": ("        __syncthreads();  // the staged rows xs[0..r) visible to the whole block\n", "\n",
                         None, ["mmr-row-f32", "fps-row-f32-misaligned"]),
    # a block barrier only lane 0 of each warp reaches (block_argmax: the DPP kernels)
    "barrier_under_lane_condition": ("    red_i[warp] = bi;\n  }\n  __syncthreads();\n",
                                     "    red_i[warp] = bi;\n    __syncthreads();\n  }\n", None,
                                     ["dpp-row-bf16"]),
    # a round commits its candidates without the check sim(c_j, c_l) <= m_{c_j} (Gram mode, row mode)
    "round_commit_unchecked_gram": (
        "fails = !(__fmul_rn(__ldg(gram_b + static_cast<std::int64_t>(cl) * ld + c) * inv_b[cl], inv_b[c]) <= m[c]);",
        "fails = false;", None, ["divprune-gram-bf16-smem", "hybrid-gram-f16-global"]),
    "round_commit_unchecked_row": ("if (lane == 0) pair_ok[q] = dot * inv_b[c] <= m[c] ? 1 : 0;",
                                   "if (lane == 0) pair_ok[q] = 1;", None, ["mmr-row-f32", "fps-row-f32-misaligned"]),
    # dynamic shared memory one float short of the row it holds
    "dynamic_smem_one_short": ("{ return dim * static_cast<std::int64_t>(sizeof(float)); }",
                               "{ return (dim - 1) * static_cast<std::int64_t>(sizeof(float)); }", "asan",
                               ["mmr-row-f32"]),
    # thread 0 marks the pick taken, while the owner thread reads that flag in the same interval
    "non_owner_writes_token_state": ("const int flag_writer = kGram ? p % nthreads : (p % nworkers) * 32;", "const int flag_writer = 0;", "tsan",
                                     ["divprune-gram-bf16-smem", "hybrid-gram-f16-global"]),
}
SANITIZER_REPORTS = ("ERROR: AddressSanitizer", "runtime error:", "WARNING: ThreadSanitizer")


def _batch(method, dtype, dim):
    x = torch.from_numpy(certify.clustered_tokens(LENGTHS[0], dim, batch=len(LENGTHS), seed=3)).to(dtype)
    w = torch.from_numpy(certify.distinct_importance(LENGTHS[0], batch=len(LENGTHS), seed=3)).float()
    req = validate(x, w, k=K, keep_ratio=None, lam=0.5, method=method, lengths=torch.tensor(LENGTHS),
                   method_params={})
    return req.batch, x, w


@pytest.fixture(scope="module")
def case_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("emu_cases")
    out = {}
    for name, method, sim, dtype, dim, offset, smem_state in CASES:
        batch, x, w = _batch(method, dtype, dim)
        emu_build.write_case(str(root / name), cb.prepare(batch, sim), x_offset=offset,
                             smem_state=smem_state)
        out[name] = (str(root / name), method, x, w)
    return out


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    """Every harness variant, built in parallel once: the unmodified source under both sanitizers,
    and each mutant (under the sanitizer that its bug needs)."""
    root = tmp_path_factory.mktemp("emu_builds")
    with open(emu_build.GREEDY_CU) as f:
        original = f.read()
    specs = {san: (str(root / san), emu_build.GREEDY_CU, san) for san in ("asan", "tsan")}
    for name, (anchor, repl, san, _) in MUTATIONS.items():
        src = root / f"{name}.cu"
        # a missing anchor means greedy.cu changed: the mutation must be updated, never skipped
        assert original.count(anchor) == 1, f"mutation {name}: anchor not found exactly once in greedy.cu"
        src.write_text(original.replace(anchor, repl))
        specs[name] = (str(root / f"build_{name}"), str(src), san)
    return emu_build.build_many(specs)


def _exe(builds, name):
    exe = builds[name]
    if isinstance(exe, Exception):
        raise exe
    return exe


def _verdict(exe, case):
    """None when the run is clean and every image's picks pass the certificate, else why not."""
    case_dir, method, x, w = case
    proc, picks = emu_build.run_case(exe, case_dir)
    report = next((r for r in SANITIZER_REPORTS if r in proc.stderr), None)
    if proc.returncode != 0 or report:
        return f"exit {proc.returncode}, {report or 'no sanitizer report'}: {proc.stderr[-2000:]}"
    for b, n in enumerate(LENGTHS):
        try:
            certify.check_certificate(x[b, :n], w[b, :n], picks[b], method=method, lam=0.5,
                                      tol=certify.tol_for(x.dtype), k=min(K, n))
        except AssertionError as exc:
            return f"image {b}: wrong picks: {exc}"
    return None


@pytest.mark.parametrize("sanitizer", ["asan", "tsan"])
def test_unmodified_kernels_are_sanitizer_clean(builds, case_dirs, sanitizer):
    exe = _exe(builds, sanitizer)
    for name in case_dirs if sanitizer == "asan" else TSAN_CASES:
        verdict = _verdict(exe, case_dirs[name])
        assert verdict is None, f"{sanitizer} {name}: {verdict}"


@pytest.mark.parametrize("mutation", sorted(MUTATIONS))
def test_mutation_is_caught(builds, case_dirs, mutation):
    exe = _exe(builds, mutation)
    verdicts = {name: _verdict(exe, case_dirs[name]) for name in MUTATIONS[mutation][3]}
    assert any(v is not None for v in verdicts.values()), f"mutation {mutation} was not caught: {verdicts}"
    for name, v in verdicts.items():
        print(f"{mutation} on {name}: {v and v[:300]}")


def test_harness_reports_launcher_errors(builds, case_dirs, tmp_path):
    """An over-limit launch comes back as the launcher's error (exit 3), not as a crash."""
    exe = _exe(builds, "asan")
    proc, _ = emu_build.run_case(exe, case_dirs["mmr-row-f32"][0], env={"CUDA_EMU_SMEM_OPTIN": "200"})
    assert proc.returncode == 3 and "feature dim too large" in proc.stderr, proc.stderr


def test_cases_cover_every_kernel_variant(case_dirs):
    kinds = set()
    for path, *_ in case_dirs.values():
        with open(os.path.join(path, "args.txt")) as f:
            kv = dict(line.split() for line in f)
        kinds.add((kv["kind"], kv["mode"], kv["smem_state"] if kv["mode"] == "gram" and kv["kind"] == "maxsim" else ""))
        assert np.fromfile(os.path.join(path, "starts.bin"), dtype=np.int64).size == len(LENGTHS)
    assert kinds == {("maxsim", "row", ""), ("dpp", "row", ""), ("maxsim", "gram", "-1"), ("maxsim", "gram", "0"),
                     ("dpp", "gram", "")}


def test_emulator_counters(tmp_path):
    """The per-block counters (cuda_emu.h "Counters", read by bench/emu_counts.py) on a kernel
    whose barriers, shuffle levels and __ldg loads are known by construction."""
    import json
    obj = emu_build.compile_cu(os.path.join(emu_build.ROOT, "tests", "emu", "counters.cu"), str(tmp_path))
    exe = str(tmp_path / "counters")
    emu_build._run([emu_build.flags.cxx(), "-o", exe, obj])
    path = tmp_path / "counts.jsonl"
    import subprocess
    proc = subprocess.run([exe], capture_output=True, text=True, env=dict(os.environ, CUDA_EMU_COUNTS=str(path)))
    assert proc.returncode == 0, proc.stderr
    (launch,) = [json.loads(line) for line in path.read_text().splitlines()]
    assert launch["grid"] == [2, 1, 1] and launch["block"] == [64, 1, 1]
    # interval 1: 5 butterfly levels (10 shuffles) in both warps, thread 5 loads 4 times;
    # interval 2: warp 0's three same-pattern broadcasts (1 level) + xor 1 (1 level), 4 shuffles;
    # interval 3: xor 1 again: a new level, the barrier cut the run
    want = {"barriers": 2, "shfl_path": 5 + 2 + 1, "shfl_ops_path": 10 + 4 + 1, "shfl_ops": 2 * 10 + 4 + 1,
            "ldg_path": 4, "ldg_total": 64 + 3}
    assert launch["blocks"] == [want, want]
