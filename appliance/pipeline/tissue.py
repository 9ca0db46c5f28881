"""Tissue detection by HSV saturation: stained tissue is coloured, glass and background are not."""

from __future__ import annotations

import numpy as np

# H2G-Net's recipe thresholds saturation at 20 on a 0-255 scale.
SATURATION_THRESHOLD = 20


def saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation (0-255, uint8) of an (H, W, 3) uint8 image.

    Per-channel slices instead of ``max(axis=2)``: reductions over a 3-wide last axis are ~30x slower.
    """
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    hi = np.maximum(np.maximum(r, g), b).astype(np.uint16)
    lo = np.minimum(np.minimum(r, g), b).astype(np.uint16)
    sat = np.zeros(hi.shape, dtype=np.uint16)
    np.divide((hi - lo) * 255, hi, out=sat, where=hi > 0, casting="unsafe")
    return sat.astype(np.uint8)


def tissue_mask(rgb: np.ndarray, threshold: int = SATURATION_THRESHOLD, step: int = 2) -> np.ndarray:
    """Boolean tissue mask at 1/``step`` resolution (subsampling keeps this ~0.1 ms per patch)."""
    return saturation(rgb[::step, ::step]) > threshold


def tissue_fraction(rgb: np.ndarray, threshold: int = SATURATION_THRESHOLD, step: int = 2) -> float:
    """Fraction of the image that is tissue."""
    if rgb.size == 0:
        return 0.0
    return float(tissue_mask(rgb, threshold, step).mean())
