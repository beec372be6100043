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
* The cluster paths (greedy_maxsim_gram_cluster_kernel and greedy_dpp_gram_cluster_kernel,
  several CTAs per image): the harness forces a cluster size (MaxSimState::cluster,
  DppState::cluster) at small N; the picks (and the maxsim rounds) must equal the one-block
  kernel's exactly, on fuzzed batches and the bundled real tokens.
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

# (name, method, sim, dtype, dim, x_offset, smem_state[, cluster]): small, but every kernel and
# variant; cluster (MaxSimState::cluster) forces the cluster kernel with that many CTAs per image
CASES = [
    ("mmr-row-f32", "mmr", "rows", torch.float32, 64, 0, -1),
    ("fps-row-f32-misaligned", "fps", "rows", torch.float32, 70, 4, -1),
    ("dpp-row-bf16", "dpp", "rows", torch.bfloat16, 40, 0, -1),
    ("divprune-gram-bf16-smem", "divprune", "gram", torch.bfloat16, 48, 0, -1),
    ("hybrid-gram-f16-global", "hybrid", "gram", torch.float16, 48, 0, 0),
    ("dpp-gram-f32", "dpp", "gram", torch.float32, 32, 0, -1),
    ("mmr-gram-cluster3-f32", "mmr", "gram", torch.float32, 48, 0, -1, 3),
    ("hybrid-gram-cluster2-bf16", "hybrid", "gram", torch.bfloat16, 48, 0, -1, 2),
    ("dpp-gram-cluster3-f32", "dpp", "gram", torch.float32, 32, 0, -1, 3),
    # the prepare kernel (csrc/cuda/prepare.cu) first, on the raw weights, as the op runs it
    ("hybrid-gram-prepare-bf16", "hybrid", "gram", torch.bfloat16, 48, 0, -1),
    ("divprune-gram-prepare-f32", "divprune", "gram", torch.float32, 48, 0, -1),
    ("dpp-gram-prepare-f16", "dpp", "gram", torch.float16, 32, 0, -1),
    ("mmr-row-prepare-f32", "mmr", "rows", torch.float32, 64, 0, -1),
    ("topk-gram-prepare-f32", "topk", "gram", torch.float32, 32, 0, -1),
]
# the cases whose harness run starts with the prepare kernel (every score kind it computes)
PREPARE_CASES = ["hybrid-gram-prepare-bf16", "divprune-gram-prepare-f32", "dpp-gram-prepare-f16",
                 "mmr-row-prepare-f32", "topk-gram-prepare-f32"]
# TSan runs the Gram-mode kernels (whose token state is thread-private by ownership, no barrier)
# and one row-mode kernel: a row-mode case with 1024 fibers costs 20-45 s under TSan here.
TSAN_CASES = ["mmr-row-f32", "divprune-gram-bf16-smem", "hybrid-gram-f16-global", "dpp-gram-f32",
              "mmr-gram-cluster3-f32", "hybrid-gram-cluster2-bf16", "dpp-gram-cluster3-f32",
              "hybrid-gram-prepare-bf16", "divprune-gram-prepare-f32", "dpp-gram-prepare-f16", "topk-gram-prepare-f32"]
