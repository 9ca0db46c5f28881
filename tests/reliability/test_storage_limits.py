"""Disk space: below the configured free space a new case is refused over the link with the reason, the
daemon keeps running, and the cases already stored stay intact. Real pty, real daemon, real SQLite."""

import os

import httpx
import pytest

from appliance.config import load_settings
from appliance.service.daemon import Daemon
from appliance.api.app import daemon_api
from appliance.offline.demo import case_info_for
from firmware_bridge.emulator import DeliveryError, ScannerEmulator, TileToSend
from tests.conftest import MODEL_DIR
from tests.ptys import PtyPair


def stream(pty: PtyPair, case_id, tiles):
    info = case_info_for(case_id, "S-" + case_id, tiles, 4.0, 200)
    return ScannerEmulator(pty.transport(), info, tiles, encoding="raw", ack_timeout=5.0).run()


def test_low_disk_refuses_new_cases_and_keeps_old_ones(tmp_path, demo_image, pty_pair):
    tiles = [TileToSend(x, y, demo_image[500 + y: 700 + y, 900 + x: 1100 + x].copy())
             for y in range(0, 400, 200) for x in range(0, 400, 200)]
    data = tmp_path / "var"
    port = pty_pair.path
    # 1. plenty of room: the case is taken and finished
    ok = Daemon(load_settings(None, data_dir=data, model_dir=MODEL_DIR, api_port=0), port=port, api=daemon_api)
    ok.start()
    try:
        stream(pty_pair, "KEEP-1", tiles)
        assert ok.wait_case("KEEP-1", 120).result is not None
        assert ok.cases["KEEP-1"].outputs_done.wait(60)
    finally:
        ok.stop()
    before = {p.name: p.read_bytes() for p in (data / "spool" / "KEEP-1").iterdir()}
    outputs = sorted(p.name for p in (data / "cases" / "KEEP-1").iterdir())

    # 2. the disk is now "full": more free space required than any disk has
    full = Daemon(load_settings(None, data_dir=data, model_dir=MODEL_DIR, api_port=0,
                                min_free_mb=10**12), port=port, api=daemon_api)
    full.start()
    try:
        with pytest.raises(DeliveryError, match="REFUSED.*not enough free disk space"):
            stream(pty_pair, "NEW-2", tiles)
        assert full.link.running and full.link.counters.cases_refused == 1
        status = httpx.get(f"http://127.0.0.1:{full.api.port}/status", timeout=10).json()
        assert status["storage"]["accepting_cases"] is False
        assert "not enough free disk space" in status["storage"]["reason"]
        refused = [e for e in full.store.events() if e["kind"] == "refused"]
        assert refused and refused[0]["case_id"] == "NEW-2"
    finally:
        full.stop()
    # nothing of the refused case was stored; the old case is untouched
    assert full.store.get_case("NEW-2") is None and not (data / "spool" / "NEW-2").exists()
    # 400 x 400 px of the demo slide's tumour: called suspicious by the shipped model
    assert full.store.get_case("KEEP-1")["status"] == "done"
    assert full.store.get_case("KEEP-1")["verdict"] == "suspicious"
    assert len(full.store.tiles("KEEP-1")) == len(tiles)
    assert {p.name: p.read_bytes() for p in (data / "spool" / "KEEP-1").iterdir()} == before
    assert sorted(p.name for p in (data / "cases" / "KEEP-1").iterdir()) == outputs


