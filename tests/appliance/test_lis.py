"""The outbox: each call delivered to the lab's systems as HL7 v2 (MLLP) and FHIR, over real sockets to real
receivers (tests/lis_receivers.py), through a real case store; receivers down, rejecting, restarting; the
sender killed between sending and the ACK."""

from __future__ import annotations

import contextlib
import json
import random
import threading
import time

import httpx
import pytest

from appliance import RESEARCH_USE_NOTICE
from appliance.lis.messages import ReportedCall, fhir_report, hl7_oru
from appliance.lis.outbox import OutboxSender
from appliance.pipeline.qc import Reason
from appliance.store import CaseStore
from tests.appliance.conftest import finished_case
from tests.lis_receivers import FhirReceiver, MllpReceiver
from tests.lis_validators import fhir_schema_errors, hl7_strict_errors
from tests.results import MODEL, a_result
from tests.stores import open_store
from tests.waiting import wait_until

TOKEN = "fhir-test-token"


@pytest.fixture
def token_file(tmp_path):
    path = tmp_path / "fhir-token"
    path.write_text(TOKEN + "\n")
    path.chmod(0o600)
    return path


@pytest.fixture
def receivers():
    """Strict receivers (tests/lis_receivers.py); whatever a test sends, none of it may have been refused."""
    mllp, fhir = MllpReceiver(), FhirReceiver(TOKEN)
    yield mllp, fhir
    mllp.hold.set()
    mllp.stop()
    fhir.stop()
    assert not mllp.refused and not fhir.refused, (mllp.refused, fhir.refused)


def quick_outbox(store: CaseStore, token_file=None) -> OutboxSender:
    """The daemon's outbox with test-sized waits: first retry after 50 ms, at most 200 ms apart."""
    return OutboxSender(store, store.outbox.destinations, token_file, first_backoff_s=0.05, max_backoff_s=0.2,
                        timeout_s=2)


def both(mllp: MllpReceiver, fhir: FhirReceiver) -> list[str]:
    return [f"mllp:{mllp.address}", f"fhir:{fhir.base}"]


@contextlib.contextmanager
def store_outbox_api(settings, token_file, mllp: MllpReceiver, fhir: FhirReceiver):
    """The daemon's parts that deliver and show deliveries: the store, the outbox and the live API."""
    from appliance.api.app import ApiServer, create_app

    store = open_store(settings.db_path, both(mllp, fhir))
    outbox = quick_outbox(store, token_file)
    server = ApiServer(create_app(settings, store), "127.0.0.1", 0)
    server.start()
    try:
        yield store, outbox, f"http://127.0.0.1:{server.port}"
    finally:
        outbox.stop()
        server.stop()
        store.close()


def deliveries(store: CaseStore, case_id: str | None = None) -> dict[str, dict]:
    return {d["destination"].split(":")[0]: d for d in store.deliveries(case_id)}


def test_a_call_reaches_both_receivers_once_they_are_up_as_the_same_message(tmp_path, token_file, receivers):
    mllp, fhir = receivers
    fhir.status = 503  # the LIS is restarting
    fhir.start()
    store = open_store(tmp_path / "a.db", both(mllp, fhir))
    outbox = quick_outbox(store, token_file)
    try:
        store.case_started("C-1", specimen_id="S-1", model=MODEL)
        store.case_finished("C-1", a_result("suspicious", 0.91))
        pending = deliveries(store, "C-1")
        assert {d["status"] for d in pending.values()} == {"pending"}  # written with the call
        assert {d["message_id"] for d in pending.values()} == {"C-1.r1"}
        outbox.start()
        # the MLLP receiver is down and the FHIR one answers 503: tried again and again, never given up
        wait_until(lambda: all(d["attempts"] >= 3 for d in deliveries(store, "C-1").values()), timeout=30)
        assert {d["status"] for d in deliveries(store, "C-1").values()} == {"pending"}
        assert "ConnectionRefusedError" in deliveries(store, "C-1")["mllp"]["last_error"]
        assert "503" in deliveries(store, "C-1")["fhir"]["last_error"]
        mllp.start()
        fhir.status = 201
        wait_until(lambda: {d["status"] for d in deliveries(store, "C-1").values()} == {"delivered"}, timeout=30)
    finally:
        outbox.stop()
        store.close()
    assert [mid for mid, _ in mllp.received] == ["C-1.r1"]
    message = mllp.received[0][1]
    assert "ORU^R01" in message and "|2.5.1" in message and "suspicious" in message and RESEARCH_USE_NOTICE in message
    assert "OBX|2|NM|TRIAGE-SCORE" in message and "0.910000" in message
    # every FHIR attempt carried the same message; the one accepted validated as a DiagnosticReport
    assert {mid for mid, _ in fhir.received} == {"C-1.r1"} and fhir.answered[-1] == 201
    assert len({json.dumps(body, sort_keys=True) for _, body in fhir.received}) == 1
    report = fhir.received[-1][1]
    assert report["status"] == "final" and RESEARCH_USE_NOTICE in report["conclusion"]
    assert {"C-1"} == {i["value"] for i in report["identifier"] if i["system"].endswith("case-id")}