CLUSTER_CASES = ["mmr-gram-cluster3-f32", "hybrid-gram-cluster2-bf16"]
DPP_CLUSTER_CASES = ["dpp-gram-cluster3-f32"]
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
        "fails = !(__fmul_rn(__ldg(gram_b + static_cast<std::int64_t>(cl) * ld + c) * inv_b[cl], inv_b[c]) <= m_of(j, c));",
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
    # the cluster kernel without its one cluster barrier per round: CTAs read the others' lists
    # before they are written
    "cluster_no_round_barrier": ("    cluster.sync();  // the round's one cluster barrier: every CTA's list is published\n", "\n",
                                 None, CLUSTER_CASES),
    # every lane of warp 0 reads its own CTA's list instead of CTA `lane`'s (a wrong DSMEM rank)
    "cluster_wrong_dsmem_rank": ("const int src = lane < csize ? lane : rank;", "const int src = rank;", None,
                                 CLUSTER_CASES),
    # a CTA exits while the others may still read its last round's list
    "cluster_no_exit_barrier": ("  cluster.sync();  // no CTA exits (freeing its shared memory)", "  //", None,
                                CLUSTER_CASES),
    # the DPP cluster kernel: no cluster barrier between publishing a CTA's (gain, index) and the
    # others' reads of it
    "dpp_cluster_no_step_barrier": (
        "    cluster.sync();  // the step's one cluster barrier: every CTA's slot is published\n", "\n", None,
        DPP_CLUSTER_CASES),
    # every lane reads its own CTA's slot instead of CTA `lane`'s (a wrong DSMEM rank)
    "dpp_cluster_wrong_slot_rank": ("      s2 = *cluster.map_shared_rank(&xch_s[par], lane);\n      i2 = *cluster.map_shared_rank(&xch_i[par], lane);",
                                    "      s2 = *cluster.map_shared_rank(&xch_s[par], rank);\n      i2 = *cluster.map_shared_rank(&xch_i[par], rank);",
                                    None, DPP_CLUSTER_CASES),
    # the pick's Cholesky row staged from this CTA's shared memory instead of its owner's
    "dpp_cluster_wrong_row_owner": ("const int owner = p / per;", "const int owner = rank;", None, DPP_CLUSTER_CASES),
    # a CTA exits while the others may still read its slot or its Cholesky rows
    "dpp_cluster_no_exit_barrier": ("  cluster.sync();  // this CTA's slots and rows stay alive", "  //", None,
                                    DPP_CLUSTER_CASES),
    # prepare.cu: the ranking (hybrid's pool, topk) reads scores before the other threads wrote them
    "prepare_no_barrier_before_ranking": ("  __syncthreads();   // the ranking below reads scores other threads wrote\n",
                                          "\n", "tsan", ["hybrid-gram-prepare-bf16", "topk-gram-prepare-f32"],
                                          emu_build.PREPARE_CU),
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
    for name, method, sim, dtype, dim, offset, smem_state, *cluster in CASES:
        batch, x, w = _batch(method, dtype, dim)
        emu_build.write_case(str(root / name), cb.prepare(batch, sim), x_offset=offset,
                             smem_state=smem_state, kernel_prepare=name in PREPARE_CASES)
        if cluster:
            _set_cluster(str(root / name), cluster[0])
        out[name] = (str(root / name), method, x, w)
    return out


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    """Every harness variant, built in parallel once: the unmodified source under both sanitizers,
    and each mutant (under the sanitizer that its bug needs)."""
    root = tmp_path_factory.mktemp("emu_builds")
    specs = {san: (str(root / san), emu_build.GREEDY_CU, san) for san in ("asan", "tsan")}
    for name, (anchor, repl, san, _, *target) in MUTATIONS.items():
        path = target[0] if target else emu_build.GREEDY_CU
        with open(path) as f:
            original = f.read()
        src = root / f"{name}.cu"
        # a missing anchor means the source changed: the mutation must be updated, never skipped
        assert original.count(anchor) == 1, f"mutation {name}: anchor not found exactly once in {path}"
        src.write_text(original.replace(anchor, repl))
        specs[name] = ((str(root / f"build_{name}"), str(src), san) if not target else
                       (str(root / f"build_{name}"), emu_build.GREEDY_CU, san, str(src)))
    return emu_build.build_many(specs)


def _set_cluster(case_dir, size):
    """MaxSimState::cluster of a case (harness.cpp): 1 one block per image, n >= 2 a cluster of n."""
    path = os.path.join(case_dir, "args.txt")
    with open(path) as f:
        lines = [line for line in f if not line.startswith("cluster ")]
    with open(path, "w") as f:
        f.write("".join(lines) + f"cluster {size}\n")


