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


# always available: its status never changes
BACKEND = Backend(name="numpy", methods=METHODS, device_types=("cpu", "cuda"), select=select,
                  status=lambda: (True, "float64 NumPy reference, one image at a time; always available"))
