"""What the lab's systems receive, message by message: HL7 v2.5.1 ORU^R01 and FHIR DiagnosticReports as a strict
receiver checks them (tests/lis_validators.py: hl7apy STRICT, HL7's R4B and R4 JSON schemas), with and without
an accession, and the settings that name the two ends. Delivery itself is tests/appliance/test_lis.py."""

from __future__ import annotations

import contextlib

import pytest

from appliance import RESEARCH_USE_NOTICE
from appliance.lis.messages import ReportedCall, fhir_report, hl7_oru
from appliance.pipeline.qc import Reason
from tests.lis_validators import fhir_schema_errors, hl7_strict_errors
from tests.results import MODEL, a_result
from tests.stores import open_store


def a_call(**fields) -> ReportedCall:
    base = dict(case_id="C-1", specimen_id="S-1", revision=1, verdict="suspicious", score=0.91, threshold=0.43,
                threshold_source="model", site_accepted_at=None, site_report_sha256=None, reasons=(), model=MODEL,
                finished_at="2026-12-06T10:00:00.123+00:00", signed_off_by=None, accession="")
    return ReportedCall(**{**base, **fields})


CALLS = {
    "no accession, no specimen": a_call(specimen_id=""),
    "specimen only": a_call(),
    "accession and specimen": a_call(accession="S26-01234"),
    "accession only, signed off (revision 2)": a_call(specimen_id="", accession="S26-01234", revision=2,
                                                      signed_off_by="AB"),
    "cannot call, delimiters in every text": a_call(
        verdict="cannot-call", score=None, specimen_id="S|1^2&3~4\\5",
        reasons=(Reason("stain-out-of-range", "Check the staining | H^E & more ~ here\\"),
                 Reason("too-little-tissue", "Only 9 patches.")),
        threshold_source="site", site_accepted_at="2026-12-01T09:00:00+00:00", site_report_sha256="b" * 64),
}


@pytest.mark.parametrize("name", list(CALLS))
def test_every_message_passes_strict_hl7_validation_and_both_fhir_schemas(name):
    """hl7apy at its strict v2.5.1 level (PID-5 required, SPM-4 required, lengths) and HL7's R4B and R4 JSON
    schemas, besides fhir.resources, for every kind of call: with and without an accession or a specimen id,
    a correction, a call that cannot be made, text full of HL7's delimiters; every one says research use."""
    call = CALLS[name]
    message = hl7_oru(call, "2026-12-06T10:00:01+00:00")
    assert hl7_strict_errors(message) is None
    report = fhir_report(call, "2026-12-06T10:00:01+00:00")
    assert fhir_schema_errors(report) == []
    assert RESEARCH_USE_NOTICE in message and RESEARCH_USE_NOTICE in report["conclusion"]


def test_the_checks_refuse_what_a_strict_lab_would():
    """The validators are not a formality: the message this appliance sent before (no PID-5, no SPM) fails
    hl7apy's strict level, and a report with a status outside R4's list or without a code fails the schemas."""
    old = ("MSH|^~\\&|BENCH-TRIAGE|BENCH|LIS|LAB|20261206100001+0000||ORU^R01^ORU_R01|C-1.r1|P|2.5.1\r"
           "PID|1||S-1^^^BENCH-TRIAGE^SPEC\r"
           "OBR|1||C-1^BENCH-TRIAGE|TRIAGE^Breast core triage (research use)^L|||20261206100000+0000\r"
           "OBX|1|ST|TRIAGE-CALL^Triage call^L||suspicious||||||F")
    assert "PID_5" in hl7_strict_errors(old)
    report = fhir_report(a_call(), "2026-12-06T10:00:01+00:00")
    assert any("'bogus' is not one of" in e for e in fhir_schema_errors(dict(report, status="bogus")))
    assert len(fhir_schema_errors({k: v for k, v in report.items() if k != "code"})) == 2  # both schemas


