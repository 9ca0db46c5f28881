"""Macenko stain normalisation, fitted once per case and applied as one 3x3 map in optical density.

Macenko et al., "A method for normalizing histology slides for quantitative analysis", ISBI 2009.

Fit (once per case, on a sample of its tissue pixels): optical density OD = -ln((I + 1) / 256); drop pixels
with OD < ``beta`` in any channel (glass); project the rest onto the plane of the two largest eigenvectors of
their OD covariance; the 1st and 99th percentile angles in that plane give the haematoxylin and eosin vectors;
the 99th percentile of each stain's concentration gives its strength.

Apply: concentrations C = OD @ pinv(HE).T, scaled to the reference strengths, re-stained with the reference
vectors. All three steps are linear in OD, so they fold into one 3x3 matrix and a tile costs one table lookup,
one small matmul and one exp.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from appliance.errors import InputError

_OD_LUT = -np.log((np.arange(256, dtype=np.float64) + 1.0) / 256.0).astype(np.float32)


@dataclass(frozen=True)
class StainFit:
    """Stain vectors (columns H, E; unit length, in OD/RGB order) and their 99th percentile strengths."""

    he: np.ndarray  # (3, 2)
    max_c: np.ndarray  # (2,)
    pixels: int  # tissue pixels the fit used

    def to_dict(self) -> dict:
        return {"he": np.round(self.he, 5).tolist(), "max_c": np.round(self.max_c, 5).tolist(), "pixels": self.pixels}

    @classmethod
    def from_dict(cls, d: dict) -> "StainFit":
        he = np.asarray(d["he"], dtype=np.float64)
        max_c = np.asarray(d["max_c"], dtype=np.float64)
        if he.shape != (3, 2) or max_c.shape != (2,):
            raise ValueError("a stain reference needs he as 3x2 and max_c as 2 values")
        return cls(he, max_c, int(d.get("pixels", 0)))


class StainFitError(InputError):
    """Too little stained tissue, or stain vectors that make no sense, to fit a case's stains."""


def optical_density(rgb: np.ndarray) -> np.ndarray:
    """uint8 (..., 3) -> float32 OD (..., 3) by table lookup."""
    return _OD_LUT[rgb]


BETA = 0.15  # optical density below this in any channel is glass or unstained


def stained_od(rgb: np.ndarray, beta: float = BETA) -> np.ndarray:
    """Optical density, (n, 3) float32, of the pixels (any shape ending in 3, uint8) stained in every channel.

    Glass is dropped on the uint8 values, per channel (a reduction over the 3-wide axis is slow), before the
    lookup: the same pixels as OD >= beta in every channel, at a fraction of the cost. The kept pixels are
    gathered as 3-byte items and looked up by OpenCV's table, quicker than numpy's boolean row indexing and
    float lookup (docs/performance.md, "Why the code is shaped so")."""
    px = rgb.reshape(-1, 3)
    stained = _OD_LUT >= beta
    if px.dtype != np.uint8 or not px.flags.c_contiguous or not len(px):
        return _OD_LUT[px[stained[px[:, 0]] & stained[px[:, 1]] & stained[px[:, 2]]]]
    flags = cv2.LUT(px.reshape(-1, 1, 3), stained.astype(np.uint8)).reshape(-1, 3)  # 1 where stained
    kept = take_rows(px, np.flatnonzero(flags[:, 0] & flags[:, 1] & flags[:, 2]))
    if not len(kept):
        return np.zeros((0, 3), np.float32)
    return cv2.LUT(kept.reshape(-1, 1, 3), _OD_LUT.reshape(1, 256)).reshape(-1, 3)


def take_rows(px: np.ndarray, index: np.ndarray) -> np.ndarray:
    """``px[index]`` of a contiguous (n, 3) uint8 array, each row taken as one 3-byte item (quicker than
    numpy's row indexing); any other array is simply indexed."""
    if px.dtype != np.uint8 or px.ndim != 2 or px.shape[1] != 3 or not px.flags.c_contiguous:
        return px[index]
    return px.view(_PIXEL).reshape(-1)[index].view(np.uint8).reshape(-1, 3)


_PIXEL = np.dtype((np.void, 3))


