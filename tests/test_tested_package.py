"""The suite tests the installed, built mmrprune wherever pytest runs from (tested_package.py)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import mmrprune
import tested_package

HERE = os.path.dirname(os.path.abspath(__file__))


def _stub_clone(tmp_path):
    """A clone root whose ``mmrprune/`` would shadow the installed package (as the source tree
    does after a regular ``pip install .``), with this suite's conftest and a probe test."""
    (tmp_path / "mmrprune").mkdir()
    (tmp_path / "mmrprune" / "__init__.py").write_text("SHADOW = True\n")
    tests = tmp_path / "tests"
    tests.mkdir()
    for name in ("conftest.py", "tested_package.py", "certify.py"):
        shutil.copy(os.path.join(HERE, name), tests / name)
    (tests / "test_probe.py").write_text(
        "import os, subprocess, sys\n"
        "import mmrprune\n"
        "def test_probe():\n"
        "    assert not hasattr(mmrprune, 'SHADOW'), mmrprune.__file__\n"
        "    assert mmrprune.info()['backends']['cpu']['available']\n"
        "    out = subprocess.run([sys.executable, '-c', 'import mmrprune; print(mmrprune.__file__)'],\n"
        "                         capture_output=True, text=True, check=True).stdout\n"
        "    assert out.strip() == mmrprune.__file__, out\n")
    return tmp_path


def test_run_from_a_clone_root_tests_the_installed_package(tmp_path):
    root = _stub_clone(tmp_path)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSAFEPATH")}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_probe.py"],
                          cwd=root, env=env, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "1 passed" in out, out[-4000:]


def test_an_explicit_pythonpath_entry_is_kept(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "mmrprune")
    path = [str(tmp_path)] + sys.path
    monkeypatch.setattr(sys, "path", path)
    assert tested_package.prefer_installed(str(tmp_path)) is None
    assert sys.path[0] == str(tmp_path)


def test_the_clone_is_dropped_only_when_mmrprune_is_installed_elsewhere(tmp_path, monkeypatch):
    (tmp_path / "mmrprune").mkdir()
    (tmp_path / "mmrprune" / "__init__.py").write_text("")
    monkeypatch.delenv("PYTHONPATH", raising=False)
    monkeypatch.delenv("PYTHONSAFEPATH", raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "mmrprune")
    monkeypatch.setattr(sys, "path", [""] + sys.path)
    note = tested_package.prefer_installed(str(tmp_path))
    assert note and str(tmp_path) in note and "" not in sys.path
    assert os.environ["PYTHONSAFEPATH"] == "1"
    # nothing else to import: the clone stays
    monkeypatch.setattr(sys, "path", [""])
    monkeypatch.setattr(sys, "meta_path", [f for f in sys.meta_path   # no editable install either
                                           if getattr(f, "__name__", "") != "_EditableFinder"])
    assert tested_package.prefer_installed(str(tmp_path)) is None and sys.path == [""]


def test_a_missing_build_stops_the_session_unless_opted_out():
    report = {"backends": {"cpu": {"available": False, "detail": "C++ extension mmrprune._cpu is not built"}}}
    why = tested_package.missing_build(report, environ={})
    assert why and "is not built" in why and "scripts/setup.sh" in why and tested_package.OPT_OUT in why
    assert os.path.dirname(mmrprune.__file__) in why
    assert tested_package.missing_build(report, environ={tested_package.OPT_OUT: "1"}) is None
    built = {"backends": {"cpu": {"available": True, "detail": ""}}}
    assert tested_package.missing_build(built, environ={}) is None
