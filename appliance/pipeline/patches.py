"""Cutting tiles into model-sized patches; edge patches are padded the way the model was trained."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Patch:
    """A patch in slide pixel coordinates; ``w``/``h`` are the real extent before padding."""

    x: int
    y: int
    w: int
    h: int
    pixels: np.ndarray  # (size, size, 3) uint8, padded


def pad_to(img: np.ndarray, size: int, value: int) -> np.ndarray:
    """Pad an (h, w, 3) image at the bottom/right to (size, size, 3) with a constant (glass is white)."""
    h, w = img.shape[:2]
    if h == size and w == size:
        return img
    out = np.full((size, size, img.shape[2]), value, dtype=img.dtype)
    out[: min(h, size), : min(w, size)] = img[:size, :size]
    return out


def grid_starts(n: int, size: int, stride: int) -> list[int]:
    """Patch start offsets along one axis of length ``n``: full patches, then one partial patch if needed."""
    if n <= 0:
        return []
    starts = list(range(0, max(n - size, 0) + 1, stride))
    if starts[-1] + size < n:
        starts.append(starts[-1] + stride)
    return starts


def cut_patches(tile: np.ndarray, x0: int, y0: int, size: int, stride: int, pad_value: int) -> list[Patch]:
    """Cut a tile whose top-left is at slide position (x0, y0) into patches on a grid anchored at the tile.

    Partial patches at the right and bottom edges are kept and padded, so no tissue is dropped.
    """
    h, w = tile.shape[:2]
    out = []
    for py in grid_starts(h, size, stride):
        for px in grid_starts(w, size, stride):
            crop = tile[py : py + size, px : px + size]
            out.append(Patch(x0 + px, y0 + py, crop.shape[1], crop.shape[0], pad_to(crop, size, pad_value)))
    return out
