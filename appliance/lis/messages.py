"""What a call looks like to the lab's systems: an HL7 v2.5.1 ORU^R01 and a FHIR R4B DiagnosticReport with
its Observations, built from a ReportedCall (pure functions: the same call and revision give the same message).

Each message carries the case id and a stable message id, ``<case id>.r<revision>``: a retried message is
the same message, and a receiver that has seen the id can drop it. The revision is 1 for the first call and
goes up when the case is signed off or its call amended, so those are new messages (HL7 result status C,
FHIR status ``amended``).
"""

from __future__ import annotations

from dataclasses import dataclass

from appliance import RESEARCH_USE_NOTICE
from appliance.model.ref import ModelRef
from appliance.pipeline.qc import Reason
from appliance.terms import ThresholdSource

SENDING_APPLICATION = "BENCH-TRIAGE"
ID_SYSTEM = "urn:bench-triage-appliance:message-id"
CASE_SYSTEM = "urn:bench-triage-appliance:case-id"


def message_id(case_id: str, revision: int) -> str:
    return f"{case_id}.r{revision}"


@dataclass(frozen=True)
class ReportedCall:
    """What one revision of a case's call says to the lab's systems: typed, from the case as the store holds it
    once its call is committed (so a first call, a sign-off and a resend all say the same thing)."""

    case_id: str
    specimen_id: str
    revision: int
    verdict: str
    score: float | None
    threshold: float | None
    threshold_source: str | None
    site_accepted_at: str | None
    site_report_sha256: str | None
    reasons: tuple[Reason, ...]
    model: ModelRef
    finished_at: str | None
    signed_off_by: str | None

    @classmethod
    def of_case(cls, case: dict, revision: int) -> "ReportedCall":
        """From a cases row as the store reads it (its reasons already a list of {code, message})."""
        return cls(case_id=case["id"], specimen_id=case.get("specimen_id") or "", revision=revision,
                   verdict=case.get("verdict") or "", score=case.get("score"), threshold=case.get("threshold"),
                   threshold_source=case.get("threshold_source"), site_accepted_at=case.get("site_accepted_at"),
                   site_report_sha256=case.get("site_report_sha256"),
                   reasons=tuple(Reason(r["code"], r["message"]) for r in case.get("reasons") or ()),
                   model=ModelRef.from_columns(case), finished_at=case.get("finished_at"),
                   signed_off_by=case.get("signed_off_by"))

    @property
    def message_id(self) -> str:
        return message_id(self.case_id, self.revision)

    @property
    def first(self) -> bool:
        """The first call (HL7 result status F, FHIR final); later revisions are corrections (C, amended)."""
        return self.revision == 1

    def threshold_words(self) -> str:
        """Whose threshold decided the call, in words: the model's, or the site's with its acceptance date."""
        value = "?" if self.threshold is None else f"{self.threshold:.6f}"
        if self.threshold_source == ThresholdSource.SITE:
            return (f"site threshold {value} (site validation accepted {self.site_accepted_at or '?'}, "
                    f"report sha256 {self.site_report_sha256 or '?'})")
        return f"model threshold {value}"


# --------------------------------------------------------------------------------------------- HL7 v2
def _esc(text: object) -> str:
    """HL7 v2 escaping of the delimiters (|^~\\&) and line breaks in a text value."""
    out = str(text).replace("\\", "\\E\\").replace("|", "\\F\\").replace("^", "\\S\\").replace("~", "\\R\\")
    return out.replace("&", "\\T\\").replace("\r", " ").replace("\n", " ")


def _hl7_time(iso: str | None) -> str:
    """ISO 8601 (UTC) -> HL7 DTM with its offset, e.g. 20261129003011+0000."""
    if not iso:
        return ""
    digits = "".join(c for c in iso[:19] if c.isdigit())
    return f"{digits}+0000"