def test_a_rejected_message_fails_with_its_reason_and_is_sent_again_only_when_an_operator_asks(
        settings, token_file, receivers):
    from appliance.api.auth import ensure_token

    mllp, fhir = receivers
    mllp.answer, fhir.status = "AE", 422
    mllp.start()
    fhir.start()
    with store_outbox_api(settings, token_file, mllp, fhir) as (store, outbox, url):
        finished_case(store, "C-9")
        outbox.start()
        wait_until(lambda: {d["status"] for d in deliveries(store, "C-9").values()} == {"failed"}, timeout=30)
        time.sleep(1.0)  # many backoff periods: a rejected message is not tried again
        got = deliveries(store, "C-9")
        assert got["mllp"]["attempts"] == 1 and got["fhir"]["attempts"] == 1
        assert "answered AE" in got["mllp"]["last_error"]
        assert "422" in got["fhir"]["last_error"] and "rejected by the test" in got["fhir"]["last_error"]
        case = httpx.get(f"{url}/cases/C-9").json()
        assert {d["status"] for d in case["deliveries"]} == {"failed"} and all(
            "payload" not in d for d in case["deliveries"])
        assert httpx.get(f"{url}/status").json()["deliveries"] == {"pending": 0, "delivered": 0, "failed": 2}

        mllp.answer, fhir.status = "AA", 201  # the LIS is fixed
        for d in case["deliveries"]:
            assert httpx.post(f"{url}/deliveries/{d['id']}/retry", json={"initials": "AB"}).status_code == 401
        token = ensure_token(settings.token_path)
        for d in case["deliveries"]:
            r = httpx.post(f"{url}/deliveries/{d['id']}/retry", json={"initials": "AB"},
                           headers={"Authorization": f"Bearer {token}"})
            assert r.status_code == 200 and r.json()["status"] == "pending"
        again = httpx.post(f"{url}/deliveries/{case['deliveries'][0]['id']}/retry", json={"initials": "AB"},
                           headers={"Authorization": f"Bearer {token}"})
        assert again.status_code == 409  # only a failed message can be queued again
        wait_until(lambda: {d["status"] for d in deliveries(store, "C-9").values()} == {"delivered"}, timeout=30)
        assert [a["action"] for a in store.audit_log("C-9")].count("delivery-retry") == 2
        metrics = httpx.get(f"{url}/metrics").text
        assert 'appliance_deliveries{state="delivered"} 2.0' in metrics
    assert [mid for mid, _ in mllp.received] == ["C-9.r1", "C-9.r1"]  # the same message, sent again


def test_a_daemon_killed_between_sending_and_the_ack_sends_the_same_message_again(tmp_path, receivers, pty_pair):
    """`appliance run` itself: the call is in the store with its delivery pending (as the pipeline leaves it);
    the daemon sends it, is SIGKILLed before the ACK, and after the restart the same message goes again."""
    from tests.appliance_run import ApplianceRun

    mllp, _ = receivers
    mllp.hold.clear()  # the ACK waits
    mllp.start()
    data = tmp_path / "var"
    dest = f"mllp:{mllp.address}"
    with contextlib.closing(open_store(data / "appliance.db", [dest])) as store:
        finished_case(store, "C-K")
    env = {"APPLIANCE_LIS_MLLP": json.dumps([mllp.address])}
    first = ApplianceRun(pty_pair.path, data, **env)
    try:
        assert mllp.got.wait(60), "the message never arrived"
    finally:
        first.kill()  # SIGKILL: sent, not yet acknowledged
    mllp.hold.set()  # the ACK goes to a dead peer
    with contextlib.closing(open_store(data / "appliance.db")) as store:
        assert deliveries(store, "C-K")["mllp"]["status"] == "pending"  # no ACK was read: not delivered
        second = ApplianceRun(pty_pair.path, data, **env)
        try:
            wait_until(lambda: deliveries(store, "C-K")["mllp"]["status"] == "delivered", timeout=60)
        finally:
            second.stop()
    assert [mid for mid, _ in mllp.received] == ["C-K.r1", "C-K.r1"]
    assert mllp.received[0][1] == mllp.received[1][1]  # the same message, byte for byte: no second result


