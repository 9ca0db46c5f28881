"""Scoring batches through an engine: at once (Scorer), or with OpenVINO requests in flight (AsyncScorer)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import numpy as np

from appliance.errors import EngineError

if TYPE_CHECKING:
    from appliance.model.engine import Engine, OpenVINOEngine

Scored = tuple[object, np.ndarray, "np.ndarray | None"]  # (tag, probabilities, OOD distances or None)


class Scorer:
    """Synchronous scorer: ``submit`` scores at once; ``done`` hands back (tag, probabilities, OOD distances or
    None) in order."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self._done: list[Scored] = []

    def submit(self, batch: np.ndarray, tag: object) -> None:
        t0 = time.perf_counter()
        self._done.append((tag, *self.engine.score(batch)))
        self.engine.latency.observe(time.perf_counter() - t0)

    def done(self) -> list[Scored]:
        """Results finished so far (each returned once)."""
        out, self._done = self._done, []
        return out

    def wait(self) -> list[Scored]:
        """Block until everything submitted is scored; returns the results not yet handed back."""
        return self.done()

    def close(self) -> None:
        pass


class AsyncScorer(Scorer):
    """OpenVINO requests started without waiting: inference runs on OpenVINO's threads while the caller cuts
    the next tile's patches. No Python callback: finished requests are collected on the caller's thread (a
    callback would make OpenVINO's threads queue for the GIL behind the caller's numpy work)."""

    def __init__(self, engine: OpenVINOEngine, jobs: int = 2):
        super().__init__(engine)
        from collections import deque

        self._idle = deque(engine._compiled.create_infer_request() for _ in range(jobs))
        self._busy: deque = deque()  # (request, tag), oldest first
        self._started: dict[int, float] = {}

    def _harvest(self, req, tag) -> None:
        self.engine.latency.observe(time.perf_counter() - self._started.pop(id(req), time.perf_counter()))
        try:
            probs, features = self.engine.outputs_of(req)
        except RuntimeError as exc:
            raise EngineError(f"openvino: asynchronous inference failed: {exc}") from None
        distances = None if features is None else self.engine._distances(features, len(probs))
        self._done.append((tag, probs, distances))
        self._idle.append(req)

    def submit(self, batch: np.ndarray, tag: object) -> None:
        self.engine._check_batch(batch)
        if not self._idle:  # all requests busy: wait for the oldest
            req, old = self._busy.popleft()
            req.wait()
            self._harvest(req, old)
        req = self._idle.popleft()
        self._started[id(req)] = time.perf_counter()
        req.start_async({0: np.ascontiguousarray(batch)})
        self._busy.append((req, tag))

    def done(self) -> list[Scored]:
        while self._busy and self._busy[0][0].wait_for(0):
            req, tag = self._busy.popleft()
            self._harvest(req, tag)
        return super().done()

    def wait(self) -> list[Scored]:
        while self._busy:
            req, tag = self._busy.popleft()
            req.wait()
            self._harvest(req, tag)
        return super().done()

    def close(self) -> None:
        for req, _ in self._busy:
            req.wait()
        self._busy.clear()
