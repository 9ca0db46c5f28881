"""Tiles and patches as the pipeline takes them: a tile checked before any work on it, and edge patches padded
the way the model was trained (glass, white, at the bottom and right)."""

from __future__ import annotations

import numpy as np

from appliance.errors import InputError

Positions = np.ndarray  # (n, 4) int64: model-resolution x, y, w, h of each patch, in the order they were cut


def pad_to(img: np.ndarray, size: int, value: int) -> np.ndarray:
    """Pad an (h, w, 3) image at the bottom/right to (size, size, 3) with a constant (glass is white)."""
    h, w = img.shape[:2]
    if h == size and w == size:
        return img
    out = np.full((size, size, img.shape[2]), value, dtype=img.dtype)
    out[: min(h, size), : min(w, size)] = img[:size, :size]
    return out


def check_tile(pixels: np.ndarray) -> None:
    """A tile must be an (h, w, 3) uint8 array; anything else is a clear InputError, not a crash later."""
    if not isinstance(pixels, np.ndarray):
        raise InputError(f"a tile must be a numpy array, got {type(pixels).__name__}")
    if pixels.dtype != np.uint8:
        raise InputError(f"a tile must be uint8 RGB, got dtype {pixels.dtype}")
    if pixels.ndim != 3 or pixels.shape[2] != 3 or pixels.shape[0] == 0 or pixels.shape[1] == 0:
        raise InputError(f"a tile must have shape (height, width, 3), got {pixels.shape}")