def test_100_cases_reach_both_receivers_exactly_once_by_message_id_while_they_restart(tmp_path, token_file,
                                                                                        receivers):
    mllp, fhir = receivers
    mllp.start()
    fhir.start()
    store = open_store(tmp_path / "c.db", both(mllp, fhir))
    outbox = OutboxSender(store, store.outbox.destinations, token_file, first_backoff_s=0.02, max_backoff_s=0.2,
                          timeout_s=2)
    rng = random.Random(2026)
    stop = threading.Event()
    restarts = {"mllp": 0, "fhir": 0}

    def chaos() -> None:
        while not stop.is_set():
            time.sleep(rng.uniform(0.05, 0.3))
            which = rng.choice(["mllp", "fhir"])
            receiver = mllp if which == "mllp" else fhir
            receiver.stop()
            time.sleep(rng.uniform(0.05, 0.3))
            receiver.start()
            restarts[which] += 1

    outbox.start()
    chaos_thread = threading.Thread(target=chaos, daemon=True)
    chaos_thread.start()
    try:
        for i in range(100):
            store.case_started(f"M-{i:03d}", model=MODEL)
            store.case_finished(f"M-{i:03d}", a_result("suspicious" if i % 3 else "benign-appearing", i / 100))
        wait_until(lambda: store.delivery_counts()["delivered"] == 200, timeout=300,
                   detail=lambda: store.delivery_counts())
    finally:
        stop.set()
        chaos_thread.join()
        outbox.stop()
        store.close()
    expected = {f"M-{i:03d}.r1" for i in range(100)}
    assert mllp.accepted() == expected and fhir.accepted() == expected  # every case, at each destination
    assert restarts["mllp"] + restarts["fhir"] >= 5
    # a repeat is only ever the same message again (an ACK lost in a restart): never a second, different result
    for received in (mllp.received, [(m, json.dumps(b, sort_keys=True)) for m, b in fhir.received]):
        by_id: dict[str, set] = {}
        for mid, body in received:
            by_id.setdefault(mid, set()).add(body)
        assert all(len(bodies) == 1 for bodies in by_id.values())


def test_the_verdict_card_says_sent_to_lis_or_why_not(settings, token_file, receivers):
    import asyncio

    from textual.widgets import Static

    from appliance.tui.app import TriageApp
    from appliance.tui.screens import CaseScreen
    from tests.tui.conftest import wait_for

    mllp, fhir = receivers
    fhir.status = 422
    mllp.start()
    fhir.start()
    with store_outbox_api(settings, token_file, mllp, fhir) as (store, outbox, url):
        finished_case(store, "C-T")
        outbox.start()
        wait_until(lambda: {d["status"] for d in deliveries(store, "C-T").values()} == {"delivered", "failed"},
                   timeout=30)

        async def card_text() -> str:
            app = TriageApp(url, settings.token_path, poll_s=0.1, open_verdicts=False)
            async with app.run_test(size=(120, 50)) as pilot:
                app.push_screen(CaseScreen(app.client, "C-T"))
                await wait_for(pilot, lambda: isinstance(app.screen, CaseScreen) and app.screen.case is not None,
                               what="the card")
                return str(app.screen.query_one("#signoff-state", Static).content)

        text = asyncio.run(card_text())
    assert f"Sent to LIS ✓ (HL7 {mllp.address}, message C-T.r1)" in text
    assert f"NOT sent to LIS (FHIR {fhir.base})" in text and "422" in text and "/retry" in text


def test_a_token_file_others_can_read_sends_nothing_and_says_why(tmp_path, token_file, receivers):
    _, fhir = receivers
    fhir.start()
    token_file.chmod(0o644)
    store = open_store(tmp_path / "t.db", [f"fhir:{fhir.base}"])
    outbox = quick_outbox(store, token_file)
    try:
        finished_case(store, "C-P")
        outbox.start()
        wait_until(lambda: deliveries(store, "C-P")["fhir"]["attempts"] >= 2, timeout=30)
        assert "readable by others; chmod 600" in deliveries(store, "C-P")["fhir"]["last_error"]
        assert fhir.received == []  # the token never left the machine
        token_file.chmod(0o600)
        wait_until(lambda: deliveries(store, "C-P")["fhir"]["status"] == "delivered", timeout=30)
    finally:
        outbox.stop()
        store.close()


