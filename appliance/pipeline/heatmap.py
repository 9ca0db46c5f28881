"""Heatmap and thumbnail of a case on a coarse grid, accumulated tile by tile.

Heatmap: every scored patch adds its probability to each grid cell it covers; the map is the sum divided
by the count (overlap averaging, as in SRS-MIL), NaN where nothing was scored. Cells are gcd(size, stride)
model pixels, so overlapping patches average exactly.

Regions: cells at or above a threshold, grouped 4-connected, small groups dropped, each traced into a
polygon (outer ring plus holes) along cell edges, in mosaic pixel coordinates.
"""

from __future__ import annotations

import uuid
from math import gcd

import cv2
import numpy as np


class _Grow2D:
    """A 2-D (or 2-D x channels) array that grows to cover whatever index is written."""

    def __init__(self, fill, dtype, channels: int | None = None, shape=(0, 0)):
        self.fill, self.dtype, self.channels = fill, dtype, channels
        self.a = self._new(shape)

    def _new(self, shape):
        full = shape if self.channels is None else (*shape, self.channels)
        return np.full(full, self.fill, dtype=self.dtype)

    def ensure(self, rows: int, cols: int) -> np.ndarray:
        r, c = self.a.shape[:2]
        if rows > r or cols > c:
            bigger = self._new((max(rows, r, 2 * r if rows > r else r), max(cols, c, 2 * c if cols > c else c)))
            bigger[:r, :c] = self.a
            self.a = bigger
        return self.a


