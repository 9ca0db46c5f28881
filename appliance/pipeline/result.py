"""What a finished case comes to: each tissue patch's score and the case's result (verdict, reasons, QC,
timings), as plain data the store, the outputs and the API take as they are."""

from __future__ import annotations

import copy
import heapq
from dataclasses import asdict, dataclass, field, fields
from typing import NamedTuple

from appliance import RESEARCH_USE_NOTICE
from appliance.model.ref import ModelRef
from appliance.pipeline.qc import Reason
from appliance.terms import CaseRule, ThresholdSource, Verdict


class PatchScore(NamedTuple):
    """One scored tissue patch. A named tuple, not a frozen dataclass: a core-needle case has about 90,000 of
    them, built on the path to the verdict, and a tuple is the cheaper to make (docs/performance.md, "Why the
    code is shaped so")."""

    x: int
    y: int
    w: int
    h: int
    probability: float  # the context stage's refined probability when the model has one, else the first stage's
    first_stage: float | None = None  # the patch classifier's own probability (models with a context stage)

    def to_dict(self) -> dict:
        d = {"x": self.x, "y": self.y, "w": self.w, "h": self.h, "probability": self.probability}
        if self.first_stage is not None:
            d["first_stage"] = self.first_stage
        return d


@dataclass
class TriageResult:
    verdict: Verdict
    score: float
    threshold: float
    patch_threshold: float  # a patch at or above it is drawn in the regions (regions.geojson)
    reasons: list[Reason]
    model: ModelRef
    timings_ms: dict[str, float]
    patches: list[PatchScore]
    tiles: int
    patches_seen: int
    early_positive: bool
    early_positive_after_tiles: int | None
    top_k: int
    case_rule: CaseRule = CaseRule.TOP_K_MEAN  # the final rule; score and threshold are its
    # the early positive's rule (first stage, never falls), top_k and threshold, and its score at the end
    early_rule: CaseRule = CaseRule.TOP_K_MEAN
    early_top_k: int = 0
    early_threshold: float = 0.0
    early_score: float = 0.0
    # whose threshold decided: the model's, or the site's accepted operating point (with its date and report)
    threshold_source: ThresholdSource = ThresholdSource.MODEL
    site_accepted_at: str | None = None
    site_report_sha256: str | None = None
    qc: dict = field(default_factory=dict)
    # what the drift watch follows (appliance.service.drift): stain angles to the model's reference (deg), focus
    # (median Laplacian variance of the focus-checked patches) and tissue area (mm^2 of tissue patches)
    measures: dict = field(default_factory=dict)
    warnings: list[Reason] = field(default_factory=list)
    microns_per_pixel: float = 0.0  # of the mosaic, heatmap and regions (the model's resolution)
    origin: list[int] = field(default_factory=lambda: [0, 0])  # input pixel position of the mosaic's 0, 0
    research_use_only: bool = True
    notice: str = RESEARCH_USE_NOTICE

    def to_dict(self) -> dict:
        """A JSON-ready copy, built by hand on the path from the last tile to the verdict: ``asdict``
        deep-copies field by field, far slower (docs/performance.md, "Why the code is shaped so")."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d.update(reasons=[asdict(r) for r in self.reasons], warnings=[asdict(w) for w in self.warnings],
                 model=self.model.to_dict(), timings_ms=dict(self.timings_ms), qc=copy.deepcopy(self.qc), measures=dict(self.measures),
                 origin=list(self.origin), patches=[p.to_dict() for p in self.patches],
                 top_patches=[p.to_dict() for p in self.top_patches()])
        return d

    def summary(self, source: str, *, skipped_inputs: list[dict] | None = None, accession: str = "") -> dict:
        """The case summary (appliance.pipeline.summary's schema, before the writer adds the case id and its
        files): the result, what it was made from (``source``: a path, or the scanner case), the inputs skipped
        and the lab's accession when known. The one place a summary is put together, for the daemon's cases and
        `appliance triage`/`batch` alike."""
        d = self.to_dict()
        d["input"] = source
        d["skipped_inputs"] = list(skipped_inputs or [])
        if accession:
            d["accession"] = accession
        return d

    def top_patches(self) -> list[PatchScore]:
        """The patches that drove the call, highest probability first."""
        return heapq.nsmallest(self.top_k, self.patches, key=lambda p: (-p.probability, p.y, p.x))
