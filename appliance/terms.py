"""The words of the system, defined once: verdicts, case statuses, event kinds, case files, id patterns,
engine names and case rules. The store, pipeline, API and TUI all take them from here, so a rename is one
edit. Each is a ``StrEnum``: a member *is* its string, so it goes into SQLite, JSON and HTTP unchanged."""

from __future__ import annotations

import re
from enum import StrEnum


# Said on every verdict, report and screen.
RESEARCH_USE_NOTICE = "For research and triage only. Not for diagnosis."


class Verdict(StrEnum):
    """The triage call (research use only)."""

    SUSPICIOUS = "suspicious"
    BENIGN = "benign-appearing"
    CANNOT_CALL = "cannot-call"


class CaseStatus(StrEnum):
    """Where a case is in its life; the first two are open, the rest finished."""

    RECEIVING = "receiving"
    PROCESSING = "processing"
    DONE = "done"
    CANNOT_CALL = "cannot-call"
    FAILED = "failed"
    ABANDONED = "abandoned"

    @property
    def finished(self) -> bool:
        return self not in (CaseStatus.RECEIVING, CaseStatus.PROCESSING)


OPEN_STATUSES = tuple(s for s in CaseStatus if not s.finished)
FINISHED_STATUSES = tuple(s for s in CaseStatus if s.finished)


class EventKind(StrEnum):
    """Kinds of live event the daemon publishes (SSE stream, demo progress, the TUI)."""

    READY = "ready"
    NOT_READY = "not-ready"  # started degraded: the model failed its checks
    API = "api"
    LINK = "link"
    REFUSED = "refused"
    CASE_STARTED = "case-started"
    TILE = "tile"
    CASE_ENDED = "case-ended"
    RESUMED = "resumed"
    EARLY_POSITIVE = "early-positive"
    FINISHED = "finished"
    QC_WARNING = "qc-warning"
    OUTPUTS = "outputs"
    ERROR = "error"
    FAILED = "failed"
    ABANDONED = "abandoned"
    PURGED = "purged"  # retention removed a finished case's files (its row stays)
    PURGE_FAILED = "purge-failed"  # retention could not remove them all; tried again next time
    DRIFT = "drift"  # the drift watch found recent cases outside the reference range (or back inside it)
    SITE_ACCEPTED = "site-accepted"  # a site operating point was accepted (appliance site accept)
    SITE_RESET = "site-reset"  # it was undone: the model's threshold is in force again
    DROPPED = "dropped"  # live stream only: a subscriber that fell behind lost events here


# Lifecycle events also kept in the store's events table (per-tile progress is not: it is in the tiles table).
RECORDED_EVENTS = frozenset(EventKind) - {EventKind.TILE, EventKind.API, EventKind.DROPPED}


class ReasonCode(StrEnum):
    """The code of a reason a case has no call (beside its sentence for people), as a machine reads it."""

    NO_TILES = "no-tiles"
    NO_TISSUE = "no-tissue"
    TOO_LITTLE_TISSUE = "too-little-tissue"
    OUT_OF_FOCUS = "out-of-focus"
    OVER_EXPOSED = "over-exposed"
    STAIN_OUT_OF_RANGE = "stain-out-of-range"
    STAIN_NOT_ASSESSABLE = "stain-not-assessable"  # tissue, but its stain could not be measured: fail closed
    OUT_OF_DISTRIBUTION = "out-of-distribution"  # unlike the cases the model was validated on (its own features)
    ABANDONED = "abandoned"  # the scanner went silent mid-case
    FAILED = "failed"  # the call could not be made or stored


class BatchStatus(StrEnum):
    """How one input of ``appliance batch`` (and of a site validation) came out."""

    DONE = "done"
    FAILED = "failed"
    SKIPPED = "skipped"  # recorded by an earlier run


class ThresholdSource(StrEnum):
    """Whose threshold decided a call: the model's own (its manifest), or the site's accepted validation."""

    MODEL = "model"
    SITE = "site"


