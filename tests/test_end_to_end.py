"""End to end over a real pseudo-terminal: emulator -> pty -> daemon -> spool + SQLite + API."""

import hashlib
import json

import httpx
import numpy as np
import pytest
import tifffile
from PIL import Image

from appliance.service.daemon import Daemon

from appliance.api.app import daemon_api
from appliance.service.events import CaseFinished
from appliance.commands.demo import run_demo
from appliance.offline.demo import case_info_for
from appliance.terms import CaseFile
from appliance.pipeline.summary import TriageSummary
from firmware_bridge.emulator import ScannerEmulator, TileToSend
from tests.conftest import DEMO_CASE
from tests.waiting import wait_until


def tissue_tiles(demo_image) -> list[TileToSend]:
    """64 tiles of 100 px from a tissue region of the demo case."""
    region = demo_image[600:1400, 400:1200]
    return [TileToSend(x, y, np.ascontiguousarray(region[y:y + 100, x:x + 100]))
            for y in range(0, 800, 100) for x in range(0, 800, 100)]


def assert_stored_once_each(daemon, case_id: str, tiles: list[TileToSend]) -> None:
    """Every tile in the tiles table once, none lost, each with the sha256 of what was sent."""
    rows = {r["idx"]: r for r in daemon.store.tiles(case_id)}
    assert sorted(rows) == list(range(len(tiles)))
    for i, t in enumerate(tiles):
        assert rows[i]["sha256"] == hashlib.sha256(t.pixels.tobytes()).hexdigest()


def test_streamed_case_is_stored_tile_for_tile_and_logged(settings, pty_pair, demo_image):
    region = demo_image[600:1200, 400:1000]  # 600x600 of tissue, 9 tiles of 200 px
    tiles = [TileToSend(x, y, np.ascontiguousarray(region[y:y + 200, x:x + 200]))
             for y in range(0, 600, 200) for x in range(0, 600, 200)]
    events = []
    daemon = Daemon(settings, port=pty_pair.path, notify=events.append, api=daemon_api)
    daemon.start()
    try:
        info = case_info_for("E2E-1", "S-E2E", tiles, 4.0, 200)
        sent = ScannerEmulator(pty_pair.transport(), info, tiles, encoding="zlib").run()
        progress = daemon.wait_case("E2E-1", timeout=120)
        assert progress is not None and progress.result is not None
        with httpx.Client(base_url=f"http://127.0.0.1:{daemon.api.port}", timeout=10) as c:
            api_case = c.get("/cases/E2E-1").json()
            metrics = c.get("/metrics")
    finally:
        daemon.stop()

    assert sent.tiles_sent == len(tiles) and sorted(sent.acked) == list(range(len(tiles)))
    # every tile the emulator sent is in the spool, byte for byte, and in the tiles table
    spooled = sorted(settings.spool_dir.joinpath("E2E-1").glob("tile-*.npy"))
    assert len(spooled) == len(tiles)
    rows = {r["idx"]: r for r in daemon.store.tiles("E2E-1")}
    assert sorted(rows) == list(range(len(tiles)))
    for i, t in enumerate(tiles):
        stored = np.load(spooled[i])
        assert np.array_equal(stored, t.pixels)
        assert rows[i]["sha256"] == hashlib.sha256(t.pixels.tobytes()).hexdigest()
        assert (rows[i]["x"], rows[i]["y"]) == (t.x, t.y)
    # the case row is written with the verdict and the model that made it
    case = daemon.store.get_case("E2E-1")
    # 600x600 px of the demo slide's tumour: the shipped model calls it suspicious
    assert case["status"] == "done" and case["verdict"] == "suspicious"
    assert case["verdict"] == progress.result.verdict
    assert case["tiles_received"] == len(tiles) and case["tiles_expected"] == len(tiles)
    assert case["patches_scored"] == len(progress.result.patches) > 0
    assert case["model_sha256"] == daemon.engine.manifest.digest
    assert set(case["timings_ms"]) >= {"tissue_qc", "patching", "wait_inference", "total"}
    assert api_case["verdict"] == case["verdict"]
    assert any(isinstance(e, CaseFinished) for e in events)
    # /metrics is valid Prometheus text and agrees with the store
    from prometheus_client.parser import text_string_to_metric_families

    assert metrics.headers["content-type"].startswith("text/plain; version=0.0.4")
    families = {f.name: f for f in text_string_to_metric_families(metrics.text)}
    assert families["appliance_tiles_received"].samples[0].value == len(tiles)
    verdicts = {s.labels["verdict"]: s.value for s in families["appliance_cases"].samples}
    assert verdicts == {"suspicious": 1}
    hist = {s.name: s.value for s in families["appliance_inference_batch_seconds"].samples if not s.labels}
    assert hist["appliance_inference_batch_seconds_count"] > 0 and hist["appliance_inference_batch_seconds_sum"] > 0
    assert "appliance_link_crc_errors" in families and "appliance_disk_free_bytes" in families
    # the case's history is in SQLite, in order, and the model that called it is on record
    history = [e["kind"] for e in daemon.store.events(info.case_id)]
    assert history[0] == "case-started" and "case-ended" in history and "finished" in history
    assert history.index("case-ended") < history.index("finished")
    assert [m["sha256"] for m in daemon.store.models()] == [daemon.engine.manifest.digest]