def hl7_oru(call: ReportedCall, created_at: str) -> str:
    """ORU^R01 (v2.5.1) for the case's call; segments separated by CR, as MLLP carries them."""
    status = "F" if call.first else "C"
    when = _hl7_time(call.finished_at)
    reasons = "~".join(_esc(f"{r.code}: {r.message}") for r in call.reasons)
    observations = [
        ("ST", "TRIAGE-CALL^Triage call^L", _esc(call.verdict)),
        ("NM", "TRIAGE-SCORE^Case score (top-k mean)^L", "" if call.score is None else f"{call.score:.6f}"),
        ("NM", "TRIAGE-THRESHOLD^Case threshold^L", "" if call.threshold is None else f"{call.threshold:.6f}"),
        ("ST", "TRIAGE-THRESHOLD-SOURCE^Threshold that decided the call^L", _esc(call.threshold_words())),
        ("TX", "TRIAGE-REASONS^Reasons the case cannot be called^L", reasons),
        ("ST", "TRIAGE-MODEL^Model name, version and sha256^L", _esc(call.model.words())),
        ("TX", "RESEARCH-USE^Intended use^L", _esc(RESEARCH_USE_NOTICE)),
    ]
    if call.signed_off_by:
        observations.append(("ST", "SIGNED-OFF^Signed off by^L", _esc(call.signed_off_by)))
    segments = [
        f"MSH|^~\\&|{SENDING_APPLICATION}|BENCH|LIS|LAB|{_hl7_time(created_at)}||ORU^R01^ORU_R01"
        f"|{_esc(call.message_id)}|P|2.5.1",
        f"PID|1||{_esc(call.specimen_id or call.case_id)}^^^{SENDING_APPLICATION}^SPEC",
        f"OBR|1||{_esc(call.case_id)}^{SENDING_APPLICATION}|TRIAGE^Breast core triage (research use)^L|||{when}"
        f"|||||||||||||||{when}||SP|{status}",
    ]
    for n, (kind, code, value) in enumerate(observations, start=1):
        segments.append(f"OBX|{n}|{kind}|{code}||{value}||||||{status}")
    segments.append(f"NTE|1||{_esc(RESEARCH_USE_NOTICE)}")
    return "\r".join(segments)


# ----------------------------------------------------------------------------------------------- FHIR
def fhir_report(call: ReportedCall, created_at: str) -> dict:
    """A DiagnosticReport (FHIR R4B) with the call, score and reasons as contained Observations, validated by
    fhir.resources; returned as JSON-ready dict."""
    from fhir.resources.R4B.diagnosticreport import DiagnosticReport

    status = "final" if call.first else "amended"
    when = call.finished_at or created_at

    def obs(oid: str, code: str, text: str, value: dict) -> dict:
        return {"resourceType": "Observation", "id": oid, "status": status,
                "code": {"coding": [{"system": "urn:bench-triage-appliance:observation", "code": code}],
                         "text": text},
                "effectiveDateTime": when, "note": [{"text": RESEARCH_USE_NOTICE}], **value}

    contained = [obs("call", "triage-call", "Triage call", {"valueString": call.verdict})]
    if call.score is not None:
        contained.append(obs("score", "triage-score", "Case score (top-k mean)",
                             {"valueQuantity": {"value": round(float(call.score), 6), "unit": "1"}}))
    if call.threshold is not None:
        contained.append(obs("threshold", "triage-threshold", "Threshold that decided the call",
                             {"valueQuantity": {"value": round(float(call.threshold), 6), "unit": "1"},
                              "note": [{"text": call.threshold_words()}, {"text": RESEARCH_USE_NOTICE}]}))
    for i, r in enumerate(call.reasons, start=1):
        contained.append(obs(f"reason{i}", "triage-reason", "Reason the case cannot be called",
                             {"valueString": f"{r.code}: {r.message}"}))
    report = {
        "resourceType": "DiagnosticReport",
        "identifier": [{"system": ID_SYSTEM, "value": call.message_id},
                       {"system": CASE_SYSTEM, "value": call.case_id}],
        "status": status,
        "code": {"text": "Breast core-needle biopsy triage (research use)"},
        "effectiveDateTime": when,
        "issued": created_at,
        "contained": contained,
        "result": [{"reference": f"#{o['id']}"} for o in contained],
        "conclusion": f"{call.verdict} ({call.threshold_words()}). Model {call.model.words()}. "
                      f"{RESEARCH_USE_NOTICE}",
    }
    DiagnosticReport.model_validate(report)  # raises on anything FHIR R4B would refuse
    return report
