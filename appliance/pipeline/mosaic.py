"""The case mosaic on disk: tiles appended to one raw file as they arrive, with a spatial index.

A core-needle case at the model's resolution can be hundreds of megabytes, so it never lives in RAM.
Writing a tile is one sequential append, done by a writer thread so the disk's writes overlap with the
pipeline's compute; at most WRITE_QUEUE tiles wait in memory.
Reading a region (a patch that straddles tiles, or a band of the case pyramid) paints the tiles that overlap
it in arrival order, so a later tile over the same pixels wins: a tile still waiting for the writer from its
pixels in memory, a written one by reading just the rows it needs from the file (one pread per tile, no
memory map, so nothing read stays in this process's RSS). Areas never scanned read as white glass.
"""

from __future__ import annotations

import os
import queue
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

GLASS = 255
BUCKET = 512  # spatial index cell, pixels
WRITE_QUEUE = 32  # tiles


@dataclass(frozen=True)
class _Entry:
    x: int
    y: int
    w: int
    h: int
    offset: int


class Mosaic:
    def __init__(self, root: Path, fill: int = GLASS):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.fill = fill
        self.width = 0  # extent of everything written so far
        self.height = 0
        self._path = self.root / "tiles.raw"
        # unbuffered: a write is in the file (for pread) as soon as it returns; a crashed run's file is started over
        self._file = open(self._path, "w+b", buffering=0)
        self._size = 0
        self._entries: list[_Entry] = []
        self._index: dict[tuple[int, int], list[int]] = {}
        self._pending: dict[int, np.ndarray] = {}  # entry -> its pixels, until the writer has written them
        self._lock = threading.Lock()
        self._queue: queue.Queue = queue.Queue(maxsize=WRITE_QUEUE)
        self._error: BaseException | None = None
        self._writer = threading.Thread(target=self._write_loop, name="mosaic-writer", daemon=True)
        self._writer.start()

    def _write_loop(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                i, data = item
                if self._error is None:
                    view = memoryview(data).cast("B")
                    while view:
                        view = view[self._file.write(view):]
                with self._lock:
                    del self._pending[i]
            except BaseException as exc:  # e.g. a full disk: reported by the next write or read
                self._error = exc
            finally:
                self._queue.task_done()

    def _check(self) -> None:
        if self._error is not None:
            raise OSError(f"the case mosaic could not be written to {self._path}: {self._error}")

    def write(self, x: int, y: int, pixels: np.ndarray) -> None:
        """Append a (h, w, 3) uint8 tile at (x, y)."""
        h, w = pixels.shape[:2]
        if h == 0 or w == 0:
            return
        if x < 0 or y < 0:
            raise ValueError(f"tile position ({x}, {y}) is negative")
        self._check()
        data = np.ascontiguousarray(pixels, dtype=np.uint8)
        i = len(self._entries)
        with self._lock:
            self._pending[i] = data
        self._queue.put((i, data))
        self._entries.append(_Entry(x, y, w, h, self._size))
        self._size += data.nbytes
        for key in _buckets(x, y, w, h):
            self._index.setdefault(key, []).append(i)
        self.width = max(self.width, x + w)
        self.height = max(self.height, y + h)

    def read(self, x: int, y: int, w: int, h: int) -> np.ndarray:
        """The (h, w, 3) region at (x, y); anything never written (or outside) is glass."""
        out = np.full((h, w, 3), self.fill, dtype=np.uint8)
        if w <= 0 or h <= 0:
            return out
        hits = sorted({i for key in _buckets(x, y, w, h) for i in self._index.get(key, ())})
        self._check()
        for i in hits:
            e = self._entries[i]
            x0, y0 = max(x, e.x), max(y, e.y)
            x1, y1 = min(x + w, e.x + e.w), min(y + h, e.y + e.h)
            if x1 <= x0 or y1 <= y0:
                continue
            with self._lock:
                rows = self._pending.get(i)
            if rows is not None:
                rows = rows[y0 - e.y : y1 - e.y]
            else:
                rows = self._read_rows(e, y0 - e.y, y1 - e.y)
            out[y0 - y : y1 - y, x0 - x : x1 - x] = rows[:, x0 - e.x : x1 - e.x]
        return out

    def _read_rows(self, e: _Entry, r0: int, r1: int) -> np.ndarray:
        """Rows r0..r1 of a written tile, read from the file."""
        row = e.w * 3
        want = (r1 - r0) * row
        data = os.pread(self._file.fileno(), want, e.offset + r0 * row)
        if len(data) != want:
            raise OSError(f"the case mosaic {self._path} is shorter than what was written to it")
        return np.frombuffer(data, dtype=np.uint8).reshape(r1 - r0, e.w, 3)

    def bands(self, rows: int) -> Iterator[np.ndarray]:
        """The extent as full-width bands of ``rows`` rows, top to bottom (the last may be shorter)."""
        for y in range(0, self.height, rows):
            yield self.read(0, y, self.width, min(rows, self.height - y))

    def close(self) -> None:
        if self._writer.is_alive():
            self._queue.put(None)
            self._writer.join()
        if not self._file.closed:
            self._file.close()

    def remove(self) -> None:
        self.close()
        shutil.rmtree(self.root, ignore_errors=True)


def _buckets(x: int, y: int, w: int, h: int):
    for by in range(y // BUCKET, (y + h - 1) // BUCKET + 1):
        for bx in range(x // BUCKET, (x + w - 1) // BUCKET + 1):
            yield bx, by
