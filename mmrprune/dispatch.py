"""Backend registry and ``backend="auto"`` resolution.

Explicit requests fail loudly: an unknown name is a ``ValueError``; a known
backend that is unavailable, or that cannot take this device or method, is a
``RuntimeError`` that says why and how to get it.  ``"auto"`` takes the first
backend of :data:`AUTO_ORDER` for the input's device that is available and
implements the method.
"""
from __future__ import annotations

import importlib

import torch

from .backends import BUILD_HINTS, Backend

BACKENDS = ("cuda", "triton", "cpu", "torch", "numpy", "cuda_emu")   # cuda_emu: tests only, never "auto"
AUTO_ORDER = {"cpu": ("cpu", "torch"), "cuda": ("cuda", "triton", "torch")}
NOT_INSTALLED = "not part of this installation"


_LOADED: dict = {}  # name -> Backend, filled by load()


def how_to_get(name: str, detail: str) -> str:
    """The generic build hint, for a backend whose module is missing or failed to import
    (a present backend's status detail already says what it lacks)."""
    missing = detail == NOT_INSTALLED or "import failed" in detail
    return BUILD_HINTS.get(name, "") if missing else ""


def load(name: str) -> tuple[Backend | None, str]:
    """``(backend, "")`` if its module imports, else ``(None, reason)``."""
    try:
        module = importlib.import_module(f"mmrprune.backends.{name}_backend")
    except ModuleNotFoundError as exc:
        if exc.name == f"mmrprune.backends.{name}_backend":
            return None, NOT_INSTALLED
        return None, f"import failed: {exc}"
    except Exception as exc:  # a broken build must not break `import mmrprune`
        return None, f"import failed: {type(exc).__name__}: {exc}"
    _LOADED[name] = module.BACKEND
    return module.BACKEND, ""


def status(name: str) -> tuple[bool, str]:
    """``(available, detail)`` of one backend, for :func:`mmrprune.info` and errors."""
    backend, reason = load(name)
    if backend is None:
        return False, reason
    try:
        return backend.status()
    except Exception as exc:
        return False, f"status check failed: {type(exc).__name__}: {exc}"


@torch.compiler.assume_constant_result
def resolve_name(name: str, device_type: str, method: str) -> str:
    """Name of the backend :func:`resolve` picks.  Under ``torch.compile`` this runs once
    at trace time (imports and status checks are not traceable) and becomes a constant."""
    return resolve(name, device_type, method).name


def loaded(name: str) -> Backend:
    """The backend object of an already-resolved ``name`` (a plain dict read, traceable)."""
    return _LOADED[name]


def resolve(name: str, device_type: str, method: str) -> Backend:
    """The backend that will run a call (see module docstring)."""
    if not isinstance(name, str) or (name != "auto" and name not in BACKENDS):
        raise ValueError(f"backend: expected 'auto' or one of {list(BACKENDS)}, got {name!r}")
    if name == "auto":
        for candidate in AUTO_ORDER.get(device_type, ("torch",)):
            backend, _ = load(candidate)
            if backend is None or method not in backend.methods or device_type not in backend.device_types:
                continue
            if backend.status()[0]:
                return backend
        raise RuntimeError(f"no backend can run method {method!r} on {device_type} tensors")
    ok, detail = status(name)
    if not ok:
        hint = how_to_get(name, detail)  # the contract: why and how to get it, never a second, contradicting hint
        raise RuntimeError(f"backend {name!r} is not available: {detail}" + (f"; to get it, {hint}" if hint else ""))
    backend, _ = load(name)
    if device_type not in backend.device_types:
        raise RuntimeError(f"backend {name!r} runs on {list(backend.device_types)} tensors, got {device_type} input")
    if method not in backend.methods:
        raise RuntimeError(f"backend {name!r} does not implement method {method!r} "
                           f"(it has {list(backend.methods)}); use backend='auto' or 'torch'")
    return backend
