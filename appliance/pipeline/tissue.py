"""Tissue detection by HSV saturation: stained tissue is coloured, glass and background are not.

The H2G-Net recipe: saturation above 20 (0-255 scale) at low resolution, then a morphological closing
with a 5x5 and then a 3x3 square to fill the pale gaps inside tissue.

Per tile, on the path of every patch: the subsampling, the threshold and the closings run in OpenCV, which
gives the same masks as the numpy functions here bit for bit (tests/appliance/test_image_logic.py) in well
under their time (docs/performance.md, "Why the code is shaped so"). The numpy functions stay as the
definition and for shapes OpenCV is not given (an odd-sized tile's subsampling, arrays of patches).
"""

from __future__ import annotations

import functools

import cv2
import numpy as np

cv2.setNumThreads(1)  # each call is small; the cores belong to the inference engine

SATURATION_THRESHOLD = 20
MASK_STEP = 2  # the mask is computed at 1/MASK_STEP resolution
CLOSING = (5, 3)


def saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation (0-255, uint8) of an (..., 3) uint8 image.

    Per-channel slices instead of ``max(axis=-1)``: numpy's reductions over a 3-wide last axis are many times
    slower (docs/performance.md, "Why the code is shaped so").
    """
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    hi = np.maximum(np.maximum(r, g), b).astype(np.uint16)
    lo = np.minimum(np.minimum(r, g), b).astype(np.uint16)
    sat = np.zeros(hi.shape, dtype=np.uint16)
    np.divide((hi - lo) * 255, hi, out=sat, where=hi > 0, casting="unsafe")
    return sat.astype(np.uint8)


def saturated(rgb: np.ndarray, threshold: int = SATURATION_THRESHOLD) -> np.ndarray:
    """saturation(rgb) > threshold without the division (saturation floors (max - min) * 255 / max, so
    this is (max - min) * 255 >= (threshold + 1) * max, for max > 0)."""
    if rgb.ndim == 3 and rgb.dtype == np.uint8 and rgb.flags.c_contiguous:
        return _saturated_cv(rgb, threshold)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    hi = np.maximum(np.maximum(r, g), b).astype(np.uint16)
    lo = np.minimum(np.minimum(r, g), b)
    return ((hi - lo) * 255 >= hi * (threshold + 1)) & (hi > 0)


@functools.cache
def _min_spread(threshold: int) -> np.ndarray:
    """For each max (0-255), the least max - min that is saturated: ceil((threshold + 1) * max / 255); 1 for
    max 0 (never saturated: its spread is 0)."""
    hi = np.arange(256)
    return np.where(hi > 0, -(-(threshold + 1) * hi // 255), 1).astype(np.uint8)


def _saturated_cv(rgb: np.ndarray, threshold: int) -> np.ndarray:
    """``saturated`` of an H x W x 3 uint8 image in OpenCV: max - min >= the table's least spread for max."""
    r, g, b = cv2.split(rgb)
    hi = cv2.max(cv2.max(r, g), b)
    spread = cv2.subtract(hi, cv2.min(cv2.min(r, g), b))
    mask = cv2.compare(spread, cv2.LUT(hi, _min_spread(threshold)), cv2.CMP_GE)  # 0 or 255
    return np.bitwise_and(mask, 1, out=mask).view(bool)  # a bool is one byte holding 0 or 1


def _shift_reduce(mask: np.ndarray, k: int, op) -> np.ndarray:
    """Apply ``op`` (np.logical_or / np.logical_and) over a k x k square, separably, edges replicated.

    With replicated edges the out-of-range part of a window only repeats the edge pixel, which is already in
    the window, so it can simply be left out: no padding, just shifted in-place ops.
    """
    r = k // 2
    rows = mask.copy()
    for s in range(1, r + 1):
        op(rows[s:], mask[:-s], out=rows[s:])
        op(rows[:-s], mask[s:], out=rows[:-s])
    out = rows.copy()
    for s in range(1, r + 1):
        op(out[:, s:], rows[:, :-s], out=out[:, s:])
        op(out[:, :-s], rows[:, s:], out=out[:, :-s])
    return out


