"""pytest plugin of the GPU session's test stages: keep the tests that run a kernel backend
on the device, deselect the rest (the CPU backends, the emulator, the interpreter, the
integrations: CI runs those).

    PYTHONPATH=bench/gpu python3 -m pytest -p gpu_tests --gpu-backends cuda,triton --gpu-device cuda \\
        $(python3 bench/gpu/gpu_tests.py)        # prints FILES

A collected test is kept when

* its ``backend_device`` parameter (tests/conftest.py) is ``(backend, device)`` with a backend
  of ``--gpu-backends`` on ``--gpu-device``, or
* its ``target`` parameter (tests/test_cuda_backend.py's kernel targets) names such a backend, or
* it has neither and carries a ``skipif`` mark whose reason starts with ``needs a CUDA``
  (the GPU-only tests, e.g. CUDA-graph capture).

The dry run keeps ``cuda_emu`` and ``triton`` on ``cpu`` (with ``TRITON_INTERPRET=1``) instead.

``--gpu-sim rows|gram`` makes that similarity source the default ``sim=`` of ``mmrprune.select``,
``select_varlen`` and ``prune`` for the kept tests (a test that names ``sim`` keeps its own), so
one stage runs every kernel test in row mode and the other in Gram mode.
"""
from __future__ import annotations

import functools

import pytest

# the test files that hold such tests (tests/test_gpu_session.py checks none is missing);
# collecting only these keeps the stage away from modules the device's packages cannot import
FILES = ("tests/test_cuda_backend.py", "tests/test_select.py", "tests/test_edge_cases.py",
         "tests/test_hostile.py", "tests/test_validation.py")
GPU_ONLY_REASON = "needs a CUDA"


def pytest_addoption(parser):
    group = parser.getgroup("mmrprune GPU session")
    group.addoption("--gpu-backends", default="cuda,triton", help="comma list of the backends to keep")
    group.addoption("--gpu-device", default="cuda", help="device type of backend_device pairs to keep")
    group.addoption("--gpu-sim", default="auto", choices=("auto", "rows", "gram"),
                    help="default sim= of the selection entry points in the kept tests")


def _with_sim(fn, sim: str):
    @functools.wraps(fn)
    def call(*args, **kw):
        kw.setdefault("sim", sim)
        return fn(*args, **kw)
    return call


@pytest.fixture(autouse=True)
def _gpu_sim(request, monkeypatch):
    sim = request.config.getoption("--gpu-sim")
    if sim != "auto":
        import mmrprune
        from mmrprune import api
        for name in ("select", "select_varlen", "prune"):
            monkeypatch.setattr(mmrprune, name, _with_sim(getattr(api, name), sim))
    yield


def keep(item, backends, device: str) -> bool:
    params = getattr(getattr(item, "callspec", None), "params", {})
    pair = params.get("backend_device")
    if pair is not None:
        return tuple(pair) in {(b, device) for b in backends}
    target = params.get("target")
    if isinstance(target, str):
        return target in backends
    return any(str(m.kwargs.get("reason", "")).startswith(GPU_ONLY_REASON) for m in item.iter_markers("skipif"))


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    backends = [b.strip() for b in config.getoption("--gpu-backends").split(",") if b.strip()]
    device = config.getoption("--gpu-device")
    kept, dropped = [], []
    for item in items:
        (kept if keep(item, backends, device) else dropped).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
    items[:] = kept


if __name__ == "__main__":
    print(" ".join(FILES))
