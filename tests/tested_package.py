"""Which ``mmrprune`` the tests import, and whether it is built.

The tests test the installed package, wherever pytest runs from.  ``python -m pytest`` run from
the clone root puts the root on ``sys.path`` first, where the source tree's ``mmrprune/`` (no
compiled extension after a regular ``pip install .``) would shadow the installed copy and the
tests of the compiled code would quietly skip.  :func:`prefer_installed` drops that implicit
entry when another ``mmrprune`` is installed; an entry the user put in ``PYTHONPATH`` is a
deliberate choice and stays.  An editable install resolves to the clone either way.

:func:`missing_build` is the session's gate: the compiled CPU backend must be there, unless the
run opts out with ``MMRPRUNE_TEST_WITHOUT_BUILD=1`` (pure-Python runs: its tests then skip).
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPT_OUT = "MMRPRUNE_TEST_WITHOUT_BUILD"


def _same(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def prefer_installed(root: str = ROOT) -> str | None:
    """Drop the implicit ``sys.path`` entries that point at ``root`` (the clone) when an
    ``mmrprune`` is installed elsewhere; returns the dropped entries' reason, or ``None``."""
    if "mmrprune" in sys.modules:
        return None   # already imported (a plugin): too late to choose, the header says which
    explicit = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    cwd = os.getcwd()
    implicit = [e for e in sys.path
                if _same(e or cwd, root) and not any(_same(p, root) for p in explicit)]
    if not implicit:
        return None
    saved = sys.path[:]
    sys.path[:] = [e for e in sys.path if e not in implicit]
    importlib.invalidate_caches()
    spec = importlib.util.find_spec("mmrprune")
    origin = spec.origin if spec is not None else None
    if origin is None or os.path.commonpath([os.path.realpath(origin), os.path.realpath(root)]) \
            == os.path.realpath(root):
        sys.path[:] = saved   # not installed elsewhere, or an editable install of this clone
        importlib.invalidate_caches()
        return None
    # the tests' child interpreters (`python -m mmrprune ...`, `python -c`, run from the clone)
    # would put the clone first again: PYTHONSAFEPATH (Python >= 3.11) keeps them off it too
    os.environ["PYTHONSAFEPATH"] = "1"
    return f"{root} left off sys.path: it would shadow the installed {os.path.dirname(origin)}"


def package_parent() -> str:
    """The ``sys.path`` entry that holds the imported ``mmrprune``: what a test's subprocess
    puts first on ``PYTHONPATH`` to import the same package."""
    import mmrprune
    return os.path.dirname(os.path.dirname(os.path.abspath(mmrprune.__file__)))


def missing_build(report: dict, environ=os.environ) -> str | None:
    """Why the session must stop (the compiled CPU backend is missing and the run did not opt
    out), from ``mmrprune.info()``'s report; ``None`` when the session may go on."""
    cpu = report["backends"]["cpu"]
    if cpu["available"] or environ.get(OPT_OUT) == "1":
        return None
    import mmrprune
    return (f"the mmrprune under test ({os.path.dirname(mmrprune.__file__)}) has no compiled CPU "
            f"backend: {cpu['detail']}\nThe tests test what is built. Build and install it as "
            f"README.md says (`bash scripts/setup.sh`), or, to run only the pure-Python tests, "
            f"set {OPT_OUT}=1 (the tests of the compiled code then skip).")
