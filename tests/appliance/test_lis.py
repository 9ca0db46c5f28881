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
from appliance.lis.outbox import OutboxSender
from appliance.store import CaseStore
from tests.appliance.conftest import finished_case
from tests.lis_receivers import FhirReceiver, MllpReceiver
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
    from appliance.api.app import ApiParts, ApiServer, create_app

    store = open_store(settings.db_path, both(mllp, fhir))
    outbox = quick_outbox(store, token_file)
    server = ApiServer(create_app(ApiParts(settings, store)), "127.0.0.1", 0)
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


# 30 cases in the default suite, 100 with the slow runs (make test-slow)
@pytest.mark.parametrize("n_cases", [30, pytest.param(100, marks=pytest.mark.slow)])
def test_every_case_reaches_both_receivers_exactly_once_by_message_id_while_they_restart(tmp_path, token_file,
                                                                                          receivers, n_cases):
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
        for i in range(n_cases):
            store.case_started(f"M-{i:03d}", model=MODEL)
            store.case_finished(f"M-{i:03d}", a_result("suspicious" if i % 3 else "benign-appearing", i / 100))
        wait_until(lambda: store.delivery_counts()["delivered"] == 2 * n_cases, timeout=300,
                   detail=lambda: store.delivery_counts())
    finally:
        stop.set()
        chaos_thread.join()
        outbox.stop()
        store.close()
    expected = {f"M-{i:03d}.r1" for i in range(n_cases)}
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


def test_an_accession_the_scanner_sends_reaches_the_case_record_and_both_strict_receivers(
        tmp_path, token_file, receivers, pty_pair, demo_image):
    """The whole way: the scanner emulator announces the case with an accession over a real pty, the daemon
    stores it with the case (database, API, summary.json), and the call reaches both strict receivers with the
    accession where a LIS matches it (OBR-2/3, SPM-2; FHIR basedOn and the Specimen)."""
    import numpy as np

    from appliance.config import load_settings
    from appliance.offline.demo import case_info_for
    from appliance.service.daemon import Daemon
    from appliance.api.app import daemon_api
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
    daemon = Daemon(settings, port=pty_pair.path, api=daemon_api)
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