class CaseFile(StrEnum):
    """The files written for each finished case, in its folder under ``cases/``."""

    SUMMARY = "summary.json"
    OVERLAY = "overlay.png"
    THUMBNAIL = "thumbnail.png"
    HEATMAP = "heatmap.png"
    TOP_PATCHES = "top_patches.png"
    TOP_PATCHES_JSON = "top_patches.json"  # where they are in case.ome.tif, and their class-activation maps
    REGIONS = "regions.geojson"
    CASE_OME = "case.ome.tif"
    HEATMAP_OME = "heatmap.ome.tif"

    @property
    def media_type(self) -> str:
        return _MEDIA_TYPES[self.value.rsplit(".", 1)[1]]


_MEDIA_TYPES = {"json": "application/json", "png": "image/png", "geojson": "application/geo+json", "tif": "image/tiff"}


class EngineName(StrEnum):
    """Inference engines: OpenVINO (INT8 IR, the default) and ONNX Runtime (FP32 ONNX, the fallback)."""

    OPENVINO = "openvino"
    ONNXRUNTIME = "onnxruntime"


class CaseRule(StrEnum):
    """How a case's score is made from its patch probabilities (the manifest's decision.case_rule and
    decision.early.rule). All but TOP_K_MEAN_REFINED use first-stage probabilities, which never change once
    scored, so their score never falls as tiles arrive (MONOTONE_RULES); the refined rule is known only when the
    case ends, after the context stage."""

    TOP_K_MEAN = "top-k-mean"
    LARGEST_REGION_AREA = "largest-region-area"
    LARGEST_REGION_MASS = "largest-region-mass"
    TOP_K_MEAN_REFINED = "top-k-mean-refined"


MONOTONE_RULES = frozenset({CaseRule.TOP_K_MEAN, CaseRule.LARGEST_REGION_AREA, CaseRule.LARGEST_REGION_MASS})


def whose_threshold(record: dict) -> str:
    """Whose threshold decided a call, from a case record or summary: "model's", or "site, accepted <date>" (a
    site operating point), as the verdict card and the demo put it beside the threshold."""
    if record.get("threshold_source") == ThresholdSource.SITE:
        return f"site, accepted {(record.get('site_accepted_at') or '?')[:10]}"
    return "model's"


def rule_words(rule: str | None, top_k: int | None = None) -> str:
    """A case rule in words, for screens, pictures and printed verdicts."""
    k = f" {top_k}" if top_k else ""
    return {CaseRule.TOP_K_MEAN: f"mean of the top{k} patch probabilities",
            CaseRule.TOP_K_MEAN_REFINED: f"mean of the top{k} refined patch probabilities",
            CaseRule.LARGEST_REGION_AREA: "cells in the largest suspicious region",
            CaseRule.LARGEST_REGION_MASS: "summed probability of the largest suspicious region"}.get(rule, "case score")


# A case id as the scanner sends it and as it names a folder: no path separators, no leading dot.
class DeliveryStatus(StrEnum):
    """Where one message to the lab's systems stands (the outbox)."""

    PENDING = "pending"  # to be sent, now or after a backoff
    DELIVERED = "delivered"  # the receiver acknowledged it (HL7 AA, FHIR 2xx)
    FAILED = "failed"  # rejected (HL7 AE/AR, FHIR 4xx) or not buildable: an operator decides


CASE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
CASE_ID = re.compile(CASE_ID_PATTERN)
# The lab's accession / order number as an operator types it (a scanner's may be any text up to 255 bytes).
ACCESSION_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._/:-]{0,63}$"
ACCESSION = re.compile(ACCESSION_PATTERN)
# The FHIR identifier and code systems' default base: a placeholder domain (RFC 2606 keeps .example for that),
# so a message never claims a real organisation's namespace; a lab sets its own (lis_fhir_system_base).
DEFAULT_FHIR_SYSTEM_BASE = "https://bench-triage.example/fhir"
# A technician's initials on a sign-off or an action (letters, spaces, dots, apostrophes, hyphens).
INITIALS_PATTERN = r"^[A-Za-z][A-Za-z .'-]*$"