def _run_sized(exe, case_dir, size, env=None):
    """(process, picks, rounds) of the case with cluster size `size`."""
    _set_cluster(case_dir, size)
    proc, picks = emu_build.run_case(exe, case_dir, env=env)
    path = os.path.join(case_dir, "rounds.bin")   # maxsim only (DPP: one pick per step)
    rounds = np.fromfile(path, dtype=np.int64) if picks is not None and _kind(case_dir) == "maxsim" else None
    return proc, picks, rounds


def _kind(case_dir):
    with open(os.path.join(case_dir, "args.txt")) as f:
        return dict(line.split() for line in f)["kind"]


def _exe(builds, name):
    exe = builds[name]
    if isinstance(exe, Exception):
        raise exe
    return exe


def _verdict(exe, case):
    """None when the run is clean and every image's picks pass the certificate, else why not.
    A cluster case must also give exactly the one-block kernel's picks and rounds."""
    case_dir, method, x, w = case
    with open(os.path.join(case_dir, "args.txt")) as f:
        cluster = int(dict(line.split() for line in f).get("cluster", 0))
    proc, picks = emu_build.run_case(exe, case_dir)
    report = next((r for r in SANITIZER_REPORTS if r in proc.stderr), None)
    if proc.returncode != 0 or report:
        return f"exit {proc.returncode}, {report or 'no sanitizer report'}: {proc.stderr[-2000:]}"
    if cluster >= 2:
        rounds = np.fromfile(os.path.join(case_dir, "rounds.bin"), dtype=np.int64) if method != "dpp" else None
        one_proc, one_picks, one_rounds = _run_sized(exe, case_dir, 1)
        _set_cluster(case_dir, cluster)
        assert one_proc.returncode == 0, one_proc.stderr[-2000:]
        if not (np.array_equal(picks, one_picks) and (rounds is None or np.array_equal(rounds, one_rounds))):
            return f"cluster of {cluster}: picks {picks.tolist()} rounds {rounds}, one block: " \
                   f"{one_picks.tolist()} rounds {one_rounds}"
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
        kinds.add((kv["kind"], kv["mode"], kv["smem_state"] if kv["mode"] == "gram" and kv["kind"] == "maxsim" else "",
                   "cluster" if int(kv.get("cluster", 0)) >= 2 else ""))
        assert np.fromfile(os.path.join(path, "starts.bin"), dtype=np.int64).size == len(LENGTHS)
    assert kinds == {("maxsim", "row", "", ""), ("dpp", "row", "", ""), ("maxsim", "gram", "-1", ""),
                     ("maxsim", "gram", "0", ""), ("dpp", "gram", "", ""), ("maxsim", "gram", "-1", "cluster"),
                     ("dpp", "gram", "", "cluster")}


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
    # interval 1: 5 butterfly levels (10 shuffles) in both warps, thread 5 loads 4 times from 2
    # sites (the first load and the loop's);
    # interval 2: warp 0's three same-pattern broadcasts (1 level) + xor 1 (1 level), 4 shuffles;
    # interval 3: xor 1 again: a new level, the barrier cut the run
    want = {"barriers": 2, "shfl_path": 5 + 2 + 1, "shfl_ops_path": 10 + 4 + 1, "shfl_ops": 2 * 10 + 4 + 1,
            "ldg_path": 4, "ldg_total": 64 + 3, "ldg_site_path": 2, "cluster_barriers": 0}
    assert launch["blocks"] == [want, want]


# ----------------------------------------------------------------------------- the cluster path
def _cluster_case(root, name, x, w, method, k, lengths=None):
    req = validate(x, w, k=k, keep_ratio=None, lam=0.5, method=method, lengths=lengths, method_params={})
    case_dir = str(root / name)
    emu_build.write_case(case_dir, cb.prepare(req.batch, "gram"))
    return case_dir


