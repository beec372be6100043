"""``backend="numpy"``: the float64 reference, one image at a time (slow; ground truth)."""
from __future__ import annotations

import numpy as np
import torch

from ..batch import SelectionBatch
from ..reference import METHODS, select_one
from . import Backend


def select(batch: SelectionBatch) -> torch.Tensor:
    rows = batch.rows().detach().cpu().to(torch.float64).numpy()
    weights = None if batch.weights is None else batch.weights.detach().cpu().to(torch.float64).reshape(-1).numpy()
    starts, lengths, ks = (t.cpu().tolist() for t in (batch.starts, batch.lengths, batch.ks))
    out = np.full((batch.batch_size, batch.k_max), -1, dtype=np.int64)
    for b, (s, n, k) in enumerate(zip(starts, lengths, ks)):
        if k == 0:
            continue
        w = None if weights is None else weights[s:s + n]
        out[b, :k] = select_one(rows[s:s + n], w, k, batch.method, batch.lam, **batch.params)
    return torch.from_numpy(out).to(batch.device)


# always available: its status never changes
BACKEND = Backend(name="numpy", methods=METHODS, device_types=("cpu", "cuda"), select=select,
                  status=lambda: (True, "float64 NumPy reference, one image at a time; always available"))