def fit_stains(rgb: np.ndarray, *, beta: float = BETA, alpha: float = 1.0, min_pixels: int = 500,
               max_pixels: int = 200_000, seed: int = 0) -> StainFit:
    """Fit H&E stain vectors to the pixels of one case (any shape ending in 3, uint8)."""
    if rgb.dtype != np.uint8 or rgb.shape[-1] != 3:
        raise InputError(f"stain fitting needs uint8 RGB pixels, got {rgb.dtype} {rgb.shape}")
    od = stained_od(rgb, beta)
    if len(od) > max_pixels:
        od = od[np.random.default_rng(seed).choice(len(od), max_pixels, replace=False)]
    return fit_stains_od(od, alpha=alpha, min_pixels=min_pixels)


def fit_stains_od(od: np.ndarray, *, alpha: float = 1.0, min_pixels: int = 500) -> StainFit:
    """Fit H&E stain vectors to the optical densities (n, 3) float32 of stained pixels (``stained_od``).

    float32 for the per-pixel work (the fit runs at the end of every case, on the path to the verdict),
    float64 for the 3x3 algebra."""
    n = len(od)
    if n < min_pixels:
        raise StainFitError(f"only {n} stained pixels (need {min_pixels}) to fit stain vectors")
    od = np.ascontiguousarray(od, dtype=np.float32)
    centred = od - (np.ones(n, np.float32) @ od) / n  # the mean as a matrix product: far faster than .mean(0)
    _, vecs = np.linalg.eigh((centred.T @ centred).astype(np.float64) / (n - 1))
    plane = vecs[:, 1:3]  # the two largest eigenvalues (eigh sorts ascending)
    plane = plane * np.where(plane.sum(axis=0) < 0, -1.0, 1.0)  # point into positive OD
    proj = plane.T.astype(np.float32) @ od.T
    phi = np.arctan2(proj[1], proj[0])
    lo, hi = np.percentile(phi, [alpha, 100 - alpha]).astype(np.float64)
    v1 = plane @ np.array([np.cos(lo), np.sin(lo)])
    v2 = plane @ np.array([np.cos(hi), np.sin(hi)])
    # haematoxylin absorbs more red than eosin does: it goes first
    he = np.stack([v1, v2], axis=1) if v1[0] > v2[0] else np.stack([v2, v1], axis=1)
    he = he / np.linalg.norm(he, axis=0, keepdims=True)
    if not np.isfinite(he).all() or (he < -0.2).any():
        raise StainFitError("the fitted stain vectors are not H&E-like (negative optical density)")
    conc = np.linalg.pinv(he).astype(np.float32) @ od.T
    max_c = np.percentile(conc, 99, axis=1).astype(np.float64)
    if (max_c <= 1e-3).any():
        raise StainFitError("one of the two stains is absent from the fitted pixels")
    return StainFit(he, max_c, n)


def normalising_map(source: StainFit, reference: StainFit) -> np.ndarray:
    """The 3x3 matrix M with OD_out = OD_in @ M that re-stains ``source`` like ``reference``."""
    scale = np.diag(reference.max_c / source.max_c)
    return (np.linalg.pinv(source.he).T @ scale @ reference.he.T).astype(np.float32)


def apply_map(rgb: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Re-stain uint8 RGB pixels (any shape ending in 3) with a map from ``normalising_map``."""
    od = optical_density(rgb) @ m
    out = 256.0 * np.exp(-np.maximum(od, 0.0)) - 1.0
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def turn_haematoxylin(rgb: np.ndarray, fit: StainFit, degrees: float) -> np.ndarray:
    """Re-colour uint8 RGB pixels as another lab's haematoxylin might look: the H vector of ``fit`` turned by
    ``degrees`` in the H&E plane, away from eosin, with the stain concentrations kept. For robustness tests
    and evaluation, not for the pipeline."""
    h, e = fit.he[:, 0], fit.he[:, 1]
    u = e - (e @ h) * h  # the in-plane direction orthogonal to H, towards E
    u /= np.linalg.norm(u)
    t = np.radians(degrees)
    h_new = np.cos(t) * h - np.sin(t) * u
    m = (np.linalg.pinv(fit.he).T @ np.stack([h_new, e], axis=1).T).astype(np.float32)
    return apply_map(rgb, m)