def dilate(mask: np.ndarray, k: int) -> np.ndarray:
    return _shift_reduce(mask, k, np.logical_or)


def erode(mask: np.ndarray, k: int) -> np.ndarray:
    return _shift_reduce(mask, k, np.logical_and)


def close(mask: np.ndarray, k: int) -> np.ndarray:
    """Morphological closing (dilate, then erode) with a k x k square, edges replicated."""
    if mask.ndim == 2 and mask.flags.c_contiguous:
        closed = cv2.morphologyEx(mask.view(np.uint8), cv2.MORPH_CLOSE, np.ones((k, k), np.uint8),
                                  borderType=cv2.BORDER_REPLICATE)
        return closed.view(bool)
    return erode(dilate(mask, k), k)


def subsample(rgb: np.ndarray, step: int = MASK_STEP) -> np.ndarray:
    """Every ``step``-th pixel of every ``step``-th row, as a contiguous copy (masks and QC work on this)."""
    h, w = rgb.shape[:2]
    if step > 1 and h % step == 0 and w % step == 0 and rgb.ndim == 3 and rgb.dtype == np.uint8 and h and w:
        # nearest-neighbour at an exact 1/step picks pixel step * i: the same pixels as the slicing
        return cv2.resize(rgb, (w // step, h // step), interpolation=cv2.INTER_NEAREST)
    return np.ascontiguousarray(rgb[::step, ::step])


def mask_of_subsampled(sub: np.ndarray, threshold: int = SATURATION_THRESHOLD,
                       closing: tuple[int, ...] = CLOSING) -> np.ndarray:
    """Tissue mask of an already subsampled image: saturation threshold, then closing(s)."""
    mask = saturated(sub, threshold)
    for k in closing:
        if min(mask.shape) >= k:
            mask = close(mask, k)
    return mask


def tissue_mask(rgb: np.ndarray, threshold: int = SATURATION_THRESHOLD, step: int = MASK_STEP,
                closing: tuple[int, ...] = CLOSING) -> np.ndarray:
    """Boolean tissue mask at 1/``step`` resolution: saturation threshold, then closing(s)."""
    return mask_of_subsampled(subsample(rgb, step), threshold, closing)


def tissue_fraction(rgb: np.ndarray, threshold: int = SATURATION_THRESHOLD, step: int = MASK_STEP) -> float:
    """Fraction of the image that is tissue (no closing: for one small patch)."""
    if rgb.size == 0:
        return 0.0
    return float((saturation(rgb[::step, ::step]) > threshold).mean())


def integral(mask: np.ndarray) -> np.ndarray:
    """(h + 1, w + 1) int32 sums of a 2-D bool mask above and left of each corner (OpenCV's, when it can)."""
    if mask.ndim == 2 and mask.dtype == np.bool_ and mask.flags.c_contiguous:
        return cv2.integral(mask.view(np.uint8))
    ii = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), dtype=np.int32)
    np.cumsum(np.cumsum(mask, axis=0, dtype=np.int32), axis=1, out=ii[1:, 1:])
    return ii


def patch_fractions(mask: np.ndarray, ys, xs, hs, ws, step: int = MASK_STEP) -> np.ndarray:
    """Mean of a low-resolution mask over each patch (paired arrays of full-resolution y, x, h, w) -> (N,).

    Integral image: the cost does not depend on the patch size.
    """
    ii = integral(mask)
    h, w = mask.shape
    ys, xs, hs, ws = (np.asarray(a) for a in (ys, xs, hs, ws))
    y0, x0 = np.minimum(ys // step, h), np.minimum(xs // step, w)
    y1, x1 = np.minimum((ys + hs + step - 1) // step, h), np.minimum((xs + ws + step - 1) // step, w)
    total = ii[y1, x1] - ii[y0, x1] - ii[y1, x0] + ii[y0, x0]
    area = (y1 - y0) * (x1 - x0)
    return np.divide(total, area, out=np.zeros(len(total), np.float32), where=area > 0).astype(np.float32)
