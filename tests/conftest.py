"""Shared fixtures: the (backend, device) matrix, real tokens, random-token generators.

``backend_device`` runs a test once per (backend, device) pair this machine can
run: on CPU every registered backend that is available and takes CPU tensors
(the C++ ``cpu`` backend included), and on a CUDA machine every available
backend that takes CUDA tensors (except the NumPy reference, which is checked
on CPU).

The tests import the installed ``mmrprune`` wherever pytest runs from, and a
session whose ``mmrprune`` lacks the compiled CPU backend stops with how to
build it (``tested_package``; ``MMRPRUNE_TEST_WITHOUT_BUILD=1`` opts out).
"""
from __future__ import annotations

import os
import sys

os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("MKL_NUM_THREADS", "2")
# the C++ backend gives small problems one thread (csrc/cpu/select.cpp, threads_for); the
# tests' inputs are small, and every thread layout must still meet them
os.environ.setdefault("MMRPRUNE_CPU_WORK_PER_THREAD", "0")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import tested_package  # noqa: E402

_SHADOW_NOTE = tested_package.prefer_installed()   # before anything imports mmrprune

import certify  # noqa: E402
import mmrprune  # noqa: E402
from mmrprune import dispatch  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))

EMU_REPORT_VAR = "CUDA_EMU_REPORT_FD"
_EMU_REPORT_FD = pytest.StashKey[int]()


def pytest_configure(config):
    """The CUDA emulator (backend ``cuda_emu``) aborts the process on a kernel bug (a divergent
    barrier, a deadlock) after writing why to fd 2.  While a test runs, pytest's capture points
    fd 2 at a temporary file that dies with the process, leaving only faulthandler's "Fatal
    Python error: Aborted".  Plugins are configured while capture is suspended, so fd 2 is the
    runner's own stderr here: the emulator gets a copy of it to write its reason to as well
    (csrc/emu/cuda_emu.h, ``report_fd``)."""
    fd = os.dup(2)
    config.stash[_EMU_REPORT_FD] = fd
    os.environ[EMU_REPORT_VAR] = f"{fd}:{os.getpid()}"


def pytest_report_header(config):
    where = os.path.dirname(os.path.abspath(mmrprune.__file__))
    lines = [f"mmrprune under test: {where}"]
    if _SHADOW_NOTE:
        lines.append(f"  ({_SHADOW_NOTE})")
    return lines


def pytest_sessionstart(session):
    """The tests test what is built: a missing compiled CPU backend stops the session (with
    how to build it) instead of skipping its tests in silence."""
    why = tested_package.missing_build(mmrprune.info())
    if why:
        pytest.exit(why, returncode=pytest.ExitCode.USAGE_ERROR)


def pytest_unconfigure(config):
    fd = config.stash.get(_EMU_REPORT_FD, None)
    if fd is not None:
        os.environ.pop(EMU_REPORT_VAR, None)
        os.close(fd)


def _pairs():
    pairs = []
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        for name in dispatch.BACKENDS:
            if device == "cuda" and name == "numpy":
                continue
            ok, _ = dispatch.status(name)
            if not ok:
                continue
            backend, _ = dispatch.load(name)
            if device in backend.device_types:
                pairs.append((name, device))
    return pairs


BACKEND_DEVICE_PAIRS = _pairs()


class BackendDevice:
    """One (backend, device) pair: ``require(method)`` skips what it does not implement;
    ``tensor(a)`` puts data on the device; ``select(...)`` calls the public API with it."""

    def __init__(self, name, device):
        self.name = name
        self.device = device
        self.backend, _ = dispatch.load(name)
        self.methods = tuple(self.backend.methods)

    def __repr__(self):
        return f"{self.name}-{self.device}"

    def require(self, method):
        if method not in self.methods:
            pytest.skip(f"backend {self.name!r} does not implement {method!r}")

    def tensor(self, a, dtype=None):
        if a is None:
            return None
        t = a if isinstance(a, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(a))
        return t.to(device=self.device, dtype=dtype if dtype is not None else t.dtype)

    def select(self, features, importance=None, **kw):
        import mmrprune
        return mmrprune.select(features, importance, backend=self.name, **kw)

    def select_varlen(self, features, importance, cu_seqlens, **kw):
        import mmrprune
        return mmrprune.select_varlen(features, importance, cu_seqlens, backend=self.name, **kw)


@pytest.fixture(params=BACKEND_DEVICE_PAIRS, ids=[f"{b}-{d}" for b, d in BACKEND_DEVICE_PAIRS])
def backend_device(request):
    return BackendDevice(*request.param)


@pytest.fixture(scope="session")
def dinov2():
    """Real DINOv2 ViT-S/14 tokens: ``tokens`` f16 [8, 1024, 384], ``cls_attention`` f32 [8, 1024]."""
    from mmrprune.data import load_dinov2
    return load_dinov2()


@pytest.fixture
def gaussian():
    """``gaussian(n, d, batch=None, seed=0)`` -> float64 standard-normal tokens."""
    return certify.gaussian_tokens


@pytest.fixture
def clustered():
    """``clustered(n, d, batch=None, seed=0, centres=4)`` -> float64 clustered tokens."""
    return certify.clustered_tokens
