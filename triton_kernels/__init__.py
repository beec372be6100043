"""Triton kernels of mmrprune, installed as ``mmrprune.triton_kernels``.

The folder is named ``triton_kernels`` in the source tree, but ``setup.py``
maps it under the ``mmrprune`` namespace: Triton ships its own top-level
``triton_kernels`` package (used by vLLM) and we must not shadow it.
"""
if __name__ == "triton_kernels":
    # Imported as a *top-level* package: the source tree's root is on sys.path (``python -m
    # pytest`` or ``python -c`` run from a checkout put the working directory first).  This
    # folder must not hide Triton's own ``triton_kernels`` (vLLM imports
    # ``triton_kernels.matmul`` etc.), so it steps aside: the import resolves to the next
    # ``triton_kernels`` on sys.path, or fails as if this folder were not there.  The import
    # system returns whatever is in ``sys.modules[__name__]`` once this body has run.
    import importlib.machinery as _machinery
    import importlib.util as _util
    import os as _os
    import sys as _sys

    _root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    _others = [p for p in _sys.path if _os.path.abspath(p or _os.curdir) != _root]
    _spec = _machinery.PathFinder.find_spec(__name__, _others)
    if _spec is None or _spec.loader is None:
        raise ModuleNotFoundError(
            "No module named 'triton_kernels' (the mmrprune source tree's triton_kernels/ folder is "
            "the package mmrprune.triton_kernels, not a top-level triton_kernels)", name=__name__)
    _real = _util.module_from_spec(_spec)
    _sys.modules[__name__] = _real
    _spec.loader.exec_module(_real)
