"""Result assembly: the finished case's TriageResult from what the session's parts measured.

The scored patches in cut order (``ScoredPatches``), refined by the context stage when the model has one, the
early rule's figures and checkpoint (appliance.pipeline.checkpoints) and the case's QC go through the call's
pure functions (appliance.pipeline.decision); the patches are reported in the input's own pixels.
"""

from __future__ import annotations

import time

import numpy as np

from appliance.model import ood
from appliance.model.engine import Engine
from appliance.pipeline import decision
from appliance.pipeline.checkpoints import Checkpoints
from appliance.pipeline.clock import StageClock
from appliance.pipeline.context import refine
from appliance.pipeline.heatmap import Heatmap
from appliance.pipeline.patches import Positions
from appliance.pipeline.qc import CaseQc
from appliance.pipeline.resample import CaseFrame
from appliance.pipeline.result import PatchScore, TriageResult

__all__ = ["Assembly", "ScoredPatches", "case_measures", "ood_limit", "patch_scores"]


class ScoredPatches:
    """The scored batches as they are folded, in cut order: their patches' positions, first-stage probabilities
    (float64, rounded) and, for a model with the OOD gate, each patch's distance from the development patches."""

    def __init__(self) -> None:
        self._positions: list[Positions] = []
        self._probabilities: list[np.ndarray] = []
        self._distances: list[np.ndarray] = []

    def add(self, pos: Positions, probs: np.ndarray, distances: np.ndarray | None) -> None:
        if distances is not None:
            self._distances.append(distances)
        self._positions.append(pos)
        self._probabilities.append(probs)

    def positions(self) -> Positions:
        return np.concatenate(self._positions) if self._positions else np.zeros((0, 4), np.int64)

    def probabilities(self) -> np.ndarray:
        return np.concatenate(self._probabilities) if self._probabilities else np.zeros(0)

    @property
    def ood_score(self) -> float | None:
        """The case's out-of-distribution score so far (the median of its scored patches' distances; None for a
        model without the gate, or before any patch is scored)."""
        return ood.case_score(np.concatenate(self._distances)) if self._distances else None


def patch_scores(frame: CaseFrame, pos: Positions, first: np.ndarray, refined: np.ndarray | None
                 ) -> list[PatchScore]:
    """The scored patches in the input's pixels, sorted by row then column (the refined probability beside the
    first stage's, when the model has a context stage)."""
    where = frame.to_input(pos)
    order = np.lexsort((where[:, 0], where[:, 1]))  # stable: as sorting the cut order by (y, x)
    columns = [c.tolist() for c in where[order].T]
    if refined is None:
        return [PatchScore(*c) for c in zip(*columns, first[order].tolist())]
    return [PatchScore(*c) for c in zip(*columns, refined[order].tolist(), first[order].tolist())]


def case_measures(qc: CaseQc, patches: int, stride: int, mpp: float, ood_score: float | None
                  ) -> dict[str, float | None]:
    """What the drift watch follows for a case (appliance.service.drift). Tissue area counts each of the
    ``patches`` scored patches' ``stride`` x ``stride`` cell at ``mpp`` microns per pixel (the patches tile
    the tissue)."""
    angles = qc.stain_angles()
    cell_mm = stride * mpp / 1000.0
    return {"stain_h_deg": round(angles[0], 2) if angles else None,
            "stain_e_deg": round(angles[1], 2) if angles else None,
            "focus": qc.focus_median,
            "tissue_mm2": round(patches * cell_mm * cell_mm, 4),
            "ood": ood_score}


def ood_limit(engine: Engine) -> float | None:
    """The OOD score above which a case cannot be called (None for a model without the gate)."""
    spec = engine.manifest.ood
    return spec.max_score if spec is not None and engine.has_ood else None


class Assembly:
    """Builds a finished case's TriageResult (``result``) and keeps its patches (``patches``) for the case's
    files. Holds the model's manifest objects (``decision``, ``patch``, ``image``: its input), the thresholds in
    force and the session's parts it reads; ``clock`` is charged the context stage's and the result's time."""

    def __init__(self, engine: Engine, thresholds: decision.ThresholdInForce, *, qc: CaseQc, heatmap: Heatmap,
                 frame: CaseFrame, early: Checkpoints, scored: ScoredPatches, clock: StageClock):
        m = engine.manifest
        self.engine, self.decision, self.patch, self.image = engine, m.decision, m.patch, m.input
        self.thresholds = thresholds
        self.qc, self.heatmap, self.frame, self.clock = qc, heatmap, frame, clock
        self.early, self.scored = early, scored
        self.patches: list[PatchScore] = []  # the result's patches, once assembled

    def result(self, *, tiles: int, patches_seen: int, started: float) -> TriageResult:
        """The call on every folded patch: ``tiles`` and ``patches_seen`` as the session counted them, and its
        ``started`` time (perf_counter) for the total."""
        pos, first = self.scored.positions(), self.scored.probabilities()
        refined = None
        if self.engine.has_context:
            refined = self._refine(pos, first) if len(first) else np.zeros(0)
        early, spec, thresholds = self.early, self.decision, self.thresholds
        early_score = early.score
        score = decision.final_score(spec.case_rule, spec.top_k, early_score,
                                     None if refined is None else refined.tolist())
        ood_score, limit = self.scored.ood_score, ood_limit(self.engine)
        reasons = decision.cannot_call_reasons(tiles=tiles, patches_scored=early.folded, patches_seen=patches_seen,
                                               qc_reasons=self.qc.reasons() + decision.ood_reasons(ood_score, limit),
                                               min_patches=spec.min_patches)
        verdict, reasons, warnings = decision.make_call(early_positive=early.early_positive, reasons=reasons,
                                                        score=score, threshold=thresholds.threshold)
        self.patches = patch_scores(self.frame, pos, first, refined)
        self.clock.lap("result")
        timings = self.clock.timings()
        timings["total"] = round((time.perf_counter() - started) * 1e3, 3)
        return TriageResult(
            verdict=verdict,
            score=round(score, 6),
            threshold=thresholds.threshold,
            patch_threshold=spec.patch_threshold,
            reasons=reasons,
            model=self.engine.model_ref,
            timings_ms=timings,
            patches=list(self.patches),
            tiles=tiles,
            patches_seen=patches_seen,
            early_positive=early.early_positive,
            early_positive_after_tiles=early.after_tiles,
            top_k=spec.top_k,
            case_rule=spec.case_rule,
            early_rule=early.rule.rule,
            early_top_k=early.rule.top_k,
            early_threshold=thresholds.early_threshold,
            early_score=round(early_score, 6),
            threshold_source=thresholds.source,
            site_accepted_at=thresholds.site_accepted_at,
            site_report_sha256=thresholds.site_report_sha256,
            qc={**self.qc.summary(), "ood_score": ood_score, "ood_max_score": limit},
            measures=case_measures(self.qc, early.folded, self.patch.stride, self.image.microns_per_pixel,
                                   ood_score),
            warnings=warnings,
            microns_per_pixel=self.image.microns_per_pixel,
            origin=list(self.frame.origin),
        )

    def _refine(self, pos: Positions, first: np.ndarray) -> np.ndarray:
        """The context stage over the whole case grid: each patch's refined probability (the final rule's input
        when it is the refined rule); the heatmap is drawn from them."""
        self.clock.lap("result")
        stride = self.patch.stride
        refined = refine(self.engine, pos[:, 0] // stride, pos[:, 1] // stride, first)
        self.heatmap.add_many(pos[:, 0], pos[:, 1], pos[:, 2], pos[:, 3], refined)
        self.clock.lap("context")
        return refined
