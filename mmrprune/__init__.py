"""mmrprune: exact, batched greedy selection of the visual tokens a multimodal LLM keeps.

    idx = mmrprune.select(features, importance, keep_ratio=0.25, method="mmr", lam=0.5)

See ``mmrprune.info()`` for the backends of this installation and README.md
for the methods.
"""
from . import metrics, reference
from .api import prune, select, select_varlen
from .info import info

__version__ = "0.1.0"
__all__ = ["select", "select_varlen", "prune", "info", "metrics", "reference", "__version__"]
