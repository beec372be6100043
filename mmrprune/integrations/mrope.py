"""Qwen-style M-RoPE positions of a token sequence, independent of any model library.

Qwen2-VL, Qwen2.5-VL and Qwen3-VL give every token a ``(t, h, w)`` position.  Text tokens take
``(p, p, p)`` for consecutive ``p``; a media grid of ``t x h x w`` merged tokens starting at ``s``
takes ``(s + floor(i * t_scale), s + j, s + l)``; whatever follows starts at ``max + 1`` of the
block before it.  Qwen3-VL lays a video out as, per frame, its timestamp text, ``<vision_start>``,
a ``1 x h x w`` grid and ``<vision_end>``.  A pruned sequence keeps each kept token's position
from the unpruned sequence, and text keeps the unpruned numbering.
"""
from __future__ import annotations

from typing import Sequence, Union

import numpy as np
import torch


def grid_positions(t: int, h: int, w: int, t_scale: float = 1.0) -> np.ndarray:
    """``[3, t*h*w]`` int64 positions of a ``t x h x w`` grid starting at 0, row-major (t, h, w)."""
    grid = np.indices((t, h, w)).reshape(3, -1).astype(np.int64)
    if t_scale != 1.0:
        grid[0] = (grid[0] * t_scale).astype(np.int64)
    return grid


def layout(parts: Sequence[Union[int, np.ndarray]]) -> np.ndarray:
    """``[3, L]`` positions of a sequence of parts starting at 0: an ``int`` is that many text
    tokens, an array is a grid block's ``[3, n]`` positions (as :func:`grid_positions` gives)."""
    chunks, start = [], 0
    for part in parts:
        if isinstance(part, (int, np.integer)):
            chunks.append(np.broadcast_to(np.arange(start, start + int(part), dtype=np.int64), (3, int(part))))
            start += int(part)
        else:
            chunks.append(part + start)
            if part.shape[1]:
                start += int(part.max()) + 1
    return np.concatenate(chunks, axis=1) if chunks else np.zeros((3, 0), np.int64)


def extent(positions: np.ndarray) -> int:
    """How far a block moves the numbering of what follows it: ``max + 1`` (0 when empty)."""
    return int(positions.max()) + 1 if positions.size else 0


# Positions carried as embedding columns must survive the embedding dtype exactly: bfloat16
# holds integers exactly only up to 256, so each coordinate travels as base-256 digits.
_DIGITS = 3                                   # coordinates below 256**3 (16.7 M)
POSITION_COLUMNS = 3 * _DIGITS


def encode(positions: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``[3, R]`` non-negative int positions -> ``[R, POSITION_COLUMNS]`` columns of ``dtype``."""
    p = positions.to(torch.int64)
    if p.numel() and (int(p.min()) < 0 or int(p.max()) >= 256 ** _DIGITS):
        raise ValueError(f"M-RoPE positions must lie in [0, {256 ** _DIGITS}), got "
                         f"[{int(p.min())}, {int(p.max())}]")
    digits = [(p >> (8 * d)) & 255 for d in range(_DIGITS)]     # each [3, R]
    return torch.cat(digits, dim=0).T.to(dtype)


def decode(columns: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`encode`: ``[R, POSITION_COLUMNS]`` -> ``[3, R]`` int64."""
    digits = columns.T.round().to(torch.int64).reshape(_DIGITS, 3, -1)
    return sum(digits[d] << (8 * d) for d in range(_DIGITS))
