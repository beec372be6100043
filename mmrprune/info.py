"""``mmrprune.info()`` / ``python -m mmrprune info``: what this installation can run."""
from __future__ import annotations

import platform

# Loaded by ``import mmrprune`` itself (so that ``mmrprune.info`` stays the function even after
# ``import mmrprune.info``): it imports dispatch, and with it torch, only when called.


class Info(dict):
    """The report of :func:`info`: a plain ``dict`` (``report["backends"]["cpu"]["available"]``,
    ``json.dumps(report)``) that prints as the readable text of ``python -m mmrprune info``."""

    def __str__(self) -> str:
        return format_info(self)

    __repr__ = __str__   # a REPL echo reads like print(); dict(report) gives the plain mapping


def info() -> Info:
    """Versions and, for each backend, whether it is available and why (not); ``print`` it to
    read it, index it like the ``dict`` it is."""
    import numpy
    import torch

    from . import dispatch
    try:
        import triton
        triton_version = triton.__version__
    except Exception:  # triton is optional on CPU-only machines
        triton_version = None
    from . import __version__
    backends = {}
    for name in dispatch.BACKENDS:
        ok, detail = dispatch.status(name)
        hint = "" if ok else dispatch.how_to_get(name, detail)
        backends[name] = {"available": ok, "detail": detail + (f" — to get it, {hint}" if hint else "")}
    return Info({
        "mmrprune": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton_version,
        "numpy": numpy.__version__,
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "auto": {dev: next((b for b in order if backends[b]["available"]), None)
                 for dev, order in dispatch.AUTO_ORDER.items()},
        "backends": backends,
    })


def format_info(report: dict) -> str:
    from . import dispatch
    lines = [f"mmrprune {report['mmrprune']}  (python {report['python']}, torch {report['torch']}, "
             f"triton {report['triton']}, numpy {report['numpy']})",
             f"cuda device: {report['cuda_device'] or 'none'}",
             "backends:"]
    for name, b in report["backends"].items():
        lines.append(f"  {name:<8} {'yes' if b['available'] else 'no ':<4} {b['detail']}")
    for dev, b in report["auto"].items():
        where = "CPU tensors and NumPy arrays" if dev == "cpu" else f"{dev.upper()} tensors"
        lines.append(f"backend='auto' runs {where} on the {b!r} backend" if b else
                     f"backend='auto' has no backend for {where} here")
    lines.append("  (the first available of " + "; ".join(f"{dev}: {' > '.join(order)}"
                                                        for dev, order in dispatch.AUTO_ORDER.items())
                 + ", skipping a backend that lacks the method)")
    return "\n".join(lines)
