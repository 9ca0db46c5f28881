"""The schema of a case summary: `appliance triage --json`, each case's summary.json and the store's result."""

from __future__ import annotations

import gc
from contextlib import contextmanager
from typing import Literal

from pydantic import BaseModel, ConfigDict
from typing_extensions import NotRequired, TypedDict

from appliance.terms import CaseRule, ThresholdSource, Verdict


class _Closed(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ReasonOut(_Closed):
    code: str
    message: str


# A TypedDict, not a model: pydantic checks a case's 87,000 patches in its core without making an object of
# each, with the same checks (the types, no key missing, no extra key) in a fraction of the time
# (docs/performance.md, "Why the code is shaped so").
class PatchOut(TypedDict):
    """One scored patch."""

    __pydantic_config__ = ConfigDict(extra="forbid")  # type: ignore[misc]
    x: int
    y: int
    w: int
    h: int
    probability: float  # refined by the context stage when the model has one
    first_stage: NotRequired[float | None]  # the patch classifier's own probability, beside the refined one


class SkippedOut(_Closed):
    name: str
    reason: str


class SlideOut(_Closed):
    """What was read from a slide file (appliance.offline.slides.SlideInfo)."""

    reader: str
    vendor: str
    width: int
    height: int
    microns_per_pixel: float
    mpp_source: Literal["slide", "given"]
    level: int
    downsample: float
    level_microns_per_pixel: float


class TriageSummary(_Closed):
    verdict: Verdict
    score: float
    threshold: float
    patch_threshold: float
    reasons: list[ReasonOut]
    warnings: list[ReasonOut]
    model: dict[str, str]
    timings_ms: dict[str, float]
    patches: list[PatchOut]
    top_patches: list[PatchOut]
    tiles: int
    patches_seen: int
    early_positive: bool
    early_positive_after_tiles: int | None
    top_k: int
    case_rule: CaseRule
    early_rule: CaseRule
    early_top_k: int
    early_threshold: float
    early_score: float
    threshold_source: ThresholdSource
    site_accepted_at: str | None
    site_report_sha256: str | None
    qc: dict
    measures: dict
    microns_per_pixel: float
    origin: list[int]
    research_use_only: Literal[True]
    notice: str
    input: str
    skipped_inputs: list[SkippedOut]
    case_id: str | None = None
    outputs: list[str] | None = None
    slide: SlideOut | None = None  # a slide file: what was read; patch positions are then in its level-0 pixels
    accession: str | None = None  # the lab's accession / order number, when the scanner or the operator gave one


def validated(summary: dict) -> dict:
    """Check a summary against the schema (raises pydantic.ValidationError) and return it unchanged."""
    with _collector_paused():
        TriageSummary.model_validate(summary)
    return summary


@contextmanager
def _collector_paused():
    """Python's cyclic garbage collector off for a moment (unless something else had it off already): the
    objects made while validating a large case's patches set off collections that walk the whole heap, a
    large share of the validation's time (docs/performance.md, "Why the code is shaped so"). They hold no cycles:
    reference counting frees them."""
    was_on = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_on:
            gc.enable()
