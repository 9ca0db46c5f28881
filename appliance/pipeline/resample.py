"""Resampling scanner tiles to the model's microns per pixel (area-weighted box filter, separable).

A tile at scanner position x (scanner pixels) lands at round(x * scale) in model pixels and spans to
round((x + w) * scale), so neighbouring tiles stay seamless: no gaps, no overlaps from rounding.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

TOLERANCE = 0.01  # scanner and model resolutions within 1% are treated as equal


def scale_factor(scanner_mpp: float | None, model_mpp: float) -> float:
    """Model pixels per scanner pixel (1.0 when the scanner's resolution is unknown)."""
    if not scanner_mpp or scanner_mpp <= 0:
        return 1.0
    s = scanner_mpp / model_mpp
    return 1.0 if abs(s - 1.0) < TOLERANCE else s


def target_span(start: int, length: int, scale: float) -> tuple[int, int]:
    """Model-pixel (start, length) of a scanner span."""
    a, b = round(start * scale), round((start + length) * scale)
    return a, b - a


@lru_cache(maxsize=64)
def _weights(start: int, length: int, scale: float) -> np.ndarray:
    """(out, in) matrix: each output pixel averages the input pixels its footprint overlaps."""
    a, n_out = target_span(start, length, scale)
    edges_in = np.arange(length + 1, dtype=np.float64) + start  # input pixel edges, scanner coords
    out_lo = (a + np.arange(n_out)) / scale
    out_hi = (a + np.arange(n_out) + 1) / scale
    lo = np.maximum(out_lo[:, None], edges_in[None, :-1])
    hi = np.minimum(out_hi[:, None], edges_in[None, 1:])
    w = np.clip(hi - lo, 0, None)
    s = w.sum(axis=1, keepdims=True)
    w = np.divide(w, s, out=np.zeros_like(w), where=s > 0)
    return w.astype(np.float32)


def resample_tile(pixels: np.ndarray, x: int, y: int, scale: float) -> tuple[int, int, np.ndarray]:
    """Resample a (h, w, 3) uint8 tile at scanner position (x, y); returns its model position and pixels."""
    if scale == 1.0:
        return x, y, pixels
    h, w = pixels.shape[:2]
    wy, wx = _weights(y, h, scale), _weights(x, w, scale)
    tmp = (wy @ pixels.reshape(h, w * 3).astype(np.float32)).reshape(wy.shape[0], w, 3)
    out = np.einsum("ow,hwc->hoc", wx, tmp, optimize=True)
    return round(x * scale), round(y * scale), np.clip(out + 0.5, 0, 255).astype(np.uint8)


@dataclass(frozen=True)
class CaseFrame:
    """Where a case's model-resolution pixels lie in the input's own: ``scale`` model pixels per input pixel
    and the input's top-left ``origin`` (the mosaic's 0, 0)."""

    scale: float
    origin: tuple[int, int]

    def to_input(self, pos: np.ndarray) -> np.ndarray:
        """(n, 4) model-resolution x, y, w, h -> the input's pixels (rounded half to even, as Python's round)."""
        if self.scale == 1.0:
            return pos + np.array([self.origin[0], self.origin[1], 0, 0])
        out = np.round(pos / self.scale).astype(np.int64)
        out[:, 0] += self.origin[0]
        out[:, 1] += self.origin[1]
        return out

    def to_model(self, x: int, y: int, w: int, h: int) -> tuple[int, int, int, int]:
        """The input's pixel coordinates -> model-resolution case coordinates (the inverse of to_input)."""
        x, y = x - self.origin[0], y - self.origin[1]
        if self.scale == 1.0:
            return x, y, w, h
        s = self.scale
        return round(x * s), round(y * s), max(1, round(w * s)), max(1, round(h * s))
