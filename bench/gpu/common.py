"""What the stage scripts of ``bench/gpu_session.sh`` share: this checkout first on
``sys.path``, the two targets they run on, and how they write their JSON.

Target ``gpu``: the ``cuda`` and ``triton`` backends on CUDA tensors.  Target ``dry-run``
(``--dry-run``): the same code on CPU tensors, ``cuda`` replaced by ``cuda_emu`` (the
unmodified CUDA kernels run by the CPU emulator) and ``triton`` by Triton's interpreter,
at tiny shapes.  ``TRITON_INTERPRET=1`` must be set before Triton is first imported,
so importing this module with ``--dry-run`` on the command line sets it.
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TESTS = os.path.join(ROOT, "tests")
# this checkout's mmrprune, and the test helpers (tests/certify.py, tests/test_fuzz.py) it reuses
for _path in (TESTS, ROOT):
    if _path not in sys.path:
        sys.path.insert(0, _path)

# The dry run's environment: Triton's interpreter.  Its scripts also ask Triton for one pick per
# round (max_round=1, see tuning()): the interpreter runs each round's top-R sort in NumPy, about
# 0.25 s a round at N = 16; the multi-pick rounds run under the interpreter in
# tests/test_triton_interpret.py.
DRY_ENV = {"TRITON_INTERPRET": "1"}
DRY_RUN = "--dry-run" in sys.argv[1:]
if DRY_RUN:
    for _key, _value in DRY_ENV.items():
        os.environ.setdefault(_key, _value)

COMMIT_ENV = "MMRPRUNE_SESSION_COMMIT"       # set by session.py --commit: the device's copy has no .git
MODES = ("row", "gram")                      # similarity rows on demand / from the precomputed Gram
SIMS = {"row": "rows", "gram": "gram"}       # each mode as mmrprune.select's sim= argument


@dataclass(frozen=True)
class Target:
    """Where a stage runs: device type and the names of the two kernel backends there."""
    dry_run: bool

    @property
    def name(self) -> str:
        return "dry-run" if self.dry_run else "gpu"

    @property
    def device(self) -> str:
        return "cpu" if self.dry_run else "cuda"

    @property
    def cuda_backend(self) -> str:
        return "cuda_emu" if self.dry_run else "cuda"

    @property
    def backends(self) -> tuple:
        return (self.cuda_backend, "triton")

    def size(self, gpu, dry):
        """A problem size: the GPU's, or the dry run's (the emulator and the interpreter are slow)."""
        return dry if self.dry_run else gpu

    def device_name(self) -> str:
        from mmrprune.bench.records import device_name
        return device_name(self.device)

    def synchronize(self) -> None:
        if not self.dry_run:
            import torch
            torch.cuda.synchronize()


TARGET = Target(DRY_RUN)


def tuning(mode: str, backend: str) -> dict:
    """``select``'s tuning keywords forcing one similarity source (``row`` or ``gram``) on a
    kernel backend; in the dry run Triton also commits one pick per round (see DRY_ENV)."""
    if mode not in MODES:
        raise ValueError(f"similarity mode must be one of {MODES}, got {mode!r}")
    return {"sim": SIMS[mode], "max_round": 1 if (DRY_RUN and backend == "triton") else None}


def kernel_methods(backend: str) -> tuple:
    """The methods a backend runs in its own fused kernels (not through a torch fallback)."""
    if backend == "triton":
        from mmrprune.backends.triton_backend import METHODS
        return tuple(METHODS)
    from mmrprune.backends.cuda_backend import KERNEL_METHODS
    return tuple(KERNEL_METHODS)


def max_round(backend: str) -> int:
    """Picks per round the backend's maxsim kernel commits at most under :func:`tuning` (the
    rounds check needs it)."""
    requested = tuning(MODES[0], backend)["max_round"]
    if requested is not None:
        return requested
    if backend == "triton":
        from mmrprune.triton_kernels import greedy
        return int(greedy.MAX_ROUND)
    from mmrprune.backends import cuda_backend, cuda_emu_backend
    kernels = cuda_emu_backend.KERNELS if backend == "cuda_emu" else cuda_backend.KERNELS
    return kernels.max_round()


def commit() -> str:
    """The commit the records name: ``--commit`` of the session, else ``git rev-parse``."""
    from mmrprune.bench.records import git_commit
    return os.environ.get(COMMIT_ENV) or git_commit()


def record_fields(script: str, argv) -> dict:
    """The fields every benchmark record of a stage script shares (docs/contract.md, "Benchmark
    records"), with the session's commit, the script's command line and the CUDA, Python and
    NumPy versions besides torch's and Triton's."""
    import platform

    import numpy
    import torch
    from mmrprune.bench.records import environment
    fields = environment(TARGET.device, None)
    args = list(sys.argv[1:] if argv is None else argv)
    fields.update(commit=commit(), command=" ".join(["python3", os.path.relpath(script, ROOT)] + args),
                  cuda_runtime=torch.version.cuda, python=platform.python_version(), numpy=numpy.__version__,
                  session=TARGET.name)
    return fields


def exit_status(tag: str, failed: list) -> int:
    """Print each failure of a stage script as ``[tag] FAILED ...``; 1 if there was any, else 0."""
    for line in failed:
        print(f"[{tag}] FAILED {line}", flush=True)
    return 1 if failed else 0


def write_json(path: str, payload) -> None:
    """Write ``payload`` as JSON atomically: a kill leaves the old file or the new one, never half."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=1, default=str)
        f.write("\n")
    os.replace(tmp, path)
