"""``mmrprune.workspace_bytes`` and ``workspace_limit=``: the estimate a call is checked against,
asked for before the call (meta tensors allowed), and the limit as an argument."""
from __future__ import annotations

import pytest
import torch

import mmrprune
from mmrprune import workspace

GiB = 1 << 30


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
@pytest.mark.parametrize("method", ["mmr", "fps", "dpp"])
def test_gpu_targets_pass_the_default_limit(size, method):
    b, n, d = TARGETS[size]
    x = torch.empty(b, n, d, dtype=torch.bfloat16, device="meta")
    w = torch.empty(b, n, device="meta")
    need = mmrprune.workspace_bytes(x, w, keep_ratio=0.25, method=method, backend="cuda")
    assert need <= workspace.DEFAULT_LIMIT_BYTES, f"{size} {method}: {need / GiB:.2f} GiB"


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
