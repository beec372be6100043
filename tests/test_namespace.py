"""The Triton kernels are ``mmrprune.triton_kernels`` and never shadow (or are shadowed by)
another top-level ``triton_kernels`` package, such as the one Triton/vLLM ship.  Each check runs in a fresh interpreter whose working directory is a
temporary folder, so the repository root is not on ``sys.path``."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

FAKE = '"""a stand-in for a third-party top-level triton_kernels package"""\nIS_FAKE = True\n'


def run_py(code, tmp_path, extra_path=None):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"
    prelude = ""
    if extra_path:
        # appended, i.e. *after* site-packages: a top-level triton_kernels installed by
        # mmrprune would win over it and make the checks below fail
        prelude = f"import sys; sys.path.append({str(extra_path)!r})\n"
    proc = subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"subprocess failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


@pytest.fixture
def fake_site(tmp_path):
    site = tmp_path / "site"
    (site / "triton_kernels").mkdir(parents=True)
    (site / "triton_kernels" / "__init__.py").write_text(FAKE)
    work = tmp_path / "cwd"
    work.mkdir()
    return site, work


def test_mmrprune_first_then_third_party(fake_site):
    site, work = fake_site
    out = run_py("""
        import os, sys
        import mmrprune, mmrprune.triton_kernels as ours
        assert ours.__name__ == "mmrprune.triton_kernels", ours.__name__
        assert os.path.basename(os.path.dirname(ours.__file__)) == "triton_kernels", ours.__file__
        assert "triton_kernels" not in sys.modules, "importing mmrprune.triton_kernels registered a top-level name"
        from mmrprune import dispatch
        [dispatch.status(n) for n in dispatch.BACKENDS]   # loads every backend module it can
        import triton_kernels
        assert getattr(triton_kernels, "IS_FAKE", False), triton_kernels.__file__
        assert triton_kernels is not ours
        assert not hasattr(ours, "IS_FAKE")
        print("ok")
    """, work, extra_path=site)
    assert out.strip() == "ok"


def test_third_party_first_then_mmrprune(fake_site):
    site, work = fake_site
    out = run_py("""
        import triton_kernels
        assert triton_kernels.IS_FAKE
        import mmrprune, mmrprune.triton_kernels as ours
        import sys
        assert sys.modules["triton_kernels"] is triton_kernels
        assert ours is not triton_kernels and not hasattr(ours, "IS_FAKE")
        assert ours.__name__ == "mmrprune.triton_kernels"
        print("ok")
    """, work, extra_path=site)
    assert out.strip() == "ok"


# ----------------------------------------------------------------------------- from a checkout
# ``python -m pytest`` / ``python -c`` in the repository root put the root on sys.path, so a plain
# ``import triton_kernels`` looks there first: the checkout must hold no top-level package of that
# name (vLLM takes any folder it finds for Triton's and logs a traceback when it cannot use it).
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_repo_root_on_path_defers_to_third_party(fake_site):
    site, _ = fake_site
    (site / "triton_kernels" / "matmul.py").write_text("WHO = 'third party'\n")
    out = run_py("""
        import os, sys
        assert os.path.abspath(sys.path[0] or os.curdir) == os.getcwd()     # the checkout comes first
        import triton_kernels, triton_kernels.matmul
        assert triton_kernels.IS_FAKE and triton_kernels.matmul.WHO == "third party", triton_kernels.__file__
        assert sys.modules["triton_kernels"] is triton_kernels
        import mmrprune.triton_kernels.greedy as ours
        assert ours.__name__ == "mmrprune.triton_kernels.greedy" and not hasattr(ours, "IS_FAKE")
        print("ok")
    """, ROOT, extra_path=site)
    assert out.strip() == "ok"


def test_repo_root_on_path_without_third_party_is_missing(tmp_path):
    out = run_py("""
        import importlib.util, sys
        assert importlib.util.find_spec("triton_kernels") is None   # vLLM's probe
        try:
            import triton_kernels
        except ModuleNotFoundError as exc:
            assert exc.name == "triton_kernels", exc.name
            assert "triton_kernels" not in sys.modules
            print("missing")
        import mmrprune.triton_kernels.greedy
        print("ours ok")
    """, ROOT)
    assert out.split() == ["missing", "ours", "ok"]
