"""Every benchmark writer leaves the committed results alone unless told ``--update-committed``.

Run from the repository root, where the committed files are: each script's argument parsing
resolves where it would write (nothing is measured), and the CLI subcommands refuse a path
into a committed folder before running anything."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from mmrprune.bench import cli, records

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--tokens", "64", "--dim", "16", "--batch", "1", "--k", "4", "--repeats", "1", "--quiet",
        "--backend", "numpy", "--method", "topk"]

# script, the arguments a run needs besides the output, the committed file --update-committed rewrites
SCRIPTS = [
    ("cpu_targets", [], "bench/results/cpu_targets.json"),
    ("cpu_targets", ["--only-threads"], "bench/results/cpu_threads_b1.json"),
    ("cpu_ab", ["--baseline", "/nonexistent"], "bench/results/cpu_ab.json"),
    ("rounds_reference", [], "bench/results/rounds_reference.json"),
    ("extract_tokens", [], "mmrprune/data/dinov2_vits14_448.npz"),
    ("train_probe", [], "mmrprune/data/fmnist_probe_dinov2_vits14_224.npz"),
]
IDS = ["cpu_targets", "cpu_targets-threads", "cpu_ab", "rounds_reference", "extract_tokens", "train_probe"]


@pytest.fixture(scope="module")
def tracked():
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, text=True, timeout=60)
    except OSError:
        pytest.skip("git is not available")
    if out.returncode != 0:
        pytest.skip("not a git checkout")
    return set(out.stdout.split("\0"))


@pytest.fixture
def at_repo_root(monkeypatch):
    """cwd = the repository root; the fresh folders a test makes under bench-out/ are removed."""
    monkeypatch.chdir(REPO)
    fresh = os.path.join(REPO, records.FRESH_OUT)
    existed = os.path.isdir(fresh)
    before = set(os.listdir(fresh)) if existed else set()
    yield
    if os.path.isdir(fresh):
        for name in set(os.listdir(fresh)) - before:
            os.rmdir(os.path.join(fresh, name))   # empty: nothing was written
        if not existed:
            os.rmdir(fresh)


def _script(name):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", os.path.join(REPO, "bench", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name, extra, committed", SCRIPTS, ids=IDS)
def test_script_default_destination_is_a_fresh_folder(at_repo_root, tracked, name, extra, committed):
    assert committed in tracked
    out = os.path.relpath(_script(name).parse_args(extra).out)
    assert out not in tracked and records.committed_dir(out) is None
    assert out.startswith(records.FRESH_OUT + os.sep) and os.path.basename(out) == os.path.basename(committed)


@pytest.mark.parametrize("name, extra, committed", SCRIPTS, ids=IDS)
def test_script_update_committed_rewrites_the_committed_file_only(at_repo_root, name, extra, committed, capsys):
    module = _script(name)
    assert module.parse_args(extra + ["--update-committed"]).out == committed
    for argv, message in ((["--out", committed], "holds committed files"),
                          (["--out", os.path.join(os.path.dirname(committed), "new.json")], "holds committed files"),
                          (["--out", "elsewhere.json", "--update-committed"], "drop --out")):
        with pytest.raises(SystemExit) as exc:
            module.parse_args(extra + argv)
        assert exc.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("name", sorted({s[0] for s in SCRIPTS}))
def test_script_help_loads_no_torch(name):
    code = ("import runpy, sys\n"
            f"sys.argv = [{name!r}, '--help']\n"
            "try:\n"
            f"    runpy.run_path({os.path.join('bench', name + '.py')!r}, run_name='__main__')\n"
            "except SystemExit as exc:\n"
            "    assert exc.code == 0, exc.code\n"
            "print('torch' in sys.modules)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "--update-committed" in proc.stdout and proc.stdout.split()[-1] == "False"


@pytest.mark.parametrize("argv", [
    ["quality", "--out-dir", "bench/results"],
    ["quality", "--out-dir", "bench-out/q", "--figure", "bench/figures/token_masks.png"],
    ["downstream", "--out-dir", "bench/results"],
    ["downstream", "--quick", "--plot", "bench/figures/downstream.png"],
    ["speed", "--json", "bench/results/speed_cpu_default.json"] + TINY,
    ["speed", "--csv", "./bench/results/new.csv"] + TINY,
    ["speed", "--plot", "mmrprune/data/speed.png"] + TINY,
], ids=["quality-out-dir", "quality-figure", "downstream-out-dir", "downstream-quick-plot", "speed-json",
        "speed-csv", "speed-plot"])
def test_cli_refuses_committed_paths_without_the_flag(at_repo_root, monkeypatch, capsys, argv):
    from mmrprune.bench import downstream, quality, speed
    monkeypatch.setattr(downstream, "check_inputs", lambda cfg: None)
    # were a path let through, the run stops here, before it writes over a committed file
    for module, name in ((downstream, "run_downstream"), (quality, "run_quality"), (speed, "run_sweep")):
        monkeypatch.setattr(module, name, lambda *a, **k: pytest.fail("ran with a committed output path"))
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "holds committed files" in err and "--update-committed" in err


def test_speed_update_committed_writes_the_given_committed_path(tmp_path, monkeypatch, capsys):
    (tmp_path / "bench" / "results").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "bench" / "results" / "speed.json"
    path.write_text("committed\n")
    with pytest.raises(SystemExit) as exc:
        cli.main(TINY + ["--json", "bench/results/speed.json"])
    assert exc.value.code == 2 and path.read_text() == "committed\n"
    assert cli.main(TINY + ["--json", "bench/results/speed.json", "--update-committed"]) == 0
    assert json.loads(path.read_text())[0]["backend"] == "numpy"
    with pytest.raises(SystemExit) as exc:
        cli.main(TINY + ["--update-committed"])
    assert exc.value.code == 2 and "give the committed --json/--csv/--plot" in capsys.readouterr().err
