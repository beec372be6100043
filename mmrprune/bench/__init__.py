"""Benchmarks: ``mmrprune-bench speed`` (timings) and ``mmrprune-bench quality`` (IDPruner Sec. 3).

Run ``mmrprune-bench --help`` or ``python -m mmrprune.bench --help``.  Records
follow docs/contract.md, "Benchmark records" (see :mod:`mmrprune.bench.records`).
"""
from .cli import main

__all__ = ["main"]
