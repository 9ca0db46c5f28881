"""Multi-instance aggregation: the case score from the first-stage patch probabilities.

Two kinds of rule, both of which never fall as patches are added (so an early positive is final): the mean of
the top-k probabilities, and the area or mass of the largest connected region of cells at or above a threshold.
"""

from __future__ import annotations

import heapq

import numpy as np

from appliance.terms import CaseRule


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

    def add_many(self, probabilities) -> None:
        """Add many at once: the same top k as adding them one by one (the k largest of a multiset of values are
        one multiset, whatever the order), with one partition instead of a heap step per patch."""
        values = np.asarray(probabilities, dtype=np.float64)
        self.count += len(values)
        if len(values) > self.k:
            values = np.partition(values, len(values) - self.k)[len(values) - self.k :]
        merged = self._heap + values.tolist()
        if len(merged) > self.k:
            merged = heapq.nlargest(self.k, merged)
        heapq.heapify(merged)
        self._heap = merged

    @property
    def full(self) -> bool:
        return len(self._heap) >= self.k

    @property
    def score(self) -> float:
        """Mean of the top min(k, n) probabilities; 0.0 before any patch."""
        # summed in sorted order so the score does not depend on the order results arrived in
        return sum(sorted(self._heap)) / len(self._heap) if self._heap else 0.0


class LargestRegion:
    """Streaming largest connected region of hot cells on the patch grid.

    A cell is hot when its probability is at or above the patch threshold; hot cells that share an edge
    form a region (4-connected, as the drawn regions). ``area`` is the cell count of the largest region and
    ``mass`` the largest sum of probabilities over a region. Cells are only ever added and a cell's
    probability never changes, so a region can only grow or merge with another: both figures never fall
    as tiles arrive, which makes an early positive on them final.
    """

    def __init__(self, threshold: float):
        self.threshold = threshold
        self._parent: dict[tuple[int, int], tuple[int, int]] = {}
        self._area: dict[tuple[int, int], int] = {}
        self._mass: dict[tuple[int, int], float] = {}
        self.area = 0
        self.mass = 0.0

    def _root(self, c):
        parent = self._parent
        while parent[c] != c:
            parent[c] = parent[parent[c]]
            c = parent[c]
        return c

    def add(self, gx: int, gy: int, probability: float) -> None:
        if probability < self.threshold:
            return
        c = (gx, gy)
        if c in self._parent:
            raise ValueError(f"grid cell {c} added twice")
        self._parent[c] = c
        self._area[c] = 1
        self._mass[c] = probability
        root = c
        for n in ((gx - 1, gy), (gx + 1, gy), (gx, gy - 1), (gx, gy + 1)):
            if n in self._parent:
                r = self._root(n)
                if r != root:
                    big, small = (root, r) if self._area[root] >= self._area[r] else (r, root)
                    self._parent[small] = big
                    self._area[big] += self._area.pop(small)
                    self._mass[big] += self._mass.pop(small)
                    root = big
        self.area = max(self.area, self._area[root])
        self.mass = max(self.mass, self._mass[root])


def largest_region(gx, gy, probability, threshold: float) -> tuple[int, float]:
    """(area, mass) of the largest regions of a whole grid at once (see LargestRegion)."""
    r = LargestRegion(threshold)
    for x, y, p in zip(gx.tolist(), gy.tolist(), probability.tolist()):
        r.add(x, y, p)
    return r.area, r.mass


def case_score(rule: str, top_k: int, region_threshold: float | None, gx, gy, probability) -> float:
    """A whole case's score under ``rule`` (the manifest's decision.case_rule) from its first-stage probabilities
    at grid cells gx, gy, exactly as a streaming case computes it."""
    probability = np.asarray(probability, dtype=np.float64)
    if rule == CaseRule.TOP_K_MEAN:
        t = TopKMean(top_k)
        t.add_many(probability)
        return t.score
    area, mass = largest_region(np.asarray(gx), np.asarray(gy), probability, region_threshold)
    if rule == CaseRule.LARGEST_REGION_AREA:
        return float(area)
    if rule == CaseRule.LARGEST_REGION_MASS:
        return mass
    raise ValueError(f"unknown case rule {rule!r}")
