"""What a call looks like to the lab's systems: an HL7 v2.5.1 ORU^R01 and a FHIR R4B DiagnosticReport with
its Specimen and Observations, built from a ReportedCall (pure functions: the same call and revision give the
same message).

Each message carries the case id and a stable message id, ``<case id>.r<revision>``: a retried message is
the same message, and a receiver that has seen the id can drop it. The revision is 1 for the first call and
goes up when the case is signed off or its call amended, so those are new messages (HL7 result status C,
FHIR status ``amended``).

A lab matches a result to its order by the accession number, when the scanner or the operator gave one: it
travels in OBR-2 and OBR-3 (placer and filler order number) and SPM-2 of the HL7 message, and in the FHIR
report's ``basedOn`` and its Specimen's ``accessionIdentifier``. The appliance never knows the patient: PID-3
holds the case id as an anonymous identifier (type ANON) and PID-5 a name of type U (unspecified) with no
name in it, which v2.5.1 allows; see docs/lis.md. Who sends to whom (MSH-3 to MSH-6) and the
FHIR identifier systems are the lab's settings (``Addressing``).
"""

from __future__ import annotations

from dataclasses import dataclass

from appliance import RESEARCH_USE_NOTICE
from appliance.model.ref import ModelRef
from appliance.pipeline.qc import Reason
from appliance.terms import DEFAULT_FHIR_SYSTEM_BASE, ThresholdSource

HL7_MAX_ID = 199  # the longest identifier component a strict v2.5.1 receiver takes (hl7apy's ST limit)


@dataclass(frozen=True)
class Addressing:
    """The lab's names for the two ends (MSH-3 to MSH-6; each an HL7 HD: ``namespace`` or
    ``namespace^universal id^type``) and the FHIR identifier systems. The accession and specimen systems are
    usually the LIS's own; by default they, the message and case ids and the observation codes live under
    ``system_base``."""

    sending_application: str = "BENCH-TRIAGE"
    sending_facility: str = "BENCH"
    receiving_application: str = "LIS"
    receiving_facility: str = "LAB"
    system_base: str = DEFAULT_FHIR_SYSTEM_BASE
    accession_system: str | None = None
    specimen_system: str | None = None

    @classmethod
    def of_settings(cls, settings) -> "Addressing":
        return cls(sending_application=settings.lis_sending_application,
                   sending_facility=settings.lis_sending_facility,
                   receiving_application=settings.lis_receiving_application,
                   receiving_facility=settings.lis_receiving_facility,
                   system_base=settings.lis_fhir_system_base,
                   accession_system=settings.lis_fhir_accession_system,
                   specimen_system=settings.lis_fhir_specimen_system)

    def system(self, kind: str) -> str:
        """The identifier or code system of ``kind``: message-id, case-id, accession, specimen-id or
        observation-code."""
        if kind == "accession" and self.accession_system:
            return self.accession_system
        if kind == "specimen-id" and self.specimen_system:
            return self.specimen_system
        return f"{self.system_base.rstrip('/')}/{kind}"


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
    accession: str = ""  # the lab's accession / order number, when the scanner or the operator gave one

    @classmethod
    def of_case(cls, case: dict, revision: int) -> "ReportedCall":
        """From a cases row as the store reads it (its reasons already a list of {code, message})."""
        return cls(case_id=case["id"], specimen_id=case.get("specimen_id") or "", revision=revision,
                   verdict=case.get("verdict") or "", score=case.get("score"), threshold=case.get("threshold"),
                   threshold_source=case.get("threshold_source"), site_accepted_at=case.get("site_accepted_at"),
                   site_report_sha256=case.get("site_report_sha256"),
                   reasons=tuple(Reason(r["code"], r["message"]) for r in case.get("reasons") or ()),
                   model=ModelRef.from_columns(case), finished_at=case.get("finished_at"),
                   signed_off_by=case.get("signed_off_by"), accession=case.get("accession") or "")

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


def _segment(name: str, fields: dict[int, str]) -> str:
    """One segment from its fields by number (field 1 follows the segment's name); the others are empty.
    Not for MSH, whose field 1 is the separator itself."""
    values = [fields.get(i, "") for i in range(1, max(fields) + 1)]
    return "|".join([name, *values])


def _hd_in_component(hd: str) -> str:
    """An HD setting (``namespace^universal id^type``) as the sub-components it becomes inside a component."""
    return hd.replace("^", "&")


def _hl7_id(text: str, what: str) -> str:
    """An identifier, escaped; one a strict v2.5.1 receiver would refuse (too long) is an error here, so the
    delivery fails with the reason instead of the LIS rejecting it."""
    out = _esc(text)
    if len(out) > HL7_MAX_ID:
        raise ValueError(f"the {what} ({len(out)} characters) is longer than the {HL7_MAX_ID} HL7 v2.5.1 allows "
                         f"in an identifier: {text[:40]!r}...")
    return out


