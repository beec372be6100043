"""``backend="cpu"``: the C++ extension ``mmrprune._cpu`` (csrc/cpu/), every method.

Images are spread over ``torch.get_num_threads()`` threads (torch's own OpenMP
threads); spare threads (fewer images than threads) help one image.  Each image's
rows are normalised into a float32 scratch buffer (converting float16/bfloat16 on
the way, never upcasting the whole batch) and the greedy loop runs Gram-free, with
AVX-512/AVX2/SSE2 dot kernels picked at load time.  The scratch buffers stay
allocated between calls (at most 256 MiB, ``_cpu.SCRATCH_CACHE_LIMIT``), since
mapping fresh pages costs more than a small selection; :func:`release_scratch`
frees them.
float64 input is handled natively in float64.  The call goes through the
custom op ``mmrprune::cpu_select`` (:mod:`mmrprune.ops`) so it traces
under ``torch.compile``.
"""
from __future__ import annotations

import torch

from .. import ops
from ..batch import SelectionBatch
from ..reference import METHODS
from . import BUILD_HINTS, Backend


def build_facts() -> dict:
    """What setup.py recorded about the build (mmrprune/_build_config.py), or {}."""
    try:
        from .._build_config import BUILD
    except ImportError:
        return {}
    return dict(BUILD)


def status() -> tuple[bool, str]:
    if ops._cpu is None:
        return False, f"C++ extension mmrprune._cpu is not built ({ops.CPU_IMPORT_ERROR}); {BUILD_HINTS['cpu']}"
    facts = build_facts()
    detail = (f"C++ extension, {ops._cpu.isa()} kernels, {torch.get_num_threads()} thread(s) over images; "
              f"built with {facts.get('cpu_compiler', 'unknown compiler')} [{facts.get('cpu_flags', '?')}], "
              f"SIMD {facts.get('cpu_simd', '?')}, {facts.get('cpu_threads', '?')}")
    if facts:
        cuda = (f"built, archs {facts.get('cuda_archs')}, {facts.get('cuda_nvcc')}" if facts.get("cuda_built")
                else facts.get("cuda_status", "not built"))
        detail += f"; CUDA extension: {cuda}"
    return True, detail


def release_scratch() -> int:
    """Free the row scratch the C++ backend keeps between calls; returns the bytes freed
    (0 when the extension is not built)."""
    return int(ops._cpu.release_scratch()) if ops._cpu is not None else 0


def select(batch: SelectionBatch) -> torch.Tensor:
    """``[B, k_max]`` local indices in selection order, -1 past each image's budget."""
    dt = batch.compute_dtype
    rows = batch.rows()                                      # a view for contiguous input
    imp = batch.importance().reshape(-1).to(dt).contiguous()  # same row layout as `rows`
    q = batch.dpp_quality().reshape(-1).to(dt).contiguous() if batch.method == "dpp" else None
    p = batch.params
    alpha = float(p.get("alpha", 1.0)) if batch.method == "d2pruner" else 1.0
    grid = p.get("grid") if batch.method == "d2pruner" else None
    return torch.ops.mmrprune.cpu_select(
        rows, imp, q, batch.starts.contiguous(), batch.lengths.contiguous(), batch.ks.contiguous(), batch.k_max,
        batch.method, float(batch.lam), float(p.get("pivot_ratio", 0.5)), alpha, float(p.get("tau", 0.5)),
        int(p.get("radius", 1)), int(grid[1]) if grid is not None else 0)


def workspace(batch: SelectionBatch) -> int:
    """Per-thread scratch (whole blocks of SCRATCH_ALIGN), one image at a time per thread, plus
    the compute-dtype importance and quality rows (and the contiguous rows of non-contiguous
    features)."""
    n, dim, k = batch.max_length(), batch.dim, int(batch.k_max)
    rows = batch.features.numel() // dim
    c = batch.compute_dtype.itemsize
    threads = max(1, min(torch.get_num_threads(), batch.batch_size))
    align = ops._cpu.SCRATCH_ALIGN if ops._cpu is not None else 1
    per_image = -(-n * dim * c // align) * align + 6 * n * 8
    if batch.method == "dpp":
        per_image += n * k * c
    return batch.rows_copy_bytes() + 2 * rows * c + threads * per_image


BACKEND = Backend(
    name="cpu",
    methods=METHODS,
    device_types=("cpu",),
    select=select,
    status=status,
    workspace=workspace,
)
