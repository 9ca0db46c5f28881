"""Finished-case results for tests that need a case in the store without running the model on it."""

from __future__ import annotations

import numpy as np

from appliance.model.ref import ModelRef
from appliance.pipeline import PatchScore, TriageResult, TriageSession
from appliance.terms import Verdict

MODEL = ModelRef("m", "1", "a" * 64, "openvino")


def a_result(verdict: str, score: float, *, patches: int = 20, early_positive_after_tiles: int | None = None,
             timings_ms: dict | None = None, model: ModelRef | None = None) -> TriageResult:
    """A TriageResult as the pipeline makes it, with ``patches`` evenly scored patches."""
    return TriageResult(
        verdict=Verdict(verdict), score=score, threshold=0.5, patch_threshold=0.5, reasons=[], model=model or MODEL,
        timings_ms=timings_ms or {}, patches=[PatchScore(50 * i, 0, 50, 50, score) for i in range(patches)],
        tiles=3, patches_seen=patches, early_positive=early_positive_after_tiles is not None,
        early_positive_after_tiles=early_positive_after_tiles, top_k=15)


def reference_call(engine, tiles, *, scanner_mpp: float | None = None, width: int | None = None,
                   height: int | None = None) -> TriageResult:
    """The call the same tiles get when nothing goes wrong on the way: the daemon's own session code, fed
    directly in order (what a streamed, faulted, restarted or backlogged case must come to)."""
    session = TriageSession(engine, scanner_mpp=scanner_mpp, width=width, height=height)
    try:
        for t in tiles:
            session.add_tile(t.x, t.y, np.ascontiguousarray(t.pixels))
        return session.finish()
    finally:
        session.close()
