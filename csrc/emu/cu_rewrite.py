#!/usr/bin/env python3
"""Rewrite a ``.cu`` file into host C++ for ``csrc/emu/cuda_emu.h`` (line numbers kept).

Only what no preprocessor macro can express is rewritten; the kernels stay as written:

* ``kernel<<<grid, block[, smem[, stream]]>>>(args)``
  becomes ``kernel | ::cuda_emu::launch_config(grid, block, ...).args(args)``;
* ``extern __shared__ [__align__(N)] T name[];`` becomes ``CUDA_EMU_EXTERN_SHARED(T, name);``
* ``__shared__ [__align__(N)] T name[D1]...;`` becomes ``CUDA_EMU_SHARED(T, name, [D1]...);``

Any other ``__shared__`` is left in place, and cuda_emu.h turns it into a compile error (it
would otherwise silently become a per-thread variable).  Each substitution stays on its line,
and a ``#line 1 "<display name>"`` header makes compiler and emulator messages point at the
original file.

usage: cu_rewrite.py SRC.cu [DISPLAY_NAME] > OUT.cpp
"""
from __future__ import annotations

import re
import sys

_TYPE = r"((?:const\s+|volatile\s+|unsigned\s+|signed\s+)*[A-Za-z_][\w:]*(?:\s*<[^;<>]*>)?)"
_ALIGN = r"(?:__align__\s*\(\s*\d+\s*\)\s*)?"
_EXTERN_SHARED = re.compile(r"extern\s+__shared__\s+" + _ALIGN + _TYPE + r"\s+" + _ALIGN + r"(\w+)\s*\[\s*\]\s*;")
_SHARED = re.compile(r"(?<![\w])__shared__\s+" + _ALIGN + _TYPE + r"\s+" + _ALIGN + r"(\w+)\s*((?:\[[^\];]+\]\s*)+);")
_LAUNCH_OPEN = re.compile(r"<<<")
_LAUNCH_CLOSE = re.compile(r">>>\s*\(")


def rewrite(src: str) -> str:
    """The host C++ text of one CUDA source (raises ValueError on launch syntax it cannot map)."""
    src = _EXTERN_SHARED.sub(lambda m: f"CUDA_EMU_EXTERN_SHARED({m.group(1)}, {m.group(2)});", src)
    src = _SHARED.sub(lambda m: f"CUDA_EMU_SHARED({m.group(1)}, {m.group(2)}, {m.group(3).strip()});", src)
    opened, closed = len(_LAUNCH_OPEN.findall(src)), len(_LAUNCH_CLOSE.findall(src))
    if opened != closed:
        raise ValueError(f"cu_rewrite: {opened} '<<<' but {closed} '>>>(': a launch the rewrite cannot map")
    src = _LAUNCH_OPEN.sub(" | ::cuda_emu::launch_config(", src)
    return _LAUNCH_CLOSE.sub(").args(", src)


def rewrite_file(path: str, out_path: str, display_name: str | None = None) -> None:
    """Write the rewrite of ``path`` to ``out_path`` (only when the text changed, so that an
    incremental build does not recompile an unchanged source)."""
    with open(path, encoding="utf-8") as f:
        text = f'#line 1 "{display_name or path}"\n' + rewrite(f.read())
    try:
        with open(out_path, encoding="utf-8") as f:
            if f.read() == text:
                return
    except OSError:
        pass
    with open(out_path, "w", encoding="utf-8") as f:
        f.write(text)


def main(argv: list[str]) -> int:
    if len(argv) not in (2, 3):
        sys.stderr.write(__doc__)
        return 2
    with open(argv[1], encoding="utf-8") as f:
        sys.stdout.write(f'#line 1 "{argv[2] if len(argv) > 2 else argv[1]}"\n' + rewrite(f.read()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
