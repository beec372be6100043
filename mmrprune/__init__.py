"""mmrprune: exact, batched greedy selection of the visual tokens a multimodal LLM keeps.

    idx = mmrprune.select(features, importance, keep_ratio=0.25, method="mmr", lam=0.5)

See ``mmrprune.info()`` for the backends of this installation and docs/api.md
for the methods.

The public names and the submodules ``data``, ``importance``, ``integrations``,
``metrics`` and ``reference`` load on first use (module ``__getattr__``), so
``import mmrprune`` stays cheap and does not import torch: the bench CLI's
``--help`` and ``python -m mmrprune`` parse their arguments without it.
"""
import importlib
import importlib.util

__version__ = "0.1.0"

# Bound now, not lazily: importing the submodule mmrprune.info first would otherwise leave the
# name `info` bound to that module. info.py imports nothing heavy until called.
from .info import info  # noqa: E402

_FUNCTIONS = {"select": "api", "select_varlen": "api", "prune": "api", "workspace_bytes": "api"}
_SUBMODULES = ("metrics", "reference", "data", "importance", "integrations")
__all__ = ["select", "select_varlen", "prune", "workspace_bytes", "info", "metrics", "reference", "__version__"]


def __getattr__(name):
    if name in _FUNCTIONS:
        value = getattr(importlib.import_module(f".{_FUNCTIONS[name]}", __name__), name)
    elif name in _SUBMODULES or (not name.startswith("__") and importlib.util.find_spec(f"{__name__}.{name}")):
        # any submodule (dispatch, backends, ...) as before the namespace went lazy
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module 'mmrprune' has no attribute {name!r}")
    globals()[name] = value  # later lookups are plain attribute reads (and traceable)
    return value


def __dir__():
    return sorted(set(globals()) | set(_FUNCTIONS) | set(_SUBMODULES))