def test_a_sign_off_is_a_new_revision_sent_as_a_correction(tmp_path, token_file, receivers):
    mllp, fhir = receivers
    mllp.start()
    fhir.start()
    store = open_store(tmp_path / "s.db", both(mllp, fhir))
    outbox = quick_outbox(store, token_file)
    try:
        finished_case(store, "C-S")
        outbox.start()
        wait_until(lambda: store.delivery_counts()["delivered"] == 2, timeout=30)
        store.sign_off("C-S", by="AB", comment="seen")
        wait_until(lambda: store.delivery_counts()["delivered"] == 4, timeout=30)
        assert store.get_case("C-S")["revision"] == 2
    finally:
        outbox.stop()
        store.close()
    assert [mid for mid, _ in mllp.received] == ["C-S.r1", "C-S.r2"]
    first, second = (m for _, m in mllp.received)
    assert "||SP|F" in first and "||SP|C" in second and "SIGNED-OFF^Signed off by^L||AB" in second
    assert [b["status"] for _, b in fhir.received] == ["final", "amended"]


def test_a_receiver_that_never_answers_holds_up_no_other_destination(tmp_path, token_file, receivers):
    mllp, fhir = receivers
    mllp.hold.clear()  # takes the message, never ACKs (until the test lets it)
    mllp.start()
    fhir.start()
    store = open_store(tmp_path / "h.db", both(mllp, fhir))
    outbox = OutboxSender(store, store.outbox.destinations, token_file, first_backoff_s=0.05, max_backoff_s=0.2,
                          timeout_s=60)
    try:
        finished_case(store, "C-H")
        outbox.start()
        assert mllp.got.wait(30)
        wait_until(lambda: deliveries(store, "C-H")["fhir"]["status"] == "delivered", timeout=30)
        assert deliveries(store, "C-H")["mllp"]["attempts"] == 0  # still waiting for its ACK meanwhile
        mllp.hold.set()
        wait_until(lambda: deliveries(store, "C-H")["mllp"]["status"] == "delivered", timeout=30)
    finally:
        mllp.hold.set()
        outbox.stop()
        store.close()


# ------------------------------------------------------------------------- what a strict receiver accepts
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
    with contextlib.closing(open_store(tmp_path / "a.db", ["mllp:127.0.0.1:9", "fhir:http://127.0.0.1:9/fhir"])) as store:
        store.case_started("C-L", specimen_id="S" * 250, model=MODEL)
        store.case_finished("C-L", a_result("suspicious", 0.91))
        got = deliveries(store, "C-L")
        assert store.get_case("C-L")["verdict"] == "suspicious"
    assert got["mllp"]["status"] == "failed" and "longer than the 199" in got["mllp"]["last_error"]
    assert got["fhir"]["status"] == "pending"


