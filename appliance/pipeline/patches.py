"""Edge patches are padded the way the model was trained: glass (white) at the bottom and right."""

from __future__ import annotations

import numpy as np


def pad_to(img: np.ndarray, size: int, value: int) -> np.ndarray:
    """Pad an (h, w, 3) image at the bottom/right to (size, size, 3) with a constant (glass is white)."""
    h, w = img.shape[:2]
    if h == size and w == size:
        return img
    out = np.full((size, size, img.shape[2]), value, dtype=img.dtype)
    out[: min(h, size), : min(w, size)] = img[:size, :size]
    return out