def test_demo_command_streams_the_bundled_case(settings, tmp_path):
    import io

    out = io.StringIO()
    outcome = run_demo(settings, case_path=DEMO_CASE, out=out)
    text = out.getvalue()
    assert outcome.exit_code == 0
    assert outcome.verdict == "suspicious"  # the bundled demo case, as the shipped model calls it
    assert outcome.tiles_stored == 130  # 2500x2000 in 200 px tiles: 13 x 10
    assert "tiles: 130/130" in text and outcome.verdict.upper() in text
    assert "not for diagnosis" in text.lower()
    # the case's files, in its own folder, open as what they claim to be
    folder = settings.cases_dir / outcome.case_id
    assert sorted(p.name for p in folder.iterdir()) == sorted(CaseFile)
    summary = json.loads((folder / "summary.json").read_text())
    TriageSummary.model_validate(summary)
    assert summary["case_id"] == outcome.case_id and summary["verdict"] == outcome.verdict
    with tifffile.TiffFile(folder / "case.ome.tif") as tif:  # 2000 x 2500, halved down to 250 x 313
        assert len(tif.series[0].levels) == 4 and tif.series[0].levels[-1].shape == (250, 313, 3)
        assert len(tif.pages) == 4  # each level its own IFD, as OpenSlide reads them
        assert 1 / tif.pages[0].get_resolution(tifffile.RESUNIT.MICROMETER)[0] == pytest.approx(4.0)
    with Image.open(folder / "overlay.png") as im:
        im.verify()
    assert f"outputs in {folder}" in text


def test_daemon_rides_through_link_faults_and_reports_them(settings, demo_image, tmp_path):
    """Bit flips, dropped bytes, truncation, duplicates, reordering and cable pulls: the daemon keeps
    running, stores every tile exactly once and bit-identical, and /status shows the errors and reconnects."""
    from firmware_bridge import Faults, PtyCable

    tiles = tissue_tiles(demo_image)
    cable = PtyCable(tmp_path / "scanner")
    daemon = Daemon(settings, port=str(cable.path), notify=lambda event: None, api=daemon_api)
    daemon.start()
    try:
        faults = Faults(0.2, seed=7, weights={"bit_flip": 1, "drop": 1, "truncate": 1, "duplicate": 1, "reorder": 1,
                                             "disconnect": 1})
        info = case_info_for("FAULTS-1", "S-F", tiles, 4.0, 100)
        ScannerEmulator(cable, info, tiles, encoding="raw", faults=faults, ack_timeout=0.5,
                        max_retries=50).run()
        progress = daemon.wait_case("FAULTS-1", timeout=120)
        with httpx.Client(base_url=f"http://127.0.0.1:{daemon.api.port}", timeout=10) as c:
            status = c.get("/status").json()
            health = c.get("/health").status_code
    finally:
        daemon.stop()
        cable.close()
    assert faults.total > 5, faults.counts
    print("faults injected:", dict(faults.counts))
    assert progress is not None and progress.result is not None
    assert_stored_once_each(daemon, "FAULTS-1", tiles)
    assert daemon.store.get_case("FAULTS-1")["tiles_received"] == len(tiles)
    assert health == 200
    link = status["link"]
    assert link["state"] == "up"
    bad = link["counters"].get("frames_bad", 0) + link["counters"].get("crc_errors", 0)
    assert bad > 0
    # seed 7 with these weights pulls the cable at least once: the daemon reopened the same path
    # (how many pulls depends on how many frames went out, retransmissions included: it varies)
    assert faults.counts.get("disconnect", 0) >= 1, faults.counts
    # two pulls close together are one reopen: at least one, at most one per pull
    assert 1 <= link["counters"]["reconnects"] <= faults.counts["disconnect"], (link, faults.counts)


def test_event_stream_delivers_early_positive_then_finished_in_order(settings, pty_pair, demo_image):
    import threading

    from appliance.offline.sources import tiles_from_image

    tiles = [TileToSend(t.x, t.y, np.ascontiguousarray(t.pixels)) for t in tiles_from_image(demo_image, 200)]
    daemon = Daemon(settings, port=pty_pair.path, notify=lambda event: None, api=daemon_api)
    daemon.start()
    got, connected = [], threading.Event()

    def listen():
        with httpx.stream("GET", f"http://127.0.0.1:{daemon.api.port}/events", timeout=60) as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            kind = None
            for line in r.iter_lines():
                connected.set()
                if line.startswith("event: "):
                    kind = line[7:]
                elif line.startswith("data: ") and kind:
                    got.append((kind, json.loads(line[6:])))
                    if kind == "finished":
                        return

    listener = threading.Thread(target=listen, daemon=True)
    listener.start()
    try:
        assert connected.wait(10)
        info = case_info_for("SSE-1", "S-SSE", tiles, 4.0, 200)
        ScannerEmulator(pty_pair.transport(), info, tiles, encoding="raw").run()
        listener.join(60)
    finally:
        daemon.stop()
    kinds = [k for k, d in got if d.get("case_id") == "SSE-1" and k != "tile"]
    assert kinds[0] == "case-started"
    assert "early-positive" in kinds and kinds.index("early-positive") < kinds.index("case-ended") \
        < kinds.index("finished")
    progress = [d["received"] for k, d in got if k == "tile"]
    assert progress == sorted(progress) and progress[-1] == len(tiles)
    finished = next(d for k, d in got if k == "finished")
    assert finished["verdict"] == "suspicious"