def hl7_oru(call: ReportedCall, created_at: str, to: Addressing = Addressing()) -> str:
    """ORU^R01 (v2.5.1) for the case's call, as ``to`` names the two ends; segments separated by CR, as MLLP
    carries them. PID-3 holds the case id as an anonymous identifier and PID-5 an unspecified name (type U):
    the appliance never knows the patient. The accession, when known, is OBR-2 and OBR-3 and SPM-2's placer
    identifier; without one OBR-3 is the case id under the sending application (the appliance fills the
    order). OBR-20 (filler field 1) always holds the case id."""
    status = "F" if call.first else "C"
    when = _hl7_time(call.finished_at)
    case_id = _hl7_id(call.case_id, "case id")
    accession = _hl7_id(call.accession, "accession") if call.accession else ""
    specimen = _hl7_id(call.specimen_id, "specimen id") if call.specimen_id else ""
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
    app = to.sending_application
    segments = [
        f"MSH|^~\\&|{app}|{to.sending_facility}|{to.receiving_application}|{to.receiving_facility}"
        f"|{_hl7_time(created_at)}||ORU^R01^ORU_R01|{_hl7_id(call.message_id, 'message id')}|P|2.5.1",
        _segment("PID", {1: "1", 3: f"{case_id}^^^{_hd_in_component(app)}^ANON", 5: "^^^^^^U"}),
        _segment("OBR", {1: "1", 2: accession, 3: accession or f"{case_id}^{app}",
                         4: "TRIAGE^Breast core triage (research use)^L", 7: when, 20: case_id, 22: when, 24: "SP",
                         25: status}),
    ]
    for n, (kind, code, value) in enumerate(observations, start=1):
        segments.append(_segment("OBX", {1: str(n), 2: kind, 3: code, 5: value, 11: status}))
    segments.append(_segment("NTE", {1: "1", 3: _esc(RESEARCH_USE_NOTICE)}))
    spm_id = f"{accession}^{specimen}" if specimen else accession
    segments.append(_segment("SPM", {1: "1", 2: spm_id,
                                     4: "TISS^Tissue^HL70487^^^^^^Breast core-needle biopsy (research use)"}))
    return "\r".join(segments)


# ----------------------------------------------------------------------------------------------- FHIR
def fhir_report(call: ReportedCall, created_at: str, to: Addressing = Addressing()) -> dict:
    """A DiagnosticReport (FHIR R4B) with the call, score and reasons as contained Observations and the specimen
    as a contained Specimen (its id and accession number), ``basedOn`` the order when the accession is known;
    identifiers and codes in ``to``'s systems. Validated by fhir.resources; returned as a JSON-ready dict."""
    from fhir.resources.R4B.diagnosticreport import DiagnosticReport

    status = "final" if call.first else "amended"
    when = call.finished_at or created_at
    accession = {"type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "ACSN",
                                      "display": "Accession ID"}]},
                 "system": to.system("accession"), "value": call.accession} if call.accession else None

    def obs(oid: str, code: str, text: str, value: dict) -> dict:
        return {"resourceType": "Observation", "id": oid, "status": status,
                "code": {"coding": [{"system": to.system("observation-code"), "code": code}], "text": text},
                "effectiveDateTime": when, "note": [{"text": RESEARCH_USE_NOTICE}], **value}

    observations = [obs("call", "triage-call", "Triage call", {"valueString": call.verdict})]
    if call.score is not None:
        observations.append(obs("score", "triage-score", "Case score (top-k mean)",
                                {"valueQuantity": {"value": round(float(call.score), 6), "unit": "1"}}))
    if call.threshold is not None:
        observations.append(obs("threshold", "triage-threshold", "Threshold that decided the call",
                                {"valueQuantity": {"value": round(float(call.threshold), 6), "unit": "1"},
                                 "note": [{"text": call.threshold_words()}, {"text": RESEARCH_USE_NOTICE}]}))
    for i, r in enumerate(call.reasons, start=1):
        observations.append(obs(f"reason{i}", "triage-reason", "Reason the case cannot be called",
                                {"valueString": f"{r.code}: {r.message}"}))
    specimen = None
    if call.specimen_id or accession:
        specimen = {"resourceType": "Specimen", "id": "specimen",
                    "type": {"text": "Breast core-needle biopsy"}, "note": [{"text": RESEARCH_USE_NOTICE}]}
        if call.specimen_id:
            specimen["identifier"] = [{"system": to.system("specimen-id"), "value": call.specimen_id}]
        if accession:
            specimen["accessionIdentifier"] = accession
    report = {
        "resourceType": "DiagnosticReport",
        "identifier": [{"system": to.system("message-id"), "value": call.message_id},
                       {"system": to.system("case-id"), "value": call.case_id}],
        **({"basedOn": [{"type": "ServiceRequest", "identifier": accession}]} if accession else {}),
        "status": status,
        "code": {"text": "Breast core-needle biopsy triage (research use)"},
        "effectiveDateTime": when,
        "issued": created_at,
        **({"specimen": [{"reference": "#specimen"}]} if specimen else {}),
        "contained": ([specimen] if specimen else []) + observations,
        "result": [{"reference": f"#{o['id']}"} for o in observations],
        "conclusion": f"{call.verdict} ({call.threshold_words()}). Model {call.model.words()}. "
                      f"{RESEARCH_USE_NOTICE}",
    }
    DiagnosticReport.model_validate(report)  # raises on anything FHIR R4B would refuse
    return report