class Heatmap:
    def __init__(self, size: int, stride: int, width: int | None = None, height: int | None = None):
        self.size, self.stride = size, stride
        self.cell = gcd(size, stride)
        rows, cols = (-(-(height or 0) // self.cell), -(-(width or 0) // self.cell))
        self._sum = _Grow2D(0.0, np.float64, shape=(rows, cols))
        self._count = _Grow2D(0, np.int32, shape=(rows, cols))
        self.rows = self.cols = 0

    def add(self, x: int, y: int, w: int, h: int, probability: float) -> None:
        """A patch at (x, y) covering w x h real pixels (edge patches are smaller than the grid size)."""
        c = self.cell
        r0, c0 = y // c, x // c
        r1, c1 = -(-(y + h) // c), -(-(x + w) // c)
        self._sum.ensure(r1, c1)[r0:r1, c0:c1] += probability
        self._count.ensure(r1, c1)[r0:r1, c0:c1] += 1
        self.rows, self.cols = max(self.rows, r1), max(self.cols, c1)

    def add_many(self, xs: np.ndarray, ys: np.ndarray, ws: np.ndarray, hs: np.ndarray, probs: np.ndarray) -> None:
        """Many patches at once; vectorised when each covers a single cell (patch size == stride)."""
        c = self.cell
        r0, c0 = ys // c, xs // c
        single = ((ys + hs + c - 1) // c - r0 == 1) & ((xs + ws + c - 1) // c - c0 == 1)
        if single.all() and len(xs):
            r1, c1 = int(r0.max()) + 1, int(c0.max()) + 1
            np.add.at(self._sum.ensure(r1, c1), (r0, c0), probs)
            np.add.at(self._count.ensure(r1, c1), (r0, c0), 1)
            self.rows, self.cols = max(self.rows, r1), max(self.cols, c1)
            return
        for x, y, w, h, p in zip(xs.tolist(), ys.tolist(), ws.tolist(), hs.tolist(), probs.tolist()):
            self.add(x, y, w, h, p)

    def average(self) -> np.ndarray:
        """(rows, cols) float32 mean probability per cell; NaN where no patch was scored."""
        s = self._sum.a[: self.rows, : self.cols]
        n = self._count.a[: self.rows, : self.cols]
        return np.where(n > 0, s / np.maximum(n, 1), np.nan).astype(np.float32)


def block_sums(pixels: np.ndarray, c: int) -> np.ndarray:
    """(h / c, w / c, 3) exact integer sums of each c x c block of an (h, w, 3) uint8 image (h, w multiples of c),
    from OpenCV's integral image (quicker than summing reshaped numpy blocks, the fallback below;
    docs/performance.md, "Why the code is shaped so")."""
    if pixels.dtype == np.uint8 and pixels.strides[1:] == (3, 1) and pixels.shape[0] * pixels.shape[1] < 2 ** 23:
        ii = cv2.integral(pixels)  # int32 sums per channel: 255 x 2^23 is just below 2^31, hence the bound
        return ii[c::c, c::c] - ii[:-c:c, c::c] - ii[c::c, :-c:c] + ii[:-c:c, :-c:c]
    ny, nx = pixels.shape[0] // c, pixels.shape[1] // c
    # sum the c rows of each block row first (contiguous adds), then the c columns
    rows = pixels.reshape(ny, c, nx * c * 3).sum(axis=1, dtype=np.uint32)
    return rows.reshape(ny, nx, c, 3).sum(axis=2, dtype=np.uint32)


def block_means(pixels: np.ndarray, k: int) -> np.ndarray:
    """The mean of each k x k block of an (h, w, 3) uint8 image (h, w multiples of k), rounded half up.

    With k odd a block's mean is never exactly half-way (k * k is odd), so OpenCV's area resize, which rounds
    to nearest, gives the same numbers in one call (the half-resolution thumbnail's k = 5); else exact sums."""
    if k % 2 and pixels.dtype == np.uint8:
        return cv2.resize(pixels, (pixels.shape[1] // k, pixels.shape[0] // k), interpolation=cv2.INTER_AREA)
    return (block_sums(pixels, k).astype(np.float32) / (k * k) + 0.5).astype(np.uint8)


class Thumbnail:
    """Mean colour per ``cell`` x ``cell`` block of the mosaic, built from tiles as they arrive."""

    def __init__(self, cell: int):
        self.cell = cell
        self._img = _Grow2D(255, np.uint8, channels=3)
        self.rows = self.cols = 0

    def add(self, x: int, y: int, pixels: np.ndarray, step: int = 1) -> None:
        """The tile at (x, y), given whole or (``step`` > 1) as every step-th pixel of every step-th row: then a
        block's colour is the mean of its sampled pixels (the tissue mask's half-resolution copy serves, a
        quarter of the work for the same picture). A step must divide the cell and x and y."""
        c = self.cell
        if c % step or x % step or y % step:
            raise ValueError(f"a thumbnail of cell {c} cannot be built from a copy subsampled by {step} at ({x}, {y})")
        h, w = pixels.shape[0] * step, pixels.shape[1] * step
        # only whole blocks that start inside this tile; a tile not aligned to the cell loses its ragged edge
        oy, ox = (-y) % c, (-x) % c
        ny, nx = (h - oy) // c, (w - ox) // c
        if ny <= 0 or nx <= 0:
            return
        k = c // step  # the block's side in the given pixels
        sampled = pixels[oy // step : oy // step + ny * k, ox // step : ox // step + nx * k]
        r0, c0 = (y + oy) // c, (x + ox) // c
        self._img.ensure(r0 + ny, c0 + nx)[r0 : r0 + ny, c0 : c0 + nx] = block_means(sampled, k)
        self.rows, self.cols = max(self.rows, r0 + ny), max(self.cols, c0 + nx)

    def image(self) -> np.ndarray:
        return self._img.a[: self.rows, : self.cols].copy()


# ------------------------------------------------------------------------------------------------ regions
def label_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """4-connected component labels (0 = background) by iterative flood fill over a stack."""
    labels = np.zeros(mask.shape, dtype=np.int32)
    n = 0
    rows, cols = mask.shape
    for r0, c0 in zip(*np.nonzero(mask)):
        if labels[r0, c0]:
            continue
        n += 1
        labels[r0, c0] = n
        stack = [(r0, c0)]
        while stack:
            r, c = stack.pop()
            for rr, cc in ((r - 1, c), (r + 1, c), (r, c - 1), (r, c + 1)):
                if 0 <= rr < rows and 0 <= cc < cols and mask[rr, cc] and not labels[rr, cc]:
                    labels[rr, cc] = n
                    stack.append((rr, cc))
    return labels, n


def trace_rings(mask: np.ndarray) -> list[list[tuple[int, int]]]:
    """Closed rings (lists of (col, row) grid corners) along the edges between mask and non-mask cells.

    Edges are directed with the region on their right-hand side in (col, row) image axes; at a corner
    shared by two diagonal cells the walk turns so that 4-connected regions stay separate.
    """
    m = np.pad(mask, 1)
    edges: dict[tuple[int, int], list[tuple[int, int]]] = {}

    def add(a, b):
        edges.setdefault(a, []).append(b)

    for r, c in zip(*np.nonzero(m)):
        r0, c0 = r - 1, c - 1  # back to unpadded corners
        if not m[r - 1, c]:
            add((c0, r0), (c0 + 1, r0))  # top edge, left to right
        if not m[r, c + 1]:
            add((c0 + 1, r0), (c0 + 1, r0 + 1))  # right edge, downwards
        if not m[r + 1, c]:
            add((c0 + 1, r0 + 1), (c0, r0 + 1))  # bottom edge, right to left
        if not m[r, c - 1]:
            add((c0, r0 + 1), (c0, r0))  # left edge, upwards
    rings = []
    while edges:
        start = next(iter(edges))
        ring = [start]
        prev, cur = start, edges[start].pop()
        if not edges[start]:
            del edges[start]
        while cur != start:
            ring.append(cur)
            outs = edges[cur]
            if len(outs) == 1:
                nxt = outs.pop()
            else:  # pinch corner: turn right (relative to the walk) to keep 4-connected cells apart
                d = (cur[0] - prev[0], cur[1] - prev[1])
                right = (-d[1], d[0])
                nxt = next((o for o in outs if (o[0] - cur[0], o[1] - cur[1]) == right), outs[0])
                outs.remove(nxt)
            if not outs:
                del edges[cur]
            prev, cur = cur, nxt
        ring.append(start)
        rings.append(_simplify(ring))
    return rings


def _simplify(ring: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Drop corners in the middle of straight runs."""
    out = [ring[0]]
    for i in range(1, len(ring) - 1):
        a, b, c = out[-1], ring[i], ring[i + 1]
        if (b[0] - a[0]) * (c[1] - b[1]) != (b[1] - a[1]) * (c[0] - b[0]):
            out.append(b)
    out.append(ring[-1])
    return out


def ring_area(ring: list[tuple[int, int]]) -> float:
    """Shoelace area of (x, y) numbers: positive for trace_rings' exteriors, negative for its holes."""
    return 0.5 * sum(a[0] * b[1] - b[0] * a[1] for a, b in zip(ring, ring[1:]))


REGION_CLASS = {"name": "Suspicious", "color": [230, 159, 0]}  # QuPath's PathClass: name and (r, g, b)


def regions(heat: np.ndarray, threshold: float, cell: int, min_cells: int = 1) -> list[dict]:
    """Connected regions of heat >= threshold as GeoJSON Features (polygon coordinates in mosaic pixels), laid
    out as QuPath's own GeoJSON reader wants them: a UUID ``id``, ``objectType`` "annotation", a
    ``classification`` (name and [r, g, b]), ``isLocked`` and every number under ``measurements`` (QuPath
    drops other numeric properties)."""
    hot = np.nan_to_num(heat, nan=0.0) >= threshold
    labels, n = label_components(hot)
    features = []
    for i in range(1, n + 1):
        region = labels == i
        cells = int(region.sum())
        if cells < min_cells:
            continue
        rings = trace_rings(region)
        rings.sort(key=ring_area, reverse=True)
        # RFC 7946 wants exteriors counter-clockwise and holes clockwise as numbers (shoelace sign), which is
        # what trace_rings yields: exterior first (largest positive area), then holes (negative area).
        coords = [[[int(x) * cell, int(y) * cell] for x, y in r] for r in rings]
        vals = heat[region]
        features.append({
            "type": "Feature",
            "id": str(uuid.uuid4()),
            "geometry": {"type": "Polygon", "coordinates": coords},
            "properties": {
                "objectType": "annotation",
                "name": f"Suspicious (model) {len(features) + 1}",
                "classification": dict(REGION_CLASS, color=list(REGION_CLASS["color"])),
                "isLocked": True,
                "measurements": {
                    "max_probability": round(float(vals.max()), 4),
                    "mean_probability": round(float(vals.mean()), 4),
                    "cells": cells,
                    "area_px": cells * cell * cell,
                },
            },
        })
    return features
