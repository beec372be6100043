"""The workspace the GPU targets (c) and (d) need per method, as docs/api.md prints it.

    python bench/workspace_targets.py            # print the table
    python bench/workspace_targets.py --update   # rewrite it in docs/api.md

The figures are ``mmrprune.workspace_bytes`` of meta tensors (bf16, ``keep_ratio=0.25``,
``backend="cuda"``, the default ``sim="auto"``): estimates from the code, not measurements.
tests/test_workspace_api.py checks that the docs hold what this prints.
"""
from __future__ import annotations

import os
import sys

import torch

import mmrprune
from mmrprune import workspace

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(ROOT, "docs", "api.md")
BEGIN = "<!-- workspace-targets: bench/workspace_targets.py --update writes this table -->"
END = "<!-- end workspace-targets -->"
TARGETS = {"(c)": (64, 2691, 3584), "(d)": (1, 16384, 3584)}
METHODS = ("mmr", "fps", "hybrid", "divprune", "dpp", "topk")
INDENT = "    "   # the table sits in a list item of docs/api.md
GiB = 1 << 30
MiB = 1 << 20


def need(target: str, method: str) -> int:
    b, n, d = TARGETS[target]
    x = torch.empty(b, n, d, dtype=torch.bfloat16, device="meta")
    w = torch.empty(b, n, device="meta")
    return mmrprune.workspace_bytes(x, w, keep_ratio=0.25, method=method, backend="cuda")


def table() -> str:
    limit = workspace.DEFAULT_LIMIT_BYTES
    lines = [BEGIN, "| call | " + " | ".join(METHODS) + " |", "|---" * (len(METHODS) + 1) + "|"]
    for target, (b, n, d) in TARGETS.items():
        cells = []
        for method in METHODS:
            nbytes = need(target, method)
            size = f"{nbytes / GiB:.2f} GiB" if nbytes >= GiB // 10 else f"{nbytes / MiB:.1f} MiB"   # topk's MiB
            cells.append(size + (" (refused by default)" if nbytes > limit else ""))
        lines.append(f"| {target} B={b}, N={n}, D={d} | " + " | ".join(cells) + " |")
    lines.append(END)
    return "\n".join(INDENT + line for line in lines)


def documented() -> str:
    """The table as docs/api.md has it (markers included), or "" when it has none."""
    with open(DOC, encoding="utf-8") as f:
        text = f.read()
    start, end = text.find(INDENT + BEGIN), text.find(END)
    return text[start:end + len(END)] if start >= 0 and end > start else ""


def update() -> None:
    with open(DOC, encoding="utf-8") as f:
        text = f.read()
    old = documented()
    if not old:
        raise SystemExit(f"{DOC}: no table between {BEGIN!r} and {END!r} to update")
    with open(DOC, "w", encoding="utf-8") as f:
        f.write(text.replace(old, table()))


if __name__ == "__main__":
    if sys.argv[1:] == ["--update"]:
        update()
    elif sys.argv[1:]:
        raise SystemExit(__doc__)
    print(table())