def _same_as_one_block(exe, case_dir, sizes, schedules=("linear",)):
    _, want, want_rounds = _run_sized(exe, case_dir, 1)
    assert want is not None
    for size in sizes:
        for sched in schedules:
            proc, got, rounds = _run_sized(exe, case_dir, size, env={"CUDA_EMU_SCHED": sched})
            assert proc.returncode == 0, proc.stderr[-2000:]
            np.testing.assert_array_equal(got, want, err_msg=f"cluster {size}, {sched}")
            if want_rounds is not None:
                np.testing.assert_array_equal(rounds, want_rounds, err_msg=f"cluster {size}, {sched}")
    return want


@pytest.fixture(scope="module")
def plain_harness(tmp_path_factory):
    return emu_build.build(str(tmp_path_factory.mktemp("emu_plain")))


@pytest.mark.parametrize("seed", range(4))
def test_cluster_fuzz_matches_one_block(plain_harness, tmp_path, seed):
    """Seeded fuzz: random lengths, budgets, methods and cluster sizes (2..16, the non-portable
    16 included); exactly the one-block kernel's picks and rounds, and the step certificate."""
    rng = np.random.default_rng(100 + seed)
    method = ["mmr", "fps", "hybrid", "divprune"][seed % 4]
    n = int(rng.integers(40, 200))
    lengths = [n, int(rng.integers(1, n + 1)), int(rng.integers(1, n + 1))]
    k = int(rng.integers(1, 40))
    x = torch.from_numpy(certify.clustered_tokens(n, 32, batch=3, seed=seed)).to(torch.bfloat16)
    w = torch.from_numpy(certify.distinct_importance(n, batch=3, seed=seed)).float()
    case_dir = _cluster_case(tmp_path, "fuzz", x, w, method, k, torch.tensor(lengths))
    sizes = sorted({2, int(rng.integers(3, 9)), 16})
    picks = _same_as_one_block(plain_harness, case_dir, sizes, schedules=("linear", f"random:{seed}"))
    for b, nb in enumerate(lengths):
        certify.check_certificate(x[b, :nb], w[b, :nb], picks[b][:min(k, nb)],
                                  method=method, lam=0.5, tol=certify.tol_for(x.dtype), k=min(k, nb))


def test_cluster_real_tokens_match_one_block(plain_harness, tmp_path, dinov2):
    """Two bundled DINOv2 images (1024 tokens each), keep 25%: the cluster of 4 and of 16 CTAs
    gives the one-block kernel's picks and rounds, and they agree with the float64 reference."""
    feats = torch.from_numpy(dinov2["tokens"][[0, 5]]).float()
    imp = torch.from_numpy(dinov2["cls_attention"][[0, 5]])
    case_dir = _cluster_case(tmp_path, "real", feats, imp, "mmr", 256)
    picks = _same_as_one_block(plain_harness, case_dir, [4, 16])
    for b in range(2):
        certify.check_certificate(certify.to_f64(feats[b]), certify.to_f64(imp[b]), picks[b], "mmr", 0.5,
                                  tol=certify.tol_for(feats.dtype), k=256)


def test_cluster_counts_one_cluster_barrier_per_round(plain_harness, case_dirs, tmp_path):
    """The emulator's counters of the cluster launch: grid = images x cluster size, cluster
    dimension as asked, one cluster barrier per round plus the exit barrier, two block barriers
    per round; an A100-class device (compute capability 8) keeps one block per image."""
    import json
    case_dir = case_dirs["mmr-gram-cluster3-f32"][0]
    counts = tmp_path / "counts.jsonl"
    proc, _, rounds = _run_sized(plain_harness, case_dir, 3, env={"CUDA_EMU_COUNTS": str(counts)})
    assert proc.returncode == 0, proc.stderr
    (launch,) = [json.loads(line) for line in counts.read_text().splitlines()]
    assert launch["cluster"] == [3, 1, 1] and launch["grid"] == [3 * len(LENGTHS), 1, 1]
    for b, r in enumerate(rounds.tolist()):
        for rank in range(3):
            blk = launch["blocks"][3 * b + rank]
            assert blk["cluster_barriers"] == r + 1 and blk["barriers"] == 2 * r, (b, rank, blk, r)
    counts.unlink()
    proc, _, _ = _run_sized(plain_harness, case_dir, 3, env={"CUDA_EMU_COUNTS": str(counts), "CUDA_EMU_CC_MAJOR": "8"})
    assert proc.returncode == 0, proc.stderr
    (launch,) = [json.loads(line) for line in counts.read_text().splitlines()]
    assert launch["cluster"] == [1, 1, 1] and launch["grid"] == [len(LENGTHS), 1, 1]


