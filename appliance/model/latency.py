"""Batch inference latency, for /metrics."""

from __future__ import annotations

import threading


class LatencyHistogram:
    """Batch inference latency (seconds, cumulative buckets), for /metrics; thread-safe."""

    BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

    def __init__(self):
        self._lock = threading.Lock()
        self.counts = [0] * (len(self.BUCKETS) + 1)
        self.total = 0.0
        self.n = 0

    def observe(self, seconds: float) -> None:
        with self._lock:
            i = next((k for k, b in enumerate(self.BUCKETS) if seconds <= b), len(self.BUCKETS))
            self.counts[i] += 1
            self.total += seconds
            self.n += 1

    def snapshot(self) -> tuple[list[tuple[float, int]], float, int]:
        """([(upper bound, cumulative count)], sum, count) with +inf last."""
        with self._lock:
            cum, out = 0, []
            for b, c in zip((*self.BUCKETS, float("inf")), self.counts):
                cum += c
                out.append((b, cum))
            return out, self.total, self.n
