"""Tissue patches into the engine's batches, in the order they are cut: each batch is one array the patches are
copied into once (no stacking of patch lists, no concatenating of pieces)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np


@dataclass(frozen=True)
class Batch:
    positions: np.ndarray  # (n, 4) int64: model-resolution x, y, w, h of each patch
    pixels: np.ndarray  # (n, size, size, 3) uint8


class BatchFiller:
    """Fills batches of ``size`` patches of ``patch`` x ``patch`` pixels; a full batch waits in ``ready`` until
    the caller takes it (``seal`` closes a part-filled one, at the end of a case)."""

    def __init__(self, size: int, patch: int):
        self.size, self.patch = size, patch
        self.ready: list[Batch] = []
        self._new()

    def _new(self) -> None:
        self._pixels = np.empty((self.size, self.patch, self.patch, 3), np.uint8)
        self._positions = np.empty((self.size, 4), np.int64)
        self._n = 0

    def add(self, positions: np.ndarray, crops: Sequence[np.ndarray]) -> None:
        """Copy ``crops`` (each patch x patch x 3, e.g. views into a tile) in, with their ``positions`` (n, 4).
        A loop of slice copies, not a fancy-index gather from a window view and then a concatenation: alone,
        the copies are the quicker; beside the engine the two cost the same (docs/performance.md, "Why the
        code is shaped so")."""
        start = 0
        while start < len(positions):
            end = min(len(positions), start + self.size - self._n)
            self._positions[self._n : self._n + end - start] = positions[start:end]
            for i, crop in enumerate(crops[start:end], self._n):
                self._pixels[i] = crop
            self._n += end - start
            start = end
            if self._n == self.size:
                self.seal()

    def seal(self) -> None:
        """The batch being filled is complete (or the case ended): it joins ``ready``."""
        if self._n:
            self.ready.append(Batch(self._positions[: self._n], self._pixels[: self._n]))
            self._new()

    def take_ready(self) -> list[Batch]:
        ready, self.ready = self.ready, []
        return ready
