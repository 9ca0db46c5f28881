"""What a call looks like to the lab's systems: an HL7 v2.5.1 ORU^R01 and a FHIR R4B DiagnosticReport with
its Observations, built from a case row (pure functions: the same case and revision give the same message).

Each message carries the case id and a stable message id, ``<case id>.r<revision>``: a retried message is
the same message, and a receiver that has seen the id can drop it. The revision is 1 for the first call and
goes up when the case is signed off or its call amended, so those are new messages (HL7 result status C,
FHIR status ``amended``).
"""

from __future__ import annotations

import json

from appliance import RESEARCH_USE_NOTICE

SENDING_APPLICATION = "BENCH-TRIAGE"
ID_SYSTEM = "urn:bench-triage-appliance:message-id"
CASE_SYSTEM = "urn:bench-triage-appliance:case-id"


def message_id(case_id: str, revision: int) -> str:
    return f"{case_id}.r{revision}"


def _reasons(case: dict) -> list[dict]:
    raw = case.get("reasons")
    if isinstance(raw, str):
        raw = json.loads(raw) if raw else []
    return list(raw or [])


def threshold_words(case: dict) -> str:
    """Whose threshold decided the call, in words: the model's, or the site's with its acceptance date."""
    value = "?" if case.get("threshold") is None else f"{case['threshold']:.6f}"
    if case.get("threshold_source") == "site":
        return (f"site threshold {value} (site validation accepted {case.get('site_accepted_at') or '?'}, "
                f"report sha256 {case.get('site_report_sha256') or '?'})")
    return f"model threshold {value}"


def _model(case: dict) -> str:
    return f"{case.get('model_name') or '?'} {case.get('model_version') or '?'} sha256 {case.get('model_sha256') or '?'}"


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


def hl7_oru(case: dict, revision: int, created_at: str) -> str:
    """ORU^R01 (v2.5.1) for the case's call; segments separated by CR, as MLLP carries them."""
    mid = message_id(case["id"], revision)
    status = "F" if revision == 1 else "C"
    when = _hl7_time(case.get("finished_at"))
    reasons = "~".join(_esc(f"{r['code']}: {r['message']}") for r in _reasons(case))
    observations = [
        ("ST", "TRIAGE-CALL^Triage call^L", _esc(case.get("verdict") or "")),
        ("NM", "TRIAGE-SCORE^Case score (top-k mean)^L", "" if case.get("score") is None else f"{case['score']:.6f}"),
        ("NM", "TRIAGE-THRESHOLD^Case threshold^L",
         "" if case.get("threshold") is None else f"{case['threshold']:.6f}"),
        ("ST", "TRIAGE-THRESHOLD-SOURCE^Threshold that decided the call^L", _esc(threshold_words(case))),
        ("TX", "TRIAGE-REASONS^Reasons the case cannot be called^L", reasons),
        ("ST", "TRIAGE-MODEL^Model name, version and sha256^L", _esc(_model(case))),
        ("TX", "RESEARCH-USE^Intended use^L", _esc(RESEARCH_USE_NOTICE)),
    ]
    if case.get("signed_off_by"):
        observations.append(("ST", "SIGNED-OFF^Signed off by^L", _esc(case["signed_off_by"])))
    segments = [
        f"MSH|^~\\&|{SENDING_APPLICATION}|BENCH|LIS|LAB|{_hl7_time(created_at)}||ORU^R01^ORU_R01|{_esc(mid)}|P|2.5.1",
        f"PID|1||{_esc(case.get('specimen_id') or case['id'])}^^^{SENDING_APPLICATION}^SPEC",
        f"OBR|1||{_esc(case['id'])}^{SENDING_APPLICATION}|TRIAGE^Breast core triage (research use)^L|||{when}"
        f"|||||||||||||||{when}||SP|{status}",
    ]
    for n, (kind, code, value) in enumerate(observations, start=1):
        segments.append(f"OBX|{n}|{kind}|{code}||{value}||||||{status}")
    segments.append(f"NTE|1||{_esc(RESEARCH_USE_NOTICE)}")
    return "\r".join(segments)


# ----------------------------------------------------------------------------------------------- FHIR
def fhir_report(case: dict, revision: int, created_at: str) -> dict:
    """A DiagnosticReport (FHIR R4B) with the call, score and reasons as contained Observations, validated by
    fhir.resources; returned as JSON-ready dict."""
    from fhir.resources.R4B.diagnosticreport import DiagnosticReport

    status = "final" if revision == 1 else "amended"
    when = case.get("finished_at") or created_at

    def obs(oid: str, code: str, text: str, value: dict) -> dict:
        return {"resourceType": "Observation", "id": oid, "status": status,
                "code": {"coding": [{"system": "urn:bench-triage-appliance:observation", "code": code}],
                         "text": text},
                "effectiveDateTime": when, "note": [{"text": RESEARCH_USE_NOTICE}], **value}

    contained = [obs("call", "triage-call", "Triage call", {"valueString": case.get("verdict") or ""})]
    if case.get("score") is not None:
        contained.append(obs("score", "triage-score", "Case score (top-k mean)",
                             {"valueQuantity": {"value": round(float(case["score"]), 6), "unit": "1"}}))
    if case.get("threshold") is not None:
        contained.append(obs("threshold", "triage-threshold", "Threshold that decided the call",
                             {"valueQuantity": {"value": round(float(case["threshold"]), 6), "unit": "1"},
                              "note": [{"text": threshold_words(case)}, {"text": RESEARCH_USE_NOTICE}]}))
    for i, r in enumerate(_reasons(case), start=1):
        contained.append(obs(f"reason{i}", "triage-reason", "Reason the case cannot be called",
                             {"valueString": f"{r['code']}: {r['message']}"}))
    report = {
        "resourceType": "DiagnosticReport",
        "identifier": [{"system": ID_SYSTEM, "value": message_id(case["id"], revision)},
                       {"system": CASE_SYSTEM, "value": case["id"]}],
        "status": status,
        "code": {"text": "Breast core-needle biopsy triage (research use)"},
        "effectiveDateTime": when,
        "issued": created_at,
        "contained": contained,
        "result": [{"reference": f"#{o['id']}"} for o in contained],
        "conclusion": f"{case.get('verdict') or ''} ({threshold_words(case)}). Model {_model(case)}. "
                      f"{RESEARCH_USE_NOTICE}",
    }
    DiagnosticReport.model_validate(report)  # raises on anything FHIR R4B would refuse
    return report
