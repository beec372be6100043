"""Imports stay one-way: api -> dispatch/workspace -> backends -> prepare/validation -> batch -> reference.

The check parses every module's source (imports inside functions included) without
importing anything, so it also covers backends whose dependencies are not installed.
"""
from __future__ import annotations

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Higher layers may import lower ones (and their own layer), never the other way.
LAYERS = {
    "mmrprune.api": 5,
    "mmrprune.dispatch": 4,
    "mmrprune.workspace": 4,         # per-backend workspace estimates, checked by api before dispatch
    "mmrprune.backends": 3,          # the package and every backend module in it
    "mmrprune.ops": 3,               # op registration, used by the backends and the Triton kernels
    "mmrprune.triton_kernels": 3,
    "mmrprune.prepare": 2,
    "mmrprune.validation": 2,
    "mmrprune.batch": 1,
    "mmrprune.reference": 0,
    "mmrprune._cpu": 0,              # compiled extensions and the build record
    "mmrprune._cuda": 0,
    "mmrprune._cuda_emu": 0,
    "mmrprune._build_config": 0,
}


def layer_of(module: str):
    """The layer of ``module`` (by its longest listed prefix), or None if it is outside the chain."""
    best = None
    for prefix in LAYERS:
        if module == prefix or module.startswith(prefix + "."):
            if best is None or len(prefix) > len(best):
                best = prefix
    return None if best is None else LAYERS[best]


def imported_modules(source: str, module: str, is_package: bool) -> set[str]:
    """Absolute names of the mmrprune modules ``source`` imports (``from x import y`` yields
    ``x.y`` too, since ``y`` may be a submodule)."""
    package = module if is_package else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module or ""
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
    return {m for m in found if m == "mmrprune" or m.startswith("mmrprune.")}


def violations(modules: dict[str, tuple[str, bool]]) -> list[str]:
    """``modules``: name -> (source, is_package).  Every import that goes up a layer, or from
    a layered module to an mmrprune module outside the chain."""
    bad = []
    for name, (source, is_package) in sorted(modules.items()):
        mine = layer_of(name)
        if mine is None:
            continue      # entry points (mmrprune/__init__, info, bench, integrations) may import anything
        for dep in sorted(imported_modules(source, name, is_package)):
            if dep == "mmrprune":
                continue      # `from .. import x` also yields the bare package; x is judged itself
            theirs = layer_of(dep)
            if theirs is None:
                bad.append(f"{name} imports {dep}, which is outside the layered core")
            elif theirs > mine:
                bad.append(f"{name} (layer {mine}) imports {dep} (layer {theirs})")
    return bad


def package_sources() -> dict[str, tuple[str, bool]]:
    out = {}
    for folder, prefix in ((os.path.join(ROOT, "mmrprune"), "mmrprune"),):
        for dirpath, _, files in os.walk(folder, followlinks=False):
            rel = os.path.relpath(dirpath, folder)
            parts = [] if rel == "." else rel.split(os.sep)
            if "__pycache__" in parts:
                continue
            for f in files:
                if not f.endswith(".py"):
                    continue
                is_package = f == "__init__.py"
                name = ".".join([prefix, *parts] + ([] if is_package else [f[:-3]]))
                with open(os.path.join(dirpath, f), encoding="utf-8") as fh:
                    out[name] = (fh.read(), is_package)
    return out


def test_imports_are_one_way():
    modules = package_sources()
    assert {"mmrprune.api", "mmrprune.dispatch", "mmrprune.backends.cuda_backend", "mmrprune.prepare",
            "mmrprune.batch", "mmrprune.triton_kernels.greedy"} <= set(modules)
    assert violations(modules) == []


def test_checker_catches_an_upward_import():
    modules = package_sources()
    batch_src, _ = modules["mmrprune.batch"]
    bad = dict(modules)
    bad["mmrprune.batch"] = (batch_src + "\n\ndef _late():\n    from . import dispatch\n", False)
    bad["mmrprune.backends.torch_backend"] = ("from ..api import select\n", False)
    bad["mmrprune.prepare"] = ("import mmrprune.backends.cpu_backend\n", False)
    bad["mmrprune.reference"] = ("from .bench import cli\n", False)
    found = violations(bad)
    assert any(v.startswith("mmrprune.batch (layer 1) imports mmrprune.dispatch") for v in found), found
    assert any(v.startswith("mmrprune.backends.torch_backend (layer 3) imports mmrprune.api") for v in found), found
    assert any(v.startswith("mmrprune.prepare (layer 2) imports mmrprune.backends") for v in found), found
    assert any("mmrprune.reference imports mmrprune.bench" in v for v in found), found