def test_a_case_left_open_by_the_scanner_is_abandoned_and_late_tiles_are_refused(tmp_path, demo_image,
                                                                                     pty_pair):
    import threading

    tiles = [TileToSend(x, 0, demo_image[600:800, 900 + x: 1100 + x].copy()) for x in range(0, 1000, 200)]
    resume = threading.Event()

    def scanner_that_stalls():
        for i, t in enumerate(tiles):
            if i == 2:
                resume.wait(30)  # the scanner hangs mid-case
            yield t

    daemon = Daemon(load_settings(None, data_dir=tmp_path / "var", model_dir=MODEL_DIR, api_port=0,
                                  case_timeout_s=1.0), port=pty_pair.path, api=daemon_api)
    daemon.start()
    outcome = {}

    def run():
        try:
            info = case_info_for("OPEN-1", "S", tiles, 4.0, 200)
            ScannerEmulator(pty_pair.transport(), info, scanner_that_stalls(), encoding="raw",
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


def test_real_full_disk_nacks_the_tile_keeps_the_daemon_up_and_refuses_new_cases(tmp_path, demo_image, pty_pair):
    """A REAL full disk: the spool is a 24 MB tmpfs. A case streams until a tile write hits ENOSPC: that tile
    is NACKed (never ACKed) and not stored, every tile ACKed before it is whole, the daemon stays up and says
    so (/status storage, the storage-error event), the finished case and its files are untouched, and a new
    case is refused with the reason."""
    import hashlib
    import subprocess
    import time

    import numpy as np

    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    data = tmp_path / "var"
    spool = data / "spool"
    spool.mkdir(parents=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m,mode=0700", "tmpfs", str(spool)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    daemon = None
    try:
        daemon = Daemon(load_settings(None, data_dir=data, model_dir=MODEL_DIR, api_port=0, min_free_mb=1),
                        port=pty_pair.path, api=daemon_api)
        daemon.start()
        keep = [TileToSend(x, y, demo_image[500 + y: 700 + y, 900 + x: 1100 + x].copy())
                for y in range(0, 400, 200) for x in range(0, 400, 200)]
        stream(pty_pair, "KEEP-1", keep)
        assert daemon.wait_case("KEEP-1", 120).result is not None
        assert daemon.cases["KEEP-1"].outputs_done.wait(60)
        before = {p.name: p.read_bytes() for p in (spool / "KEEP-1").iterdir()}
        outputs = {p.name: p.read_bytes() for p in (data / "cases" / "KEEP-1").iterdir()}

        # 300 tiles of 200x200 (120 kB each on disk): more than the 24 MB can hold
        rng = np.random.default_rng(5)
        fill = []
        for i in range(300):
            oy, ox = int(rng.integers(0, 1800)), int(rng.integers(0, 2300))
            fill.append(TileToSend((i % 20) * 200, (i // 20) * 200, demo_image[oy: oy + 200, ox: ox + 200].copy()))
        info = case_info_for("FILL-2", "S-FILL-2", fill, 4.0, 200)
        scanner = ScannerEmulator(pty_pair.transport(), info, fill, encoding="raw", ack_timeout=5.0, max_retries=3)
        t0 = time.monotonic()
        with pytest.raises(DeliveryError, match="refused tile .* times; last: STORAGE: .*No space left on device"):
            scanner.run()
        acked = sorted(scanner.result.acked)
        failed = len(acked)
        print(f"\nfull disk: {len(acked)} tiles ACKed into the 24 MB spool, tile {failed} hit ENOSPC and was NACKed "
              f"(STORAGE) {scanner.result.nacks_received} times in {time.monotonic() - t0:.1f} s")
        assert acked == list(range(failed)) and 0 < failed < len(fill)

        health = daemon.health()
        status = httpx.get(f"http://127.0.0.1:{daemon.api.port}/status", timeout=10).json()
        live = httpx.get(f"http://127.0.0.1:{daemon.api.port}/health", timeout=10).status_code
        with pytest.raises(DeliveryError, match="REFUSED.*not enough free disk space"):
            stream(pty_pair, "NEW-3", keep)
        assert daemon.link.running and daemon.health() == (True, "")
        events = daemon.store.events()
    finally:
        if daemon is not None:
            daemon.stop()
        try:
            # the tiles of the full case, read before the tmpfs goes
            rows = {r["idx"]: r["sha256"] for r in daemon.store.tiles("FILL-2")} if daemon else {}
            stored = {int(p.name[5:11]): hashlib.sha256(np.load(p).tobytes()).hexdigest()
                      for p in (spool / "FILL-2").glob("tile-*.npy")}
            leftovers = list((spool / "FILL-2").glob(".*.tmp"))
            after = {p.name: p.read_bytes() for p in (spool / "KEEP-1").iterdir()}
        finally:
            umount = subprocess.run(["umount", str(spool)], capture_output=True, text=True)
            if umount.returncode != 0:
                subprocess.run(["umount", "-l", str(spool)], check=False)

    assert health == (True, "") and live == 200
    # /status says the disk is full and no case is taken
    assert status["storage"]["accepting_cases"] is False and status["storage"]["free_bytes"] < 1_000_000
    assert "not enough free disk space" in status["storage"]["reason"] and str(spool) in status["storage"]["reason"]
    # every NACK the scanner got (before it gave up) was for a write that failed; more writes may have failed
    # by then (the tiles in flight behind the failed one), so the count is a bound, not exact
    assert status["link"]["counters"]["storage_errors"] >= scanner.result.nacks_received >= 1
    # the failure is in the history, with the OS's words
    storage_events = [e for e in events if e["kind"] == "link" and e["detail"]["kind"] == "storage-error"]
    assert any(f"tile {failed} of FILL-2" in e["detail"]["detail"]
               and "No space left on device" in e["detail"]["detail"] for e in storage_events), storage_events
    refused = [e for e in events if e["kind"] == "refused"]
    assert [e["case_id"] for e in refused] == ["NEW-3"]
    assert "not enough free disk space" in refused[0]["detail"]["reason"]
    # exactly the ACKed tiles are stored, whole; the one that hit ENOSPC left nothing behind
    assert sorted(rows) == sorted(stored) == acked and failed not in rows
    assert not leftovers
    for i in acked:
        assert rows[i] == stored[i] == hashlib.sha256(fill[i].pixels.tobytes()).hexdigest()
    # the finished case and its files are untouched; nothing of the refused case was stored
    assert after == before
    assert {p.name: p.read_bytes() for p in (data / "cases" / "KEEP-1").iterdir()} == outputs
    assert daemon.store.get_case("KEEP-1")["status"] == "done"
    assert daemon.store.get_case("KEEP-1")["verdict"] == "suspicious"
    assert daemon.store.get_case("NEW-3") is None
