"""``anchor`` baselines: greedy selection written the way published pruning code does it.

The public implementations of MMR-style (IDPruner) and max-min (DivPrune)
selection loop over images in Python, build the full float32 N x N similarity
matrix of each image, and run every greedy step as a few separate PyTorch ops
with a host sync (``.item()``) to read the pick.  These functions reproduce
that *style* (not anyone's code) so benchmarks can report what a fused kernel
gains over it.  They follow the same contract as :mod:`mmrprune.reference`
(same scores, same tie rule), and the test suite checks that they agree.
"""
from __future__ import annotations

import torch

from .reference import IMP_EPS, NORM_EPS


def _cosine_matrix(x: torch.Tensor) -> torch.Tensor:
    x = x.float()
    x = x / x.norm(dim=-1, keepdim=True).clamp_min(NORM_EPS)
    return x @ x.T


def _anchor_steps(first: int, n: int, k: int, state: torch.Tensor, score_of, update) -> torch.Tensor:
    """Steps 2..k of a greedy selection, one ``.item()`` host sync per step: pick
    ``argmax score_of(state)`` over untaken tokens, then ``state = update(state, pick)``."""
    chosen = [first]
    taken = torch.zeros(n, dtype=torch.bool, device=state.device)
    taken[first] = True
    for _ in range(min(k, n) - 1):
        score = score_of(state).masked_fill(taken, float("-inf"))
        j = int(torch.argmax(score).item())
        chosen.append(j)
        taken[j] = True
        state = update(state, j)
    return torch.tensor(chosen, dtype=torch.int64)


def anchor_mmr(features: torch.Tensor, importance: torch.Tensor | None, k: int, lam: float = 0.5) -> list:
    """Per image: full fp32 similarity matrix, then K steps of separate ops + ``.item()``."""
    picks = []
    for b in range(features.shape[0]):
        sim = _cosine_matrix(features[b])
        n = sim.shape[0]
        if importance is None:
            imp = torch.zeros(n, device=sim.device)
        else:
            w = importance[b].float()
            imp = (w - w.min()) / (w.max() - w.min() + IMP_EPS)
        first = int(torch.argmax(imp).item())
        picks.append(_anchor_steps(first, n, k, sim[first].clone(), lambda m: lam * imp - (1 - lam) * m,
                                   lambda m, j: torch.maximum(m, sim[j])))
    return picks


def anchor_divprune(features: torch.Tensor, k: int) -> list:
    """Per image: full fp32 cosine-distance matrix, then K steps of separate ops + ``.item()``."""
    picks = []
    for b in range(features.shape[0]):
        dist = 1.0 - _cosine_matrix(features[b])
        n = dist.shape[0]
        if n == 1:
            first = 0
        else:
            off = dist + torch.diag(torch.full((n,), float("inf"), device=dist.device))
            first = int(torch.argmax(off.min(dim=1).values).item())
        picks.append(_anchor_steps(first, n, k, dist[first].clone(), lambda d: d,
                                   lambda d, j: torch.minimum(d, dist[j])))
    return picks


ANCHORS = {"mmr": anchor_mmr, "divprune": anchor_divprune}