def test_status_cli_is_a_client_of_the_running_daemon(settings, pty_pair):
    import subprocess
    import sys

    daemon = Daemon(settings, port=pty_pair.path, notify=lambda event: None, api=daemon_api)
    daemon.start()
    try:
        url = f"http://127.0.0.1:{daemon.api.port}"
        cli = [sys.executable, "-m", "appliance.cli", "status", "--url", url]
        text = subprocess.run(cli, capture_output=True, text=True, timeout=60)
        raw = subprocess.run([*cli, "--json"], capture_output=True, text=True, timeout=60)
    finally:
        daemon.stop()
    assert text.returncode == 0, text.stderr
    assert "scanner link: connecting on" in text.stdout and "model: idc-resnet" in text.stdout
    assert "not for diagnosis" in text.stdout.lower() and "no case yet" in text.stdout
    assert json.loads(raw.stdout)["model"]["sha256"] == daemon.engine.manifest.digest
    down = subprocess.run([sys.executable, "-m", "appliance.cli", "status", "--url", "http://127.0.0.1:9"],
                          capture_output=True, text=True, timeout=60)
    assert down.returncode == 1 and "cannot reach the appliance at http://127.0.0.1:9" in down.stderr


def test_operator_reconnect_mid_case_keeps_every_tile_and_is_audited(settings, demo_image, tmp_path):
    """POST /link/reconnect needs the token (401 / 403), then closes and reopens the scanner port in the middle
    of a streamed case: the case resumes and finishes with every tile stored once, and the audit table has it."""
    import threading
    import time

    from firmware_bridge import PtyCable

    tiles = tissue_tiles(demo_image)
    cable = PtyCable(tmp_path / "scanner")
    daemon = Daemon(settings, port=str(cable.path), notify=lambda event: None, api=daemon_api)
    daemon.start()
    token = settings.token_path.read_text().strip()
    body = {"initials": "AB", "reason": "scanner cable reseated"}
    try:
        info = case_info_for("RECON-1", "S-R", tiles, 4.0, 100)
        scanner = threading.Thread(target=ScannerEmulator(cable, info, tiles, encoding="raw", ack_timeout=0.5,
                                                          max_retries=50,
                                                          progress=lambda *_: time.sleep(0.02)).run, daemon=True)
        with httpx.Client(base_url=f"http://127.0.0.1:{daemon.api.port}", timeout=10) as c:
            assert c.post("/link/reconnect", json=body).status_code == 401
            assert c.post("/link/reconnect", json=body, headers={"Authorization": "Bearer nope"}).status_code == 403
            assert c.post("/link/reconnect", json={"initials": ""},
                          headers={"Authorization": f"Bearer {token}"}).status_code == 422
            scanner.start()

            def ten_tiles_in() -> bool:
                assert scanner.is_alive(), "the scanner stopped before 10 tiles were in"
                current = daemon.cases.current
                return current is not None and current.tiles_received >= 10

            wait_until(ten_tiles_in, 60, interval=0.02, what="10 tiles of RECON-1 received")
            mid = c.get("/status").json()["case"]
            r = c.post("/link/reconnect", json=body, headers={"Authorization": f"Bearer {token}"})
            assert r.status_code == 202, r.text
            scanner.join(120)
            progress = daemon.wait_case("RECON-1", timeout=120)
            status = c.get("/status").json()
    finally:
        daemon.stop()
        cable.close()
    assert progress is not None and progress.result is not None
    assert_stored_once_each(daemon, "RECON-1", tiles)
    # the one reconnect the operator asked for, and no other (no faults on this cable)
    assert status["link"]["counters"]["reconnects"] == 1 and status["link"]["state"] == "up"
    # mid-scan, /status had the progress, an ETA from this case's own rate, and the live QC (clean tissue)
    assert mid["case_id"] == "RECON-1" and mid["tiles_expected"] == 64 and 10 <= mid["tiles_received"] < 64
    assert mid["eta_s"] is None or mid["eta_s"] > 0
    assert mid["warnings"] == [] and status["case"]["eta_s"] == 0.0
    audit = [a for a in daemon.store.audit_log() if a["action"] == "link-reconnect"]
    assert len(audit) == 1 and audit[0]["actor"] == "AB" and audit[0]["detail"]["reason"] == "scanner cable reseated"
    assert any(e["kind"] == "link" and e["detail"].get("kind") == "reconnect-requested"
               for e in daemon.store.events())
