"""``import mmrprune`` is cheap: the public functions and the submodules load on first use,
and the bench CLI parses its arguments (``--help``, usage errors) without importing torch.
Each check runs in a fresh interpreter, whose ``sys.modules`` tells what was imported."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAZY = ("mmrprune.data", "mmrprune.importance", "mmrprune.integrations", "mmrprune.api", "torch")


def run_py(code):
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_import_mmrprune_loads_no_submodule_and_no_torch():
    loaded = run_py(f"""
        import json, sys
        import mmrprune
        print(json.dumps([m for m in {list(LAZY)!r} if m in sys.modules]))
    """)
    assert loaded == []


def test_submodules_and_functions_are_reachable_after_import_mmrprune():
    out = run_py("""
        import json, mmrprune
        bias = mmrprune.importance.estimate_position_bias   # the docs' spelling
        tokens = mmrprune.data.load_dinov2()["tokens"]
        names = [mmrprune.integrations.__name__, mmrprune.metrics.__name__, mmrprune.reference.__name__]
        idx = mmrprune.select(tokens[:1], None, k=4, method="fps", backend="numpy")
        print(json.dumps({"names": names, "shape": list(idx.shape), "info": callable(mmrprune.info),
                          "bias": callable(bias), "dir": "importance" in dir(mmrprune)}))
    """)
    assert out == {"names": ["mmrprune.integrations", "mmrprune.metrics", "mmrprune.reference"],
                   "shape": [1, 4], "info": True, "bias": True, "dir": True}


def test_unknown_attribute_still_raises():
    import mmrprune
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        mmrprune.nope


@pytest.mark.parametrize("argv", [["--help"], ["speed", "--help"], ["quality", "--help"], ["--preset", "nope"]])
def test_bench_cli_parses_arguments_without_torch(argv):
    out = run_py(f"""
        import contextlib, io, json, sys
        from mmrprune.bench.cli import main
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            try:
                main({argv!r})
            except SystemExit as exc:
                code = exc.code
        print(json.dumps({{"code": code, "usage": "usage:" in buf.getvalue(), "torch": "torch" in sys.modules}}))
    """)
    assert out["usage"]
    assert out["torch"] is False
    assert out["code"] == (0 if "--help" in argv else 2)


def test_info_says_the_auto_choice_in_words():
    from mmrprune.info import format_info, info
    report = info()
    text = format_info(report)
    assert f"backend='auto' runs CPU tensors and NumPy arrays on the {report['auto']['cpu']!r} backend" in text
    assert "->" not in text


def test_info_prints_as_the_report_and_indexes_as_the_dict():
    out = run_py("""
        import importlib, json, sys
        module = importlib.import_module("mmrprune.info")   # the submodule first, then the function
        import mmrprune
        print(json.dumps({"callable": callable(mmrprune.info), "torch": "torch" in sys.modules}))
    """)
    assert out == {"callable": True, "torch": False}
    import mmrprune
    from mmrprune.info import format_info
    report = mmrprune.info()
    text = format_info(dict(report))
    assert str(report) == repr(report) == text and text.startswith("mmrprune ") and "{" not in text
    assert report["backends"]["cpu"]["available"] is dict(report)["backends"]["cpu"]["available"]
    assert json.loads(json.dumps(report)) == dict(report)
    for argv, expect in ((["info"], text), (["info", "--json"], json.dumps(dict(report), indent=2))):
        proc = subprocess.run([sys.executable, "-m", "mmrprune"] + argv, capture_output=True, text=True, cwd=REPO,
                              timeout=120)
        assert proc.returncode == 0 and proc.stdout == expect + "\n", proc.stderr
