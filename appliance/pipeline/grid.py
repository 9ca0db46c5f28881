"""The case's patch grid: one grid (patch size, stride) anchored at the case origin, across all tiles.

Tiles can arrive in any order, overlap, and need not line up with the grid. For each new tile the grid
says which patches are now complete: those wholly inside the tile (cut straight from it), and those
straddling tiles whose last missing piece this tile supplied (read back from the mosaic). Every grid
position is scored exactly once, so overlapping tiles never double-count a patch.
"""

from __future__ import annotations

import numpy as np


class PatchGrid:
    def __init__(self, size: int, stride: int, width: int | None = None, height: int | None = None):
        if size <= 0 or stride <= 0:
            raise ValueError("patch size and stride must be positive")
        self.size = size
        self.stride = stride
        self.width = width or None  # case extent when the scanner announced it; else open-ended
        self.height = height or None
        self.done: set[tuple[int, int]] = set()
        self._pending: dict[tuple[int, int], list[tuple[int, int, int, int]]] = {}

    def extent(self, gx: int, gy: int) -> tuple[int, int, int, int]:
        """(x, y, w, h) of a grid patch, clipped to the case extent when known."""
        px, py = gx * self.stride, gy * self.stride
        w = self.size if self.width is None else max(0, min(self.size, self.width - px))
        h = self.size if self.height is None else max(0, min(self.size, self.height - py))
        return px, py, w, h

    def extents(self, keys: list[tuple[int, int]]) -> np.ndarray:
        """``extent`` of many grid patches at once, as an (n, 4) int64 array of x, y, w, h."""
        g = np.asarray(keys, dtype=np.int64).reshape(-1, 2) * self.stride
        out = np.empty((len(g), 4), dtype=np.int64)
        out[:, :2] = g
        out[:, 2] = self.size if self.width is None else np.clip(self.width - g[:, 0], 0, self.size)
        out[:, 3] = self.size if self.height is None else np.clip(self.height - g[:, 1], 0, self.size)
        return out

    def _range(self, start: int, length: int) -> range:
        lo = max(0, -(-(start - self.size + 1) // self.stride))  # ceil
        return range(lo, (start + length - 1) // self.stride + 1)

    def add_tile(self, x: int, y: int, w: int, h: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """Register a tile; returns (patches wholly inside it, straddling patches it completed)."""
        fast = self._aligned(x, y, w, h)
        if fast is not None:
            return fast, []
        inside, completed = [], []
        for gy in self._range(y, h):
            for gx in self._range(x, w):
                key = (gx, gy)
                if key in self.done:
                    continue
                px, py, pw, ph = self.extent(gx, gy)
                if pw == 0 or ph == 0:
                    continue
                if px >= x and py >= y and px + pw <= x + w and py + ph <= y + h:
                    inside.append(key)
                    self.done.add(key)
                    self._pending.pop(key, None)
                    continue
                rects = self._pending.setdefault(key, [])
                rects.append((x, y, w, h))
                if _covered(px, py, pw, ph, rects):
                    completed.append(key)
                    self.done.add(key)
                    del self._pending[key]
        return inside, completed

    def _aligned(self, x: int, y: int, w: int, h: int) -> list[tuple[int, int]] | None:
        """The common case, tiles on the patch grid (size == stride): every patch is inside. None if not."""
        n = self.size
        if self.stride != n or x % n or y % n:
            return None
        right, bottom = x + w, y + h
        if right % n and not (self.width and right == self.width):
            return None
        if bottom % n and not (self.height and bottom == self.height):
            return None
        keys = [(gx, gy) for gy in range(y // n, -(-bottom // n)) for gx in range(x // n, -(-right // n))]
        if self._pending and any(k in self._pending for k in keys):
            return None
        inside = [k for k in keys if k not in self.done]
        self.done.update(inside)
        return inside

    def drain(self) -> list[tuple[int, int]]:
        """At the end of the case: every patch still partly covered (its missing part reads as glass)."""
        keys = sorted(self._pending, key=lambda k: (k[1], k[0]))
        self.done.update(keys)
        self._pending.clear()
        return keys

    @property
    def pending(self) -> int:
        return len(self._pending)


def _covered(px: int, py: int, pw: int, ph: int, rects: list[tuple[int, int, int, int]]) -> bool:
    cover = np.zeros((ph, pw), dtype=bool)
    for x, y, w, h in rects:
        x0, y0 = max(x, px) - px, max(y, py) - py
        x1, y1 = min(x + w, px + pw) - px, min(y + h, py + ph) - py
        if x1 > x0 and y1 > y0:
            cover[y0:y1, x0:x1] = True
    return bool(cover.all())
