"""The examples run as written (offline: they build tiny random-weight models)."""
import os
import subprocess
import sys

import pytest

import tested_package

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_prune_tiny_llava_example_runs():
    pytest.importorskip("transformers", reason='needs transformers: pip install ".[hf]"')
    env = dict(os.environ, PYTHONPATH=tested_package.package_parent(), OMP_NUM_THREADS="1")  # the mmrprune under test
    proc = subprocess.run([sys.executable, os.path.join(REPO, "examples", "prune_tiny_llava.py")], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "prefill 69 -> 21 tokens; visual tokens 64 -> 16" in proc.stdout
    # docs/integrations.md documents every key of p.last, and nothing else
    keys = next(line for line in proc.stdout.splitlines() if line.startswith("p.last keys:")).split(":")[1]
    with open(os.path.join(REPO, "docs", "integrations.md"), encoding="utf-8") as f:
        doc = f.read()
    table = doc[doc.index("| key | what |"):].split("\n\n")[0]
    documented = sorted(line.split("`")[1] for line in table.splitlines()[2:])
    assert documented == keys.strip().split(",")
