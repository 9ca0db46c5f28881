"""The context stage's input and output on a case's patch grid (the model is run by the engine).

Cells are patch positions on the case grid (x // stride, y // stride). The grid handed to the model is the
smallest rectangle holding the cells: channel 0 the first-stage probability, channel 1 = 1 where a patch was
scored. Cells with nothing scored around them fall back to their own score inside the model.
"""

from __future__ import annotations

import numpy as np

from ..engine import Engine


def context_grid(gx: np.ndarray, gy: np.ndarray, probability: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(grid (1, 2, H, W) float32, rows, cols) for cells gx, gy (any integers, each cell at most once)."""
    gx, gy = np.asarray(gx, dtype=np.int64), np.asarray(gy, dtype=np.int64)
    cols, rows = gx - gx.min(), gy - gy.min()
    grid = np.zeros((1, 2, int(rows.max()) + 1, int(cols.max()) + 1), np.float32)
    grid[0, 0, rows, cols] = probability
    grid[0, 1, rows, cols] = 1.0
    if int(grid[0, 1].sum()) != len(gx):
        raise ValueError("two patches on the same grid cell")
    return grid, rows, cols


def refine(engine: Engine, gx, gy, probability) -> np.ndarray:
    """The refined probability of every cell (float64, rounded to 6 decimals like the first stage's)."""
    grid, rows, cols = context_grid(gx, gy, probability)
    return np.round(engine.refine(grid)[rows, cols].astype(np.float64), 6)
