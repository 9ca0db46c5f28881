"""Disk space: below the configured free space a new case is refused over the link with the reason, the
daemon keeps running, and the cases already stored stay intact. Real pty, real daemon, real SQLite."""

import os

import httpx
import pytest

from appliance.config import load_settings
from appliance.daemon import Daemon
from appliance.demo import case_info_for
from firmware_bridge.emulator import DeliveryError, ScannerEmulator, TileToSend
from firmware_bridge.transport import FdTransport
from tests.conftest import MODEL_DIR


def stream(master, case_id, tiles):
    info = case_info_for(case_id, "S-" + case_id, tiles, 4.0, 200)
    return ScannerEmulator(FdTransport(master), info, tiles, encoding="raw", ack_timeout=5.0).run()


def test_low_disk_refuses_new_cases_and_keeps_old_ones(tmp_path, demo_image):
    tiles = [TileToSend(x, y, demo_image[500 + y: 700 + y, 900 + x: 1100 + x].copy())
             for y in range(0, 400, 200) for x in range(0, 400, 200)]
    data = tmp_path / "var"
    master, slave = os.openpty()
    port = os.ttyname(slave)
    try:
        # 1. plenty of room: the case is taken and finished
        ok = Daemon(load_settings(None, data_dir=data, model_dir=MODEL_DIR, api_port=0), port=port)
        ok.start()
        try:
            stream(master, "KEEP-1", tiles)
            assert ok.wait_case("KEEP-1", 120).result is not None
            ok.receiver.cases["KEEP-1"].outputs_done.wait(60)
        finally:
            ok.stop()
        before = {p.name: p.read_bytes() for p in (data / "spool" / "KEEP-1").iterdir()}
        outputs = sorted(p.name for p in (data / "cases" / "KEEP-1").iterdir())

        # 2. the disk is now "full": more free space required than any disk has
        full = Daemon(load_settings(None, data_dir=data, model_dir=MODEL_DIR, api_port=0,
                                    min_free_mb=10**12), port=port)
        full.start()
        try:
            with pytest.raises(DeliveryError, match="REFUSED.*not enough free disk space"):
                stream(master, "NEW-2", tiles)
            assert full.link.running and full.link.counters.cases_refused == 1
            status = httpx.get(f"http://127.0.0.1:{full.api.port}/status", timeout=10).json()
            assert status["storage"]["accepting_cases"] is False
            assert "not enough free disk space" in status["storage"]["reason"]
            refused = [e for e in full.store.events() if e["kind"] == "refused"]
            assert refused and refused[0]["case_id"] == "NEW-2"
        finally:
            full.stop()
    finally:
        os.close(master)
        os.close(slave)
    # nothing of the refused case was stored; the old case is untouched
    assert full.store.get_case("NEW-2") is None and not (data / "spool" / "NEW-2").exists()
    assert full.store.get_case("KEEP-1")["status"] in ("done", "cannot-call")
    assert len(full.store.tiles("KEEP-1")) == len(tiles)
    assert {p.name: p.read_bytes() for p in (data / "spool" / "KEEP-1").iterdir()} == before
    assert sorted(p.name for p in (data / "cases" / "KEEP-1").iterdir()) == outputs


def test_a_case_left_open_by_the_scanner_is_abandoned_and_late_tiles_are_refused(tmp_path, demo_image):
    import threading

    tiles = [TileToSend(x, 0, demo_image[600:800, 900 + x: 1100 + x].copy()) for x in range(0, 1000, 200)]
    resume = threading.Event()

    def scanner_that_stalls():
        for i, t in enumerate(tiles):
            if i == 2:
                resume.wait(30)  # the scanner hangs mid-case
            yield t

    master, slave = os.openpty()
    daemon = Daemon(load_settings(None, data_dir=tmp_path / "var", model_dir=MODEL_DIR, api_port=0,
                                  case_timeout_s=1.0), port=os.ttyname(slave))
    daemon.start()
    outcome = {}

    def run():
        try:
            info = case_info_for("OPEN-1", "S", tiles, 4.0, 200)
            ScannerEmulator(FdTransport(master), info, scanner_that_stalls(), encoding="raw",
                            heartbeat_interval=0.2).run()
        except DeliveryError as exc:
            outcome["error"] = str(exc)

    t = threading.Thread(target=run)
    t.start()
    try:
        progress = daemon.wait_case("OPEN-1", 30)
        assert progress is not None and progress.abandoned  # done because abandoned, not finished
        case = daemon.store.get_case("OPEN-1")
        assert case["status"] == "abandoned" and case["reasons"][0]["code"] == "abandoned"
        assert "no tile and no CASE_END" in case["reasons"][0]["message"]
        assert len(daemon.store.tiles("OPEN-1")) == 2  # what was ACKed is kept
        resume.set()  # the scanner wakes up and sends the rest: refused, not half-processed
        t.join(30)
        assert "REFUSED" in outcome.get("error", "") and "abandoned" in outcome["error"]
        assert daemon.store.get_case("OPEN-1")["status"] == "abandoned"
        assert [e["kind"] for e in daemon.store.events("OPEN-1")].count("abandoned") == 1
    finally:
        resume.set()
        daemon.stop()
        t.join(30)
        os.close(master)
        os.close(slave)
