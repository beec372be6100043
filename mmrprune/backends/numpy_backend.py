"""``backend="numpy"``: the float64 reference, one image at a time (slow; ground truth)."""
from __future__ import annotations

import numpy as np
import torch

from ..batch import SelectionBatch
from ..reference import METHODS, select_rounds
from . import Backend

# candidates per round: the Triton kernel's default, so both backends report comparable round counts
MAX_ROUND = 8


def select(batch: SelectionBatch) -> tuple[torch.Tensor, dict]:
    rows = batch.rows().detach().cpu().to(torch.float64).numpy()
    weights = None if batch.weights is None else batch.weights.detach().cpu().to(torch.float64).reshape(-1).numpy()
    starts, lengths, ks = (t.cpu().tolist() for t in (batch.starts, batch.lengths, batch.ks))
    out = np.full((batch.batch_size, batch.k_max), -1, dtype=np.int64)
    rounds = np.zeros(batch.batch_size, dtype=np.int64)
    for b, (s, n, k) in enumerate(zip(starts, lengths, ks)):
        if k == 0:
            continue
        w = None if weights is None else weights[s:s + n]
        out[b, :k], rounds[b] = select_rounds(rows[s:s + n], w, k, batch.method, batch.lam, MAX_ROUND,
                                              **batch.params)
    return torch.from_numpy(out).to(batch.device), {"rounds": torch.from_numpy(rounds).to(batch.device)}


def workspace(batch: SelectionBatch) -> int:
    """float64, one image at a time, plus a float64 copy of every row (and the contiguous rows
    of non-contiguous features)."""
    n, dim, k = batch.max_length(), batch.dim, int(batch.k_max)
    rows = batch.features.numel() // dim
    per_image = 2 * n * dim * 8 + 4 * n * 8          # x * x and x̂ while normalising
    if batch.method == "dpp":
        per_image += k * n * 8
    elif batch.method == "divprune":
        per_image += 2 * n * n * 8                     # xh @ xh.T and 1 - it
    elif batch.method == "d2pruner":
        per_image += 3 * n * n * 8 + n * n             # sims, near, their sum, the edge mask
    return batch.rows_copy_bytes() + rows * dim * 8 + per_image


# always available: its status never changes
BACKEND = Backend(name="numpy", methods=METHODS, device_types=("cpu", "cuda"), select=select,
                  status=lambda: (True, "float64 NumPy reference, one image at a time; always available"),
                  workspace=workspace)
