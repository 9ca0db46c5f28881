"""Where a case's time goes: wall and CPU milliseconds per pipeline stage.

Wall time is what the technician waits; the calling thread's CPU time is what a stage costs. On a 2-core bench
PC the pipeline's thread shares the cores with the inference engine's, so a stage's wall time includes waiting
for a core and swings with the engine's load, while its CPU time does not.
"""

from __future__ import annotations

import time
from collections import defaultdict


class StageClock:
    """``lap(stage)`` charges the time since the last mark to ``stage``; ``mark()`` starts a new interval
    (so time spent outside the pipeline, e.g. the caller reading the next tile, is charged to nothing)."""

    def __init__(self) -> None:
        self.wall_ms: dict[str, float] = defaultdict(float)
        self.cpu_ms: dict[str, float] = defaultdict(float)
        self.mark()

    def mark(self) -> None:
        self._wall, self._cpu = time.perf_counter(), time.thread_time()

    def lap(self, stage: str) -> None:
        wall, cpu = time.perf_counter(), time.thread_time()
        self.wall_ms[stage] += (wall - self._wall) * 1e3
        self.cpu_ms[stage] += (cpu - self._cpu) * 1e3
        self._wall, self._cpu = wall, cpu

    def timings(self) -> dict[str, float]:
        """Each stage's wall milliseconds under its name and its CPU milliseconds under ``<name>_cpu``."""
        out = {k: round(v, 3) for k, v in self.wall_ms.items()}
        out.update({f"{k}_cpu": round(v, 3) for k, v in self.cpu_ms.items()})
        return out
