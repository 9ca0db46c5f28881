"""The context stage's input and output on a case's patch grid (the model is run by the engine).

Cells are patch positions on the case grid (x // stride, y // stride). The grid handed to the model is the
smallest rectangle holding the cells: channel 0 the first-stage probability, channel 1 = 1 where a patch was
scored. Cells with nothing scored around them fall back to their own score inside the model. A case spread
over a very large area is refined window by window (each window padded by the model's reach), so memory
stays bounded whatever the scanner's layout; the result is the same as one grid.
"""

from __future__ import annotations

import numpy as np

from appliance.model.engine import Engine

WINDOW = 1024  # cells per side of one model call (1024 x 1024 x 2 float32 = 8 MB)


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


def refine(engine: Engine, gx, gy, probability, window: int = WINDOW) -> np.ndarray:
    """The refined probability of every cell (float64, rounded to 6 decimals like the first stage's)."""
    gx, gy = np.asarray(gx, dtype=np.int64), np.asarray(gy, dtype=np.int64)
    probability = np.asarray(probability, dtype=np.float64)
    reach = engine.manifest.context.rings
    out = np.empty(len(gx), dtype=np.float64)
    x0, y0 = int(gx.min()), int(gy.min())
    for wy in range(y0, int(gy.max()) + 1, window):
        for wx in range(x0, int(gx.max()) + 1, window):
            inside = (gx >= wx) & (gx < wx + window) & (gy >= wy) & (gy < wy + window)
            if not inside.any():
                continue
            near = (gx >= wx - reach) & (gx < wx + window + reach) & (gy >= wy - reach) & (gy < wy + window + reach)
            grid, rows, cols = context_grid(gx[near], gy[near], probability[near])
            refined = engine.refine(grid)[rows, cols]
            out[inside] = refined[inside[near]]
    return np.round(out, 6)
