"""The heat colour map shared by the case files and the terminal UI: cividis (Nunez et al. 2018), a
colour-vision-deficiency-safe blue-to-yellow map. A pure function, so the UI need not import the pipeline."""

from __future__ import annotations

import numpy as np

# cividis at 10 anchors
_CIVIDIS = np.array([
    [0, 34, 78], [18, 53, 112], [59, 73, 108], [87, 92, 109], [112, 113, 115],
    [138, 134, 120], [166, 157, 117], [196, 181, 105], [230, 207, 81], [254, 232, 56],
], dtype=np.float32)


def colormap(values: np.ndarray) -> np.ndarray:
    """Map [0, 1] to cividis RGB uint8 (NaN -> 0)."""
    v = np.clip(np.nan_to_num(values, nan=0.0), 0, 1) * (len(_CIVIDIS) - 1)
    i = np.minimum(v.astype(int), len(_CIVIDIS) - 2)
    f = (v - i)[..., None]
    return (_CIVIDIS[i] * (1 - f) + _CIVIDIS[i + 1] * f + 0.5).astype(np.uint8)
