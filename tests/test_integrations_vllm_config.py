"""MMRPRUNE_VLLM parsing and the plugin's off switch (no vLLM needed; the engine tests are in
tests/vllm_plugin and run in the venv of scripts/setup_vllm.sh)."""
import subprocess
import sys

import pytest

import warnings

from mmrprune.integrations.selection import Budget, Selector
from mmrprune.integrations.vllm import ENV, PruneConfig, parse_config
from mmrprune.reference import budget


@pytest.mark.parametrize("text", [None, "", "  "])
def test_unset_or_blank_is_off(text):
    assert parse_config(text) is None


def test_full_config():
    c = parse_config(" k=64 , video_keep_ratio=0.3, method=hybrid,lam=0.25, importance=none,backend=torch")
    assert c == PruneConfig(images=Budget(k=64), videos=Budget(keep_ratio=0.3),
                            selector=Selector(method="hybrid", lam=0.25, backend="torch", importance="none"))
    # defaults: mmr at its own default lam, norm importance, auto backend; videos not pruned
    assert parse_config("keep_ratio=0.25") == PruneConfig(images=Budget(keep_ratio=0.25))
    assert parse_config("video_k=100") == PruneConfig(videos=Budget(k=100))


@pytest.mark.parametrize("text", ["k=8", "keep_ratio=0.3", "keep_ratio=0.01", "video_k=8", "video_keep_ratio=0.3"])
def test_tokens_kept_is_the_selection_budget(text):
    c = parse_config(text)
    pruned = c.images if c.images.prunes else c.videos
    other = c.videos if c.images.prunes else c.images
    for n in (1, 2, 5, 8, 9, 20, 576, 1000):
        assert pruned.tokens_kept(n) == budget(n, pruned.k, pruned.keep_ratio)
        assert other.tokens_kept(n) == n                    # the modality without a budget keeps every token
    assert parse_config("k=8").images.tokens_kept(20) == 8 and parse_config("k=8").images.tokens_kept(5) == 5


@pytest.mark.parametrize("text, message", [
    ("k=0", "k: expected an int >= 1, got 0"),
    ("k=eight", "k: expected an int (plain decimal digits, no '_' separators), got 'eight'"),
    # one rule for every number, and the message echoes what was typed
    ("k=1_000", "k: expected an int (plain decimal digits, no '_' separators), got '1_000'"),
    ("keep_ratio=1_0", "keep_ratio: expected a number (plain decimal digits, no '_' separators; a decimal point "
                       "and exponent allowed), got '1_0'"),
    ("video_keep_ratio=0_5", "video_keep_ratio: expected a number (plain decimal digits, no '_' separators"),
    ("k=8,lam=0_5", "lam: expected a number (plain decimal digits, no '_' separators"),
    ("keep_ratio=inf", "keep_ratio: expected a number"),
    ("keep_ratio=1.50", "keep_ratio: expected a value in (0, 1], got 1.50"),
    ("keep_ratio=15e-1", "keep_ratio: expected a value in (0, 1], got 15e-1"),
    ("k=-0", "k: expected an int >= 1, got -0"),
    ("k=8,keep_ratio=0.5", "give one of k or keep_ratio, not both"),
    ("video_k=8,video_keep_ratio=0.5", "give one of video_k or video_keep_ratio, not both"),
    ("method=mmr", "nothing to prune: give k or keep_ratio (tokens kept per image) and/or video_k or"),
    ("video_k=0", "video_k: expected an int >= 1, got 0"),
    ("video_keep_ratio=0", "video_keep_ratio: expected a value in (0, 1], got 0"),
    ("k=8,video_k=2.5", "video_k: expected an int (plain decimal digits, no '_' separators), got '2.5'"),
    ("keep_ratio=1.5", "keep_ratio: expected a value in (0, 1]"),
    ("k=8,lam=2", "lam: expected a value in [0, 1]"),
    ("k=8,method=nope", "method: expected one of"),
    ("k=8,method=topk,importance=none", "method=topk ranks tokens by importance"),
    ("k=8,importance=text", "importance must be one of ['norm', 'none']"),
    ("k=8,backend=gpu", "backend must be 'auto' or one of"),
    ("k=8,ratio=0.5", "keys ['k', 'keep_ratio'"),
    ("k8", "key=value"),
    ("k=8,k=9", "k given twice"),
    ("k=8,method=d2pruner,grid=4", "d2pruner's grid is each image's own patch grid, set by the plugin"),
    ("k=8,method=d2pruner,alpha=2", "alpha: expected a value in [0, 1], got 2.0"),
    ("k=8,method=d2pruner,radius=1.5", "radius: expected an int (plain decimal digits, no '_' separators), got '1.5'"),
    ("k=8,method=mmr,alpha=1", "method 'mmr' got unexpected parameter(s) ['alpha']; it takes none"),
    ("video_k=8,method=d2pruner", "video_k/video_keep_ratio with method=d2pruner needs alpha=1.0"),
])
def test_bad_config_names_the_variable_and_the_problem(text, message):
    with pytest.raises(ValueError) as exc:
        parse_config(text)
    assert ENV in str(exc.value) and message in str(exc.value)


@pytest.mark.parametrize("text, expected", [("k=1000", 1000), ("k=+8", 8), ("k=007", 7)])
def test_plain_ints_are_read(text, expected):
    assert parse_config(text).images.k == expected


@pytest.mark.parametrize("text, expected", [("keep_ratio=0.25", 0.25), ("keep_ratio=.5", 0.5), ("keep_ratio=1", 1.0),
                                            ("keep_ratio=25e-2", 0.25), ("keep_ratio=2.5E-1", 0.25)])
def test_plain_reals_are_read(text, expected):
    assert parse_config(text).images.keep_ratio == expected


def test_d2pruner_takes_the_parameters_its_messages_suggest():
    # the grid comes from each image; alpha, tau, pivot_ratio and radius are settings
    c = parse_config("k=8,method=d2pruner")
    assert c.selector.params == {"pivot_ratio": 0.5, "alpha": 0.5, "tau": 0.5, "radius": 1} and c.selector.needs_grid
    c = parse_config("k=8,video_k=16,method=d2pruner,alpha=1.0,tau=0.3,pivot_ratio=0.25,radius=2")
    assert c.selector.params == {"pivot_ratio": 0.25, "alpha": 1.0, "tau": 0.3, "radius": 2}
    assert not c.selector.needs_grid


@pytest.mark.parametrize("text", ["k=" + "9" * 5000, "k=-" + "9" * 5000, "k=x" + "9" * 5000, "method=" + "m" * 5000,
                                  "k=8,importance=" + "n" * 5000, "k" * 5000])
def test_long_values_are_cut_in_messages(text):
    try:
        config = parse_config(text)
    except ValueError as exc:
        assert ENV in str(exc) and len(str(exc)) < 400, len(str(exc))
    else:   # a k of any length is a budget beyond every image: every token
        assert config.images.tokens_kept(10 ** 6) == 10 ** 6


def test_lam_only_when_given():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for method in ("dpp", "divprune", "topk", "fps", "d2pruner", "mmr", "hybrid"):
            assert parse_config(f"k=8,method={method}").selector.lam is None
    with pytest.warns(UserWarning, match=r"lam=0.3 is ignored by method='dpp'"):
        assert parse_config("k=8,method=dpp,lam=0.3").selector.lam is None   # warned once, at start
    assert parse_config("k=8,method=hybrid,lam=0.3").selector.lam == 0.3


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
    assert out.returncode != 0 and f"ValueError: {ENV}: k: expected an int >= 1, got -3" in out.stderr
