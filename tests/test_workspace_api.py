"""``mmrprune.workspace_bytes`` and ``workspace_limit=``: the estimate a call is checked against,
asked for before the call (meta tensors allowed), and the limit as an argument."""
from __future__ import annotations

import ast
import dataclasses
import importlib
import os
import sys

import pytest
import torch

import mmrprune
from mmrprune import workspace

GiB = 1 << 30
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("method", ["mmr", "dpp", "divprune"])
@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_workspace_bytes_is_what_the_call_is_checked_against(method, backend):
    x, w = torch.randn(2, 40, 16), torch.rand(2, 40)
    need = mmrprune.workspace_bytes(x, w, k=6, method=method, backend=backend)
    assert need > 0
    mmrprune.select(x, w, k=6, method=method, backend=backend, workspace_limit=need)
    with pytest.raises(workspace.WorkspaceLimitError, match=str(need)):
        mmrprune.select(x, w, k=6, method=method, backend=backend, workspace_limit=need - 1)


@pytest.mark.parametrize("method", ["mmr", "dpp"])
def test_meta_tensors_give_the_same_estimate(method):
    x, w = torch.randn(3, 50, 8), torch.rand(3, 50)
    real = mmrprune.workspace_bytes(x, w, keep_ratio=0.3, method=method, backend="cpu")
    meta = mmrprune.workspace_bytes(x.to("meta"), w.to("meta"), keep_ratio=0.3, method=method, backend="cpu")
    assert meta == real
    with pytest.raises(ValueError, match="name the backend"):
        mmrprune.workspace_bytes(x.to("meta"), k=3)


# The GPU targets: (c) B=64 images of 2691 bf16 tokens of D=3584, (d) one image of 16384.
TARGETS = {"c": (64, 2691, 3584), "d": (1, 16384, 3584)}


@pytest.mark.parametrize("size", sorted(TARGETS))
@pytest.mark.parametrize("method", ["mmr", "fps", "hybrid", "divprune", "dpp", "topk"])
def test_gpu_targets_pass_the_default_limit(size, method):
    b, n, d = TARGETS[size]
    x = torch.empty(b, n, d, dtype=torch.bfloat16, device="meta")
    w = torch.empty(b, n, device="meta")
    need = mmrprune.workspace_bytes(x, w, keep_ratio=0.25, method=method, backend="cuda")
    assert need <= workspace.DEFAULT_LIMIT_BYTES, f"{size} {method}: {need / GiB:.2f} GiB"


def _bench(name):
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.pop(0)


def test_documented_target_figures_are_the_codes():
    """docs/api.md's (c)/(d) table is what bench/workspace_targets.py computes from the code
    (regenerate with ``python bench/workspace_targets.py --update``)."""
    targets = _bench("workspace_targets")
    assert targets.TARGETS == {f"({key})": shape for key, shape in TARGETS.items()}
    assert targets.documented(), "docs/api.md lost its workspace-targets markers"
    assert targets.documented() == targets.table()


# ----------------------------------------------------------------------------- backends own it
def test_every_backend_states_its_workspace():
    from mmrprune import dispatch
    for name in dispatch.BACKENDS:
        backend, why = dispatch.load(name)
        assert backend is not None, f"{name}: {why}"
        assert callable(backend.workspace), name


def test_the_estimate_is_the_backends_own_with_the_options_it_takes():
    """workspace.estimate_bytes asks the backend object, passing only the tuning it lists."""
    from mmrprune.backends import Backend
    from mmrprune.validation import validate
    seen = []

    def sized(batch, **options):
        seen.append(options)
        return 12345

    batch = validate(torch.randn(2, 8, 4), None, k=2, keep_ratio=None, lam=0.5, method="mmr").batch
    plain = Backend(name="x", methods=("mmr",), device_types=("cpu",), select=None, status=None, workspace=sized)
    tuned = dataclasses.replace(plain, options=("sim",))
    assert workspace.estimate_bytes(plain, batch, sim="rows", max_round=2) == 12345
    assert workspace.estimate_bytes(tuned, batch, sim="rows", max_round=2) == 12345
    assert seen == [{}, {"sim": "rows"}]
    with pytest.raises(workspace.WorkspaceLimitError, match="'x' would need"):
        workspace.check(tuned, batch, limit=12344)
    with pytest.raises(ValueError, match="does not implement method 'dpp'"):
        workspace.estimate_bytes(plain, dataclasses.replace(batch, method="dpp"))
    with pytest.raises(TypeError, match="does not say how much workspace"):
        workspace.estimate_bytes(dataclasses.replace(plain, workspace=None), batch)


def test_workspace_module_has_no_branch_per_backend():
    """No backend's name appears in mmrprune/workspace.py's code: it asks the backend."""
    from mmrprune import dispatch
    with open(os.path.join(ROOT, "mmrprune", "workspace.py"), encoding="utf-8") as f:
        tree = ast.parse(f.read())
    strings = {node.value for node in ast.walk(tree) if isinstance(node, ast.Constant) and isinstance(node.value, str)
               and node is not _docstring(tree)}
    names = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
    names |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) for alias in node.names}
    for backend in dispatch.BACKENDS:
        assert backend not in strings and f"{backend}_backend" not in names, backend


def _docstring(tree):
    first = tree.body[0]
    return first.value if isinstance(first, ast.Expr) else None


@pytest.mark.parametrize("bad", [0, -1, True, 1.5, "lots", "0"])
def test_workspace_limit_rejects_what_is_no_byte_count(bad):
    with pytest.raises((TypeError, ValueError), match="workspace_limit"):
        mmrprune.select(torch.randn(10, 4), k=2, workspace_limit=bad)


def test_workspace_limit_argument_beats_the_environment(monkeypatch):
    monkeypatch.setenv(workspace.ENV_VAR, "1")
    x = torch.randn(10, 4)
    with pytest.raises(workspace.WorkspaceLimitError):
        mmrprune.select(x, k=2, method="dpp")
    assert mmrprune.select(x, k=2, method="dpp", workspace_limit="unlimited").shape == (2,)
    assert mmrprune.select(x, k=2, method="dpp", workspace_limit="1G").shape == (2,)
