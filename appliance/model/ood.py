"""How unlike the development cases a case looks to the model itself: a distance of its patches' features (the
first stage's pooled penultimate layer, every member's) from the development patches' distribution.

Per patch, a Mahalanobis distance in two parts (Lee et al., NeurIPS 2018, on a principal subspace; the residual
as in PCA reconstruction-error detectors): the whitened coordinates on the ``k`` largest principal directions
of the development features, plus the rest of the centred vector scaled by the mean variance left outside
them, divided by the feature count so that a typical development patch reads about 1. The case's score is the
median over its scored patches, so a few odd patches (folds, dust, a pen mark) do not move it. Pure numpy; the
reference is fitted by the model build on development patches and shipped as one small file.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np

from appliance.errors import EngineError


@dataclass(frozen=True)
class OodReference:
    mean: np.ndarray  # (F,) float32
    whiten: np.ndarray  # (F, k) float32: principal directions divided by the square root of their variance
    directions: np.ndarray  # (F, k) float32: the same directions, unit length
    residual_var: float  # mean variance per dimension outside the k directions

    @property
    def features(self) -> int:
        return len(self.mean)

    def distances(self, features: np.ndarray) -> np.ndarray:
        """(N, F) features -> (N,) float32 distance per patch (about 1 on development patches)."""
        x = np.asarray(features, dtype=np.float32) - self.mean
        if not len(x):
            return np.zeros(0, np.float32)
        k = self.whiten.shape[1]
        z = x @ np.concatenate([self.whiten, self.directions], axis=1)
        inside = np.einsum("ij,ij->i", z[:, :k], z[:, :k])
        outside = np.maximum(np.einsum("ij,ij->i", x, x) - np.einsum("ij,ij->i", z[:, k:], z[:, k:]), 0.0)
        return ((inside + outside / self.residual_var) / self.features).astype(np.float32)

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        np.savez(buf, mean=self.mean, whiten=self.whiten, directions=self.directions,
                 residual_var=np.array([self.residual_var], np.float64))
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes, *, source: str = "the OOD reference") -> "OodReference":
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as z:
                mean, whiten, directions = (z[k].astype(np.float32) for k in ("mean", "whiten", "directions"))
                residual_var = float(z["residual_var"][0])
        except (OSError, ValueError, KeyError, IndexError) as exc:
            raise EngineError(f"{source} is not a readable OOD reference ({exc})") from None
        f = len(mean)
        if mean.ndim != 1 or whiten.shape != directions.shape or whiten.ndim != 2 or whiten.shape[0] != f \
                or not residual_var > 0 or not np.isfinite(whiten).all():
            raise EngineError(f"{source} has inconsistent shapes: mean {mean.shape}, whiten {whiten.shape}, "
                              f"directions {directions.shape}, residual variance {residual_var}")
        return cls(mean, whiten, directions, residual_var)


def fit_reference(features: np.ndarray, components: int) -> OodReference:
    """The reference of development patches' features (N, F): their mean, the ``components`` largest principal
    directions and the mean variance outside them."""
    x = np.asarray(features, dtype=np.float64)
    mean = x.mean(axis=0)
    cov = np.cov(x - mean, rowvar=False)
    values, vectors = np.linalg.eigh(cov)  # ascending
    values, vectors = values[::-1], vectors[:, ::-1]
    k = int(components)
    if not 0 < k < x.shape[1]:
        raise ValueError(f"components must be between 1 and {x.shape[1] - 1}, got {k}")
    top = np.maximum(values[:k], 1e-12)
    residual_var = float(max(values[k:].mean(), 1e-12))
    return OodReference(mean.astype(np.float32), (vectors[:, :k] / np.sqrt(top)).astype(np.float32),
                        vectors[:, :k].astype(np.float32), residual_var)


def case_score(distances: np.ndarray) -> float | None:
    """A case's score: the median of its patches' distances, each taken to 3 decimals first, as the score is
    (None without patches). The features of one patch differ in their last bits with the batch it was scored
    in; 3 decimals keep the score, and so the call, the same whatever the batching."""
    if not len(distances):
        return None
    return round(float(np.median(np.round(np.asarray(distances, dtype=np.float64), 3))), 3)
