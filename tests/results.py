"""Finished-case results for tests that need a case in the store without running the model on it."""

from __future__ import annotations

from appliance.pipeline import PatchScore, TriageResult
from appliance.terms import Verdict

MODEL = {"name": "m", "version": "1", "sha256": "a" * 64, "backend": "openvino"}


def a_result(verdict: str, score: float, *, patches: int = 20, early_positive_after_tiles: int | None = None,
             timings_ms: dict | None = None, model: dict | None = None) -> TriageResult:
    """A TriageResult as the pipeline makes it, with ``patches`` evenly scored patches."""
    return TriageResult(
        verdict=Verdict(verdict), score=score, threshold=0.5, patch_threshold=0.5, reasons=[], model=model or MODEL,
        timings_ms=timings_ms or {}, patches=[PatchScore(50 * i, 0, 50, 50, score) for i in range(patches)],
        tiles=3, patches_seen=patches, early_positive=early_positive_after_tiles is not None,
        early_positive_after_tiles=early_positive_after_tiles, top_k=15)
