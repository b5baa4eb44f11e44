"""The 2-D projections a trajectory is drawn in: each fitted once per run, then applied unchanged to every frame.

A basis that is refitted as the rows move turns under the points, so motion on screen would not be motion in the
model. Both choices here are fitted once, on base rows only (base rows never train), so a row that does not move
stays put:

- ``base``: PCA of (a seeded sample of) all base rows. It shows where the new tokens sit in the whole vocabulary,
  but the top two directions of 49,152 or 128,256 rows keep little of their variance (about 11% + 3% on the demo's
  SmolLM2), and the words a researcher asks about are often squeezed into one corner.
- ``focus``: PCA of the base rows nearest (cosine) to the tracked new tokens at the start, together with the
  tracked words' meaning words (``init.constituents``). Its axes are the directions along which *those* rows differ,
  so a word moving toward its meaning word shows as motion toward the marked point.

Each projection says how much variance it keeps, and of which rows: the page prints both.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ...errors import WakelabError
from ..embeddings import top_k_cosine

__all__ = ["PROJECTIONS", "Projection", "fit_focus_projection", "fit_projection"]

#: The projection names a run can choose (``trajectory.projection``); the first fitted is the page's default.
PROJECTIONS = ("focus", "base")
#: Rows projected per pass: the centred float32 copy is this many rows, not all of them.
PROJECT_ROWS = 8192


@dataclass(frozen=True)
class Projection:
    """A 2-D linear map fitted once on base rows: ``(rows - mean) @ axes.T``."""

    mean: np.ndarray  # [d]
    axes: np.ndarray  # [2, d], orthonormal
    explained: tuple[float, float]  # share of the fitted rows' variance along each axis
    name: str = "base"
    fitted_on: str = "the base rows"  # what the explained variance is a share of, as the page says it

    def __call__(self, rows) -> np.ndarray:
        """``[n, 2]`` positions, ``PROJECT_ROWS`` rows at a time (no centred copy of all the rows)."""
        out = np.empty((len(rows), 2), dtype=np.float32)
        for start in range(0, len(rows), PROJECT_ROWS):
            part = rows[start : start + PROJECT_ROWS]
            if isinstance(part, torch.Tensor):
                values = part.detach().float().cpu().numpy()
            else:
                values = np.asarray(part, np.float32)
            out[start : start + len(values)] = (values - self.mean) @ self.axes.T
        return out

    def fingerprint(self) -> str:
        """A short digest of the basis: two runs on one base model (and seed) share it, so their pictures align."""
        digest = hashlib.sha256(np.round(self.axes.astype(np.float64), 4).tobytes())
        digest.update(np.round(self.mean.astype(np.float64), 4).tobytes())
        return digest.hexdigest()[:16]


def _pca(rows: torch.Tensor) -> tuple[np.ndarray, np.ndarray, tuple[float, float]]:
    mean = rows.mean(0)
    _, singular, vh = torch.linalg.svd(rows - mean, full_matrices=False)
    axes = vh[:2].clone()
    # A sign convention, so that refitting on the same rows never mirrors the picture.
    for i in range(2):
        if axes[i][axes[i].abs().argmax()] < 0:
            axes[i] = -axes[i]
    variance = singular.square()
    share = (variance[:2] / variance.sum().clamp_min(1e-30)).tolist()
    share += [0.0] * (2 - len(share))
    return mean.numpy(), axes.numpy(), (float(share[0]), float(share[1]))


def fit_projection(base_rows: torch.Tensor, *, max_rows: int = 20000, seed: int = 0) -> Projection:
    """PCA of (a seeded sample of at most ``max_rows``) base rows; the same rows and seed give the same basis."""
    rows = base_rows.detach()
    if rows.ndim != 2 or rows.shape[0] < 3:
        raise WakelabError(f"a trajectory projection needs at least 3 base rows, got shape {tuple(rows.shape)}")
    if rows.shape[0] > max_rows:  # sampled before the float32 copy: the copy is max_rows x d, whatever the vocabulary
        generator = torch.Generator().manual_seed(int(seed))
        rows = rows[torch.randperm(rows.shape[0], generator=generator)[:max_rows].sort().values.to(rows.device)]
    mean, axes, share = _pca(rows.float().cpu())
    return Projection(mean, axes, share, "base", "the base rows")


def fit_focus_projection(
    base_rows: torch.Tensor,
    anchors: torch.Tensor,
    *,
    meaning_ids: Sequence[int] = (),
    rows_wanted: int = 2000,
    max_anchors: int = 2000,
    seed: int = 0,
) -> Projection | None:
    """PCA of the base rows nearest to ``anchors`` (the tracked new rows at the start) plus the meaning words' rows.

    Each anchor brings its ``rows_wanted / anchors`` nearest base rows (5 to 50). More than ``max_anchors`` anchors
    are sampled (seeded). None when fewer than 3 distinct base rows result (nothing to fit).
    """
    base = base_rows.detach()
    anchors = anchors.detach().float()
    if anchors.shape[0] > max_anchors:
        generator = torch.Generator().manual_seed(int(seed) + 2)
        anchors = anchors[torch.randperm(anchors.shape[0], generator=generator)[:max_anchors]]
    chosen: set[int] = {int(i) for i in meaning_ids}
    if anchors.shape[0]:
        k = max(5, min(50, rows_wanted // anchors.shape[0]))
        chosen |= set(top_k_cosine(anchors, base, min(k, base.shape[0]))[1].reshape(-1).tolist())
    if len(chosen) < 3:
        return None
    ids = torch.tensor(sorted(chosen))
    mean, axes, share = _pca(base[ids.to(base.device)].float().cpu())
    what = "the new tokens' nearest base rows" + (" and their meaning words" if len(meaning_ids) else "")
    return Projection(mean, axes, share, "focus", f"{len(ids)} base rows: {what}")
