"""The case mosaic on disk: fixed-size chunks, each a memory-mapped ``.npy`` opened only while it is used.

A core-needle case at the model's resolution can be hundreds of megabytes, so it never lives in RAM:
tiles are written into chunk files as they arrive, patches that straddle tiles and the OME-TIFF writer
read back only the chunks they need. Areas never scanned read as white glass.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Iterator

import numpy as np

GLASS = 255


class ChunkedMosaic:
    def __init__(self, root: Path, chunk: int = 512, fill: int = GLASS):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.chunk = chunk
        self.fill = fill
        self.width = 0  # extent of everything written so far
        self.height = 0

    def _path(self, cx: int, cy: int) -> Path:
        return self.root / f"c{cy:05d}_{cx:05d}.npy"

    def _open(self, cx: int, cy: int, create: bool):
        p = self._path(cx, cy)
        if p.exists():
            return np.load(p, mmap_mode="r+" if create else "r")
        if not create:
            return None
        arr = np.lib.format.open_memmap(p, mode="w+", dtype=np.uint8, shape=(self.chunk, self.chunk, 3))
        arr[...] = self.fill
        return arr

    def _spans(self, x: int, y: int, w: int, h: int) -> Iterator[tuple[int, int, slice, slice, slice, slice]]:
        c = self.chunk
        for cy in range(y // c, (y + h - 1) // c + 1):
            for cx in range(x // c, (x + w - 1) // c + 1):
                y0, y1 = max(y, cy * c), min(y + h, (cy + 1) * c)
                x0, x1 = max(x, cx * c), min(x + w, (cx + 1) * c)
                yield (cx, cy, slice(y0 - cy * c, y1 - cy * c), slice(x0 - cx * c, x1 - cx * c),
                       slice(y0 - y, y1 - y), slice(x0 - x, x1 - x))

    def write(self, x: int, y: int, pixels: np.ndarray) -> None:
        """Paint a (h, w, 3) uint8 tile at (x, y); a later tile over the same pixels wins."""
        h, w = pixels.shape[:2]
        if h == 0 or w == 0:
            return
        if x < 0 or y < 0:
            raise ValueError(f"tile position ({x}, {y}) is negative")
        for cx, cy, cys, cxs, tys, txs in self._spans(x, y, w, h):
            arr = self._open(cx, cy, create=True)
            arr[cys, cxs] = pixels[tys, txs]
            del arr  # unmap: written pages leave this process's RSS
        self.width = max(self.width, x + w)
        self.height = max(self.height, y + h)

    def read(self, x: int, y: int, w: int, h: int) -> np.ndarray:
        """The (h, w, 3) region at (x, y); anything never written (or outside) is glass."""
        out = np.full((h, w, 3), self.fill, dtype=np.uint8)
        if w <= 0 or h <= 0:
            return out
        for cx, cy, cys, cxs, tys, txs in self._spans(x, y, w, h):
            arr = self._open(cx, cy, create=False)
            if arr is not None:
                out[tys, txs] = arr[cys, cxs]
                del arr
        return out

    def tiles(self, size: int) -> Iterator[np.ndarray]:
        """Every ``size`` x ``size`` tile of the extent in raster order (edge tiles padded with glass)."""
        for y in range(0, self.height, size):
            for x in range(0, self.width, size):
                yield self.read(x, y, size, size)

    def downsample2(self, root: Path) -> "ChunkedMosaic":
        """A half-resolution copy (2x2 box filter) in another folder, built chunk row by chunk row."""
        half = ChunkedMosaic(root, self.chunk, self.fill)
        step = 2 * self.chunk
        for y in range(0, self.height, step):
            for x in range(0, self.width, step):
                h, w = min(step, self.height - y), min(step, self.width - x)
                block = self.read(x, y, w + (w & 1), h + (h & 1)).astype(np.uint16)
                small = (block[0::2, 0::2] + block[1::2, 0::2] + block[0::2, 1::2] + block[1::2, 1::2] + 2) >> 2
                half.write(x // 2, y // 2, small.astype(np.uint8))
        half.width, half.height = (self.width + 1) // 2, (self.height + 1) // 2
        return half

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
