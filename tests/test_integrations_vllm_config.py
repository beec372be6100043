"""MMRPRUNE_VLLM parsing and the plugin's off switch (no vLLM needed; the engine tests are in
tests/vllm_plugin and run in the venv of scripts/setup_vllm.sh)."""
import subprocess
import sys

import pytest

from mmrprune.integrations.vllm import ENV, PruneConfig, parse_config
from mmrprune.reference import budget


@pytest.mark.parametrize("text", [None, "", "  "])
def test_unset_or_blank_is_off(text):
    assert parse_config(text) is None


def test_full_config():
    c = parse_config(" k=64 , method=divprune,lam=0.25, importance=none,backend=torch")
    assert c == PruneConfig(k=64, keep_ratio=None, method="divprune", lam=0.25, importance=None, backend="torch")
    assert parse_config("keep_ratio=0.25") == PruneConfig(keep_ratio=0.25)       # defaults: mmr, 0.5, norm, auto


@pytest.mark.parametrize("text", ["k=8", "keep_ratio=0.3", "keep_ratio=0.01"])
def test_tokens_kept_is_the_selection_budget(text):
    c = parse_config(text)
    for n in (1, 2, 5, 8, 9, 20, 576, 1000):
        assert c.tokens_kept(n) == budget(n, c.k, c.keep_ratio)
    assert parse_config("k=8").tokens_kept(20) == 8 and parse_config("k=8").tokens_kept(5) == 5


@pytest.mark.parametrize("text, message", [
    ("k=0", "k: expected an int >= 1, got 0"),
    ("k=eight", "k: expected an int, got 'eight'"),
    ("k=8,keep_ratio=0.5", "exactly one of k or keep_ratio"),
    ("method=mmr", "exactly one of k or keep_ratio"),
    ("keep_ratio=1.5", "keep_ratio: expected a value in (0, 1]"),
    ("k=8,lam=2", "lam: expected a value in [0, 1]"),
    ("k=8,method=nope", "method: expected one of"),
    ("k=8,method=topk,importance=none", "method=topk ranks tokens by importance"),
    ("k=8,importance=text", "importance must be one of ['norm', 'none']"),
    ("k=8,backend=gpu", "backend must be 'auto' or one of"),
    ("k=8,ratio=0.5", "keys ['k', 'keep_ratio'"),
    ("k8", "key=value"),
    ("k=8,k=9", "k given twice"),
    ("k=8,method=d2pruner", "d2pruner with alpha < 1 needs the patch grid"),
])
def test_bad_config_names_the_variable_and_the_problem(text, message):
    with pytest.raises(ValueError) as exc:
        parse_config(text)
    assert ENV in str(exc.value) and message in str(exc.value)


def _run(code, env_value):
    env = {"PATH": "/usr/bin:/bin"}
    if env_value is not None:
        env[ENV] = env_value
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


def test_register_is_inert_when_off():
    # the entry point vLLM calls: with the variable unset it returns without importing vLLM
    out = _run("import sys, mmrprune.integrations.vllm as p; p.register(); "
               "print(p.active_config(), 'vllm' in sys.modules)", None)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["None", "False"]


def test_register_rejects_bad_config_before_touching_vllm():
    out = _run("import mmrprune.integrations.vllm as p; p.register()", "k=-3")
    assert out.returncode != 0 and f"ValueError: {ENV}='k=-3': k: expected an int >= 1, got -3" in out.stderr