# ----------------------------------------------------------------------------- the DPP cluster path
@pytest.mark.parametrize("seed", range(3))
def test_dpp_cluster_fuzz_matches_one_block(plain_harness, tmp_path, seed):
    """Seeded fuzz of the DPP cluster kernel: random lengths, budgets past the features' rank in
    some images (the rank-exhausted switch, one more exchange) and cluster sizes 2..16; exactly
    the one-block kernel's picks, on two schedules, and the step certificate."""
    rng = np.random.default_rng(200 + seed)
    n, d = int(rng.integers(40, 140)), int(rng.integers(8, 25))
    lengths = [n, int(rng.integers(1, n + 1)), int(rng.integers(1, n + 1))]
    k = int(rng.integers(d // 2, min(n, 2 * d) + 1))
    x = torch.from_numpy(certify.clustered_tokens(n, d, batch=3, seed=seed)).to(torch.bfloat16)
    w = torch.from_numpy(certify.distinct_importance(n, batch=3, seed=seed)).float()
    case_dir = _cluster_case(tmp_path, "dppfuzz", x, w, "dpp", k, torch.tensor(lengths))
    sizes = sorted({2, int(rng.integers(3, 9)), 16})
    picks = _same_as_one_block(plain_harness, case_dir, sizes, schedules=("linear", f"random:{seed}"))
    for b, nb in enumerate(lengths):
        certify.check_certificate(x[b, :nb], w[b, :nb], picks[b][:min(k, nb)],
                                  method="dpp", lam=0.5, tol=certify.tol_for(x.dtype), k=min(k, nb))


def test_dpp_cluster_real_tokens_match_one_block(plain_harness, tmp_path, dinov2):
    """A bundled DINOv2 image (1024 tokens), k = 128: clusters of 4 CTAs (the Cholesky rows in each
    CTA's shared memory) and 16 give the one-block kernel's picks, which pass the certificate."""
    feats = torch.from_numpy(dinov2["tokens"][[3]]).float()
    imp = torch.from_numpy(dinov2["cls_attention"][[3]])
    case_dir = _cluster_case(tmp_path, "dppreal", feats, imp, "dpp", 128)
    picks = _same_as_one_block(plain_harness, case_dir, [4, 16])
    certify.check_certificate(certify.to_f64(feats[0]), certify.to_f64(imp[0]), picks[0], "dpp", 0.5,
                              tol=certify.tol_for(feats.dtype), k=128)


def test_dpp_cluster_counts_one_cluster_barrier_per_step(plain_harness, case_dirs, tmp_path):
    """The DPP cluster launch: grid = images x cluster size; per CTA one cluster barrier per pick
    (the first pick's exchange and one after each later step's update) plus the exit barrier, and
    three block barriers per step (the block argmax's two, the staged row's one)."""
    import json
    case_dir = case_dirs["dpp-gram-cluster3-f32"][0]
    counts = tmp_path / "counts.jsonl"
    proc, _, _ = _run_sized(plain_harness, case_dir, 3, env={"CUDA_EMU_COUNTS": str(counts)})
    assert proc.returncode == 0, proc.stderr
    (launch,) = [json.loads(line) for line in counts.read_text().splitlines()]
    assert launch["cluster"] == [3, 1, 1] and launch["grid"] == [3 * len(LENGTHS), 1, 1]
    for b, n in enumerate(LENGTHS):
        kb = min(K, n)
        for rank in range(3):
            blk = launch["blocks"][3 * b + rank]
            assert blk["cluster_barriers"] == kb + 1 and blk["barriers"] == 2 + 3 * (kb - 1), (b, rank, blk, kb)