def test_the_labs_names_and_identifier_systems_and_an_accession_reach_strict_receivers(tmp_path, token_file,
                                                                                        receivers):
    """Settings name the two ends (MSH-3 to MSH-6, an HD with a universal id too) and the FHIR systems; a case
    recorded with an accession is delivered to both strict receivers with all of them in place."""
    from appliance.config import Settings
    from appliance.lis.outbox import outbox_of
    from appliance.store import CaseStore

    mllp, fhir = receivers
    mllp.start()
    fhir.start()
    settings = Settings(data_dir=tmp_path / "var", lis_mllp=[mllp.address], lis_fhir_url=fhir.base,
                        lis_sending_application="TRIAGE-7^2.16.840.1.113883.3.999.7^ISO",
                        lis_sending_facility="PATH-BENCH-2", lis_receiving_application="COPATH",
                        lis_receiving_facility="ST-ELSEWHERE", lis_fhir_system_base="https://lab.example.org/fhir",
                        lis_fhir_accession_system="urn:oid:2.16.840.1.113883.3.999.1")
    store = CaseStore(tmp_path / "a.db", outbox_of(settings))
    outbox = quick_outbox(store, token_file)
    try:
        store.case_started("C-A", specimen_id="S-7", accession="S26-00077", model=MODEL)
        store.case_finished("C-A", a_result("benign-appearing", 0.12))
        assert store.get_case("C-A")["accession"] == "S26-00077"
        outbox.start()
        wait_until(lambda: {d["status"] for d in deliveries(store, "C-A").values()} == {"delivered"}, timeout=30)
    finally:
        outbox.stop()
        store.close()
    msh = mllp.received[0][1].split("\r")[0].split("|")
    assert msh[2:6] == ["TRIAGE-7^2.16.840.1.113883.3.999.7^ISO", "PATH-BENCH-2", "COPATH", "ST-ELSEWHERE"]
    assert "|S26-00077|S26-00077|" in mllp.received[0][1] and "\rSPM|1|S26-00077^S-7|" in mllp.received[0][1]
    assert "C-A^^^TRIAGE-7&2.16.840.1.113883.3.999.7&ISO^ANON" in mllp.received[0][1]
    report = fhir.received[0][1]
    systems = {i["system"] for i in report["identifier"]}
    assert systems == {"https://lab.example.org/fhir/message-id", "https://lab.example.org/fhir/case-id"}
    assert report["basedOn"][0]["identifier"]["system"] == "urn:oid:2.16.840.1.113883.3.999.1"
    specimen = report["contained"][0]
    assert specimen["identifier"][0]["system"] == "https://lab.example.org/fhir/specimen-id"


@pytest.mark.parametrize("field, value", [
    ("lis_sending_facility", "A|B"), ("lis_receiving_application", "a^b^c^d"), ("lis_sending_application", " "),
    ("lis_fhir_system_base", "urn:bench-triage-appliance:x"), ("lis_fhir_accession_system", "http://lab.org/a b"),
])
def test_settings_refuse_names_and_systems_a_receiver_could_not_take(tmp_path, field, value):
    from appliance.config import Settings

    with pytest.raises(ValueError, match=field):
        Settings(data_dir=tmp_path, **{field: value})


def test_an_accession_the_scanner_sends_reaches_the_case_record_and_both_strict_receivers(
        tmp_path, token_file, receivers, pty_pair, demo_image):
    """The whole way: the scanner emulator announces the case with an accession over a real pty, the daemon
    stores it with the case (database, API, summary.json), and the call reaches both strict receivers with the
    accession where a LIS matches it (OBR-2/3, SPM-2; FHIR basedOn and the Specimen)."""
    import numpy as np

    from appliance.config import load_settings
    from appliance.offline.demo import case_info_for
    from appliance.service.daemon import Daemon
    from firmware_bridge.emulator import ScannerEmulator, TileToSend
    from tests.conftest import MODEL_DIR

    mllp, fhir = receivers
    mllp.start()
    fhir.start()
    settings = load_settings(None, data_dir=tmp_path / "var", model_dir=MODEL_DIR, api_port=0,
                             lis_mllp=[mllp.address], lis_fhir_url=fhir.base, lis_fhir_token_file=token_file)
    region = demo_image[600:1000, 400:800]
    tiles = [TileToSend(x, y, np.ascontiguousarray(region[y:y + 200, x:x + 200]))
             for y in range(0, 400, 200) for x in range(0, 400, 200)]
    daemon = Daemon(settings, port=pty_pair.path)
    daemon.start()
    try:
        info = case_info_for("C-ACC", "SLIDE-7", tiles, 4.0, 200, accession="S26-00042")
        ScannerEmulator(pty_pair.transport(), info, tiles, encoding="zlib").run()
        assert daemon.wait_case("C-ACC", timeout=120) is not None
        wait_until(lambda: {d["status"] for d in deliveries(daemon.store, "C-ACC").values()} == {"delivered"},
                   timeout=60)
        api_case = httpx.get(f"http://127.0.0.1:{daemon.api.port}/cases/C-ACC").json()
    finally:
        daemon.stop()
    assert daemon.store.get_case("C-ACC")["accession"] == api_case["accession"] == "S26-00042"
    summary = json.loads((settings.cases_dir / "C-ACC" / "summary.json").read_text())
    assert summary["accession"] == "S26-00042"
    message = mllp.received[0][1]
    assert "|S26-00042|S26-00042|" in message and "\rSPM|1|S26-00042^SLIDE-7|" in message
    report = fhir.received[0][1]
    assert report["basedOn"][0]["identifier"]["value"] == "S26-00042"
    assert report["contained"][0]["accessionIdentifier"]["value"] == "S26-00042"
