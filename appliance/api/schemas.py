"""Public response schemas: what clients see, kept separate from the table columns."""

from __future__ import annotations

from pydantic import BaseModel, Field

from appliance import RESEARCH_USE_NOTICE
from appliance.terms import CaseFile


class Health(BaseModel):
    status: str
    version: str
    notice: str = RESEARCH_USE_NOTICE


class ReasonPublic(BaseModel):
    code: str
    message: str


class CaseFileLink(BaseModel):
    """One of a case's files that is on disk and complete, and where to get it."""

    name: CaseFile
    url: str = Field(description="path of GET /cases/{case_id}/{name}, relative to the API's base URL")
    media_type: str
    bytes: int = Field(ge=0)


class DeliveryPublic(BaseModel):
    """One message of the case to one of the lab's systems (the outbox)."""

    id: str
    destination: str
    kind: str  # hl7 or fhir
    message_id: str  # MSH-10 / DiagnosticReport.identifier: the same on every retry
    revision: int
    status: str  # pending, delivered or failed
    attempts: int
    last_error: str | None = None
    next_attempt_at: str | None = None
    created_at: str | None = None
    delivered_at: str | None = None


class CasePublic(BaseModel):
    id: str
    specimen_id: str | None = None
    accession: str | None = None  # the lab's accession / order number, when one was given
    status: str
    received_at: str | None = None
    finished_at: str | None = None
    tiles_expected: int | None = None
    tiles_received: int | None = None
    patches_scored: int | None = None
    verdict: str | None = None
    score: float | None = None
    threshold: float | None = None
    patch_threshold: float | None = None
    case_rule: str | None = None  # how score was made from the patches (the model's decision.case_rule)
    early_rule: str | None = None  # the early positive's rule and threshold (the model's decision.early)
    early_threshold: float | None = None
    early_score: float | None = None
    threshold_source: str | None = None  # whose threshold decided: model, or site (an accepted site point)
    site_accepted_at: str | None = None
    site_report_sha256: str | None = None
    measures: dict | None = None  # what the drift watch follows: stain angles, focus, tissue area, OOD score
    reasons: list[ReasonPublic] = []
    warnings: list[ReasonPublic] = []  # QC findings after an early call: reported, never dropped
    early_positive: bool | None = None
    early_positive_after_tiles: int | None = None
    model_name: str | None = None
    model_version: str | None = None
    model_sha256: str | None = None
    engine: str | None = None
    timings_ms: dict[str, float] | None = None
    signed_off_by: str | None = None
    signed_off_at: str | None = None
    sign_off_comment: str | None = None
    # Files that exist now: they appear one by one after the call (the call is stored first) and go when
    # retention removes them, so a client reads this list instead of polling each file for a 404.
    files: list[CaseFileLink] = []
    deliveries: list[DeliveryPublic] = []  # to the lab's systems, when any are configured
    research_use_only: bool = True
    notice: str = RESEARCH_USE_NOTICE


class CaseList(BaseModel):
    cases: list[CasePublic]
    limit: int
    offset: int
    notice: str = RESEARCH_USE_NOTICE


class LinkStatus(BaseModel):
    state: str
    port: str
    counters: dict[str, int | float | str | None] = {}
    last_error: str | None = None


class CaseStatus(BaseModel):
    case_id: str
    specimen_id: str | None = None
    tiles_expected: int | None = None
    tiles_received: int
    tiles_processed: int
    score: float
    early_positive: bool
    verdict: str | None = None
    failed: str | None = None  # why the case failed (its call could not be made or stored)
    eta_s: float | None = None
    warnings: list[ReasonPublic] = []


class ModelStatus(BaseModel):
    name: str
    version: str
    sha256: str
    backend: str


class StorageStatus(BaseModel):
    free_bytes: int | None = None
    min_free_bytes: int
    accepting_cases: bool
    reason: str | None = None


class StatusPublic(BaseModel):
    version: str
    problem: str | None = None  # why the daemon takes no cases at all (the model failed its checks)
    link: LinkStatus | None = None
    case: CaseStatus | None = None
    model: ModelStatus | None = None
    disk_free_bytes: int | None = None
    storage: StorageStatus | None = None
    deliveries: dict[str, int] | None = None  # messages to the lab's systems by state: pending, delivered, failed
    threshold: dict | None = None  # the threshold in force: value, source (model/site), site_accepted_at, words
    drift: dict | None = None  # the drift watch: reference, window, rule, drifted measures, warning, findings
    notice: str = RESEARCH_USE_NOTICE
