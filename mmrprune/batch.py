"""The validated selection problem every backend receives.

Two layouts reach a backend:

* padded: ``features [B, N, D]``, image ``b`` owns rows ``0 .. lengths[b]-1``;
* packed (varlen): ``features [T, D]``, image ``b`` owns rows
  ``starts[b] .. starts[b] + lengths[b] - 1``.

Either way ``features.reshape(-1, D)`` holds image ``b``'s token ``i`` at row
``starts[b] + i``, which is the *segment form* the fused kernels read.  The
torch backend prefers the padded form; :meth:`SelectionBatch.padded` builds it
for packed input.

A backend returns ``[B, k_max]`` int64 *local* token indices (0-based within
the image) in selection order, rows padded with -1 past ``ks[b]``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .reference import IMP_EPS


@dataclass
class SelectionBatch:
    features: torch.Tensor            # [B, N, D] padded or [T, D] packed; never written to
    weights: torch.Tensor | None      # raw importance, [B, N] or [T]; None = all zeros
    lengths: torch.Tensor             # [B] int64, valid tokens per image, on features.device
    starts: torch.Tensor              # [B] int64, first row of each image in features.reshape(-1, D)
    ks: torch.Tensor                  # [B] int64, tokens to keep per image (0 for empty images)
    k_max: int                        # output width
    packed: bool
    method: str
    lam: float
    params: dict = field(default_factory=dict)
    _cache: dict = field(default_factory=dict, repr=False)

    # ------------------------------------------------------------------ shape facts
    @property
    def batch_size(self) -> int:
        return int(self.lengths.shape[0])

    @property
    def dim(self) -> int:
        return int(self.features.shape[-1])

    @property
    def device(self) -> torch.device:
        return self.features.device

    @property
    def compute_dtype(self) -> torch.dtype:
        """Similarities accumulate in float64 for float64 input, float32 otherwise."""
        return torch.float64 if self.features.dtype == torch.float64 else torch.float32

    def rows(self) -> torch.Tensor:
        """``features`` as ``[rows, D]``, contiguous: the segment form of the kernels (a view of
        contiguous features, else a copy: :meth:`rows_copy_bytes`)."""
        return self.features.reshape(-1, self.dim).contiguous()

    def rows_copy_bytes(self) -> int:
        """Bytes :meth:`rows` allocates: 0 for contiguous features (a view), else a whole copy
        (expanded, sliced or transposed input, e.g. ``x.expand(...)``, ``x[..., ::2]``)."""
        return 0 if self.features.is_contiguous() else self.features.numel() * self.features.element_size()

    # ------------------------------------------------------------------ importance
    def _importance_range(self):
        """Per-image (lo, hi) of the raw weights over valid tokens, in compute dtype."""
        if "range" in self._cache:
            return self._cache["range"]
        dt = self.compute_dtype
        w = self.weights.to(dt)
        if self.packed:
            seg = self.segment_ids()
            lo = torch.full((self.batch_size,), float("inf"), dtype=dt, device=self.device)
            hi = torch.full((self.batch_size,), float("-inf"), dtype=dt, device=self.device)
            lo = lo.scatter_reduce(0, seg, w, "amin")
            hi = hi.scatter_reduce(0, seg, w, "amax")
        else:
            valid = self.valid_mask()
            lo = torch.where(valid, w, float("inf")).amin(dim=1)
            hi = torch.where(valid, w, float("-inf")).amax(dim=1)
        self._cache["range"] = (w, lo, hi)
        return self._cache["range"]

    def _per_token(self, per_image: torch.Tensor) -> torch.Tensor:
        """Broadcast a ``[B]`` tensor to the token layout (``[B, 1]`` or ``[T]``)."""
        if self.packed:
            return per_image[self.segment_ids()]
        return per_image[:, None]

    def importance(self) -> torch.Tensor:
        """``Imp = (w - min w) / (max w - min w + 1e-6)`` per image, zeros for ``None``;
        same layout as ``weights`` (``[B, N]`` or ``[T]``), compute dtype, 0 on padding."""
        if "imp" not in self._cache:
            if self.weights is None:
                shape = self.features.shape[:-1]
                imp = torch.zeros(shape, dtype=self.compute_dtype, device=self.device)
            else:
                w, lo, hi = self._importance_range()
                lo_t, hi_t = self._per_token(lo), self._per_token(hi)
                imp = (w - lo_t) / (hi_t - lo_t + IMP_EPS)
                if not self.packed:
                    imp = torch.where(self.valid_mask(), imp, 0.0)
            self._cache["imp"] = imp
        return self._cache["imp"]

    def dpp_quality(self) -> torch.Tensor:
        """DPP quality ``q``: ``Imp``, or 1 for images whose importance is constant or ``None``."""
        if self.weights is None:
            return torch.ones(self.features.shape[:-1], dtype=self.compute_dtype, device=self.device)
        _, lo, hi = self._importance_range()
        constant = self._per_token(hi == lo)
        return torch.where(constant, torch.ones_like(self.importance()), self.importance())

    # ------------------------------------------------------------------ layouts
    def valid_mask(self) -> torch.Tensor:
        """Padded layout: ``[B, N]`` bool, True on valid tokens."""
        n = self.features.shape[1]
        return torch.arange(n, device=self.device)[None, :] < self.lengths[:, None]

    def segment_ids(self) -> torch.Tensor:
        """Packed layout: ``[T]`` int64 image id of each row (without a host sync)."""
        if "seg" not in self._cache:
            t = self.features.shape[0]
            ids = torch.arange(self.batch_size, device=self.device)
            self._cache["seg"] = torch.repeat_interleave(ids, self.lengths, output_size=t)
        return self._cache["seg"]

    def row_layout(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(seg, local, valid)`` ``[rows]`` of :meth:`rows`: image id, position within the
        image and whether the row is a token (False on padding).  No host sync."""
        rows = self.features.numel() // self.dim
        row = torch.arange(rows, device=self.device)
        seg = self.segment_ids() if self.packed else row // self.features.shape[1]
        local = row - self.starts[seg]
        valid = (local >= 0) & (local < self.lengths[seg])
        return seg, local, valid

    def max_length(self) -> int:
        """The padded length ``N`` (at least 1): ``features.shape[1]`` for padded input,
        ``max(lengths)`` for packed input (one host sync)."""
        if not self.packed:
            return int(self.features.shape[1])
        if "n" not in self._cache:
            self._cache["n"] = max(1, int(self.lengths.max().item())) if self.batch_size else 1
        return self._cache["n"]

    def padded_index(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(row index [B, n], valid [B, n])``: the padded layout as rows of :meth:`rows`
        (padding points at row 0, so a gathered copy stays finite)."""
        pos = torch.arange(n, device=self.device)
        valid = pos[None, :] < self.lengths[:, None]
        return torch.where(valid, self.starts[:, None] + pos[None, :], 0), valid

    def padded(self):
        """``(features [B, N, D], importance [B, N], dpp_quality [B, N], valid [B, N])``.

        Packed input is gathered into a padded copy (one host sync for ``N = max length``)."""
        if not self.packed:
            q = self.dpp_quality() if self.method == "dpp" else None
            return self.features, self.importance(), q, self.valid_mask()
        rows, valid = self.padded_index(self.max_length())
        feats = self.features[rows]                             # [B, N, D] copy
        imp = torch.where(valid, self.importance()[rows], 0.0)
        q = torch.where(valid, self.dpp_quality()[rows], 0.0) if self.method == "dpp" else None
        return feats, imp, q, valid
