"""Multi-instance aggregation: the case score is the mean of the top-k patch probabilities."""

from __future__ import annotations

import heapq


class TopKMean:
    """Streaming top-k mean.

    Once at least k patches are in, adding a patch can only keep or raise the mean, which is what
    makes an early positive call final.
    """

    def __init__(self, k: int):
        if k < 1:
            raise ValueError("k must be at least 1")
        self.k = k
        self._heap: list[float] = []
        self.count = 0

    def add(self, probability: float) -> None:
        self.count += 1
        if len(self._heap) < self.k:
            heapq.heappush(self._heap, probability)
        elif probability > self._heap[0]:
            heapq.heapreplace(self._heap, probability)

    @property
    def full(self) -> bool:
        return len(self._heap) >= self.k

    @property
    def score(self) -> float:
        """Mean of the top min(k, n) probabilities; 0.0 before any patch."""
        # summed in sorted order so the score does not depend on the order results arrived in
        return sum(sorted(self._heap)) / len(self._heap) if self._heap else 0.0