def test_an_accession_travels_in_obr_2_and_3_spm_and_the_fhir_report():
    """With an accession the LIS can match the call to its order: OBR-2 (placer) and OBR-3 (filler order
    number), SPM-2's placer identifier, FHIR basedOn (a ServiceRequest by identifier, type ACSN) and the
    contained Specimen's accessionIdentifier. Without one, OBR-2 is empty and OBR-3 is the appliance's case id;
    the patient is never named (PID-5 unspecified) and PID-3 is the case id as an anonymous identifier."""
    import hl7

    with_acc = hl7.parse(hl7_oru(a_call(accession="S26-01234"), "2026-12-06T10:00:01+00:00"))
    obr, spm, pid = with_acc.segment("OBR"), with_acc.segment("SPM"), with_acc.segment("PID")
    assert str(obr[2]) == str(obr[3]) == "S26-01234" and str(obr[20]) == "C-1"
    assert str(spm[2][0][0]) == "S26-01234" and str(spm[2][0][1]) == "S-1" and str(spm[4][0][0]) == "TISS"
    assert str(pid[3][0][0]) == "C-1" and str(pid[3][0][4]) == "ANON" and str(pid[5]) == "^^^^^^U"
    report = fhir_report(a_call(accession="S26-01234"), "2026-12-06T10:00:01+00:00")
    (based_on,) = report["basedOn"]
    assert based_on["type"] == "ServiceRequest" and based_on["identifier"]["value"] == "S26-01234"
    assert based_on["identifier"]["type"]["coding"][0]["code"] == "ACSN"
    specimen = next(r for r in report["contained"] if r["resourceType"] == "Specimen")
    assert report["specimen"] == [{"reference": "#specimen"}]
    assert specimen["accessionIdentifier"]["value"] == "S26-01234" and specimen["identifier"][0]["value"] == "S-1"

    without = hl7.parse(hl7_oru(a_call(), "2026-12-06T10:00:01+00:00"))
    assert str(without.segment("OBR")[2]) == "" and str(without.segment("OBR")[3]) == "C-1^BENCH-TRIAGE"
    assert "basedOn" not in fhir_report(a_call(), "2026-12-06T10:00:01+00:00")


def test_an_identifier_too_long_for_hl7_fails_its_delivery_with_the_reason(tmp_path):
    """A specimen id of 250 characters (the link allows 255) cannot travel in a v2.5.1 identifier: the HL7
    delivery fails at once saying why, the FHIR one (no such limit) is queued, and the call is stored."""
    with pytest.raises(ValueError, match="specimen id .* longer than the 199"):
        hl7_oru(a_call(specimen_id="S" * 250), "2026-12-06T10:00:01+00:00")
    destinations = ["mllp:127.0.0.1:9", "fhir:http://127.0.0.1:9/fhir"]  # never reached: nothing is sent here
    with contextlib.closing(open_store(tmp_path / "a.db", destinations)) as store:
        store.case_started("C-L", specimen_id="S" * 250, model=MODEL)
        store.case_finished("C-L", a_result("suspicious", 0.91))
        got = {d["destination"].split(":")[0]: d for d in store.deliveries("C-L")}
        assert store.get_case("C-L")["verdict"] == "suspicious"
    assert got["mllp"]["status"] == "failed" and "longer than the 199" in got["mllp"]["last_error"]
    assert got["fhir"]["status"] == "pending"


@pytest.mark.parametrize("field, value", [
    ("lis_sending_facility", "A|B"), ("lis_receiving_application", "a^b^c^d"), ("lis_sending_application", " "),
    ("lis_fhir_system_base", "urn:bench-triage-appliance:x"), ("lis_fhir_accession_system", "http://lab.org/a b"),
])
def test_settings_refuse_names_and_systems_a_receiver_could_not_take(tmp_path, field, value):
    from appliance.config import Settings

    with pytest.raises(ValueError, match=field):
        Settings(data_dir=tmp_path, **{field: value})
