"""Byte-level link faults through the real daemon: cases streamed by the scanner emulator over a PtyCable (a
real pty that is really unplugged on a DISCONNECT) with bit flips, dropped bytes, truncation, duplicates,
reordering and cable pulls, until a given number of faults was injected. For every case: every tile is stored
exactly once and bit-identical (the sha256 in the tiles table and the spooled .npy against what was sent),
the case finishes with a verdict, and the daemon stays healthy. Real daemon, SQLite and model; no mocks."""

import hashlib
import time
from collections import Counter

import httpx
import numpy as np
import pytest

from appliance.service.daemon import Daemon

from appliance.api.app import daemon_api
from appliance.offline.demo import case_info_for
from tests.results import reference_call
from firmware_bridge import Faults, PtyCable
from firmware_bridge.emulator import ScannerEmulator, TileToSend
from tests.waiting import wait_until

TILE = 50  # the model's own patch: small frames, many of them, so many faults per second
WEIGHTS = {"bit_flip": 4, "drop": 2, "truncate": 2, "duplicate": 2, "reorder": 2, "disconnect": 0.25}


def case_tiles(image: np.ndarray, c: int, n_side: int = 10) -> list[TileToSend]:
    """n_side x n_side tiles of TILE px from a tissue region of the demo case, a different one per case."""
    oy, ox = 400 + (c * 97) % 900, 300 + (c * 131) % 1400
    return [TileToSend(x, y, np.ascontiguousarray(image[oy + y: oy + y + TILE, ox + x: ox + x + TILE]))
            for y in range(0, n_side * TILE, TILE) for x in range(0, n_side * TILE, TILE)]


def check_case(daemon: Daemon, case_id: str, tiles: list[TileToSend], expected) -> None:
    progress = daemon.wait_case(case_id, timeout=120)
    assert progress is not None and progress.result is not None, f"{case_id} has no verdict"
    assert progress.outputs_done.wait(60), f"{case_id}: outputs not written"
    case = daemon.store.get_case(case_id)
    assert case["status"] in ("done", "cannot-call") and case["verdict"], case
    # each case is a different region of the demo slide: the faults changed nothing of its call
    assert case["verdict"] == expected.verdict, (case_id, case["verdict"], expected.verdict)
    assert case["status"] == ("cannot-call" if expected.verdict == "cannot-call" else "done"), case
    assert case["score"] == pytest.approx(expected.score, abs=1e-6), (case_id, case["score"], expected.score)
    assert case["tiles_received"] == len(tiles) == progress.tiles_received  # stored once each, no more
    rows = {r["idx"]: r for r in daemon.store.tiles(case_id)}
    assert sorted(rows) == list(range(len(tiles))), f"{case_id}: tiles missing from the table"
    spool = daemon.settings.spool_dir / case_id
    files = sorted(spool.glob("tile-*.npy"))
    assert len(files) == len(tiles) and not list(spool.glob(".*.tmp")), f"{case_id}: spool has {len(files)} tiles"
    for i, t in enumerate(tiles):
        sent = hashlib.sha256(t.pixels.tobytes()).hexdigest()
        assert rows[i]["sha256"] == sent and (rows[i]["x"], rows[i]["y"]) == (t.x, t.y), (case_id, i)
        stored = np.load(spool / f"tile-{i:06d}_x{t.x}_y{t.y}.npy", allow_pickle=False)
        assert stored.dtype == np.uint8 and stored.shape == t.pixels.shape
        assert hashlib.sha256(stored.tobytes()).hexdigest() == sent, (case_id, i)


def run_faulty_cases(settings, demo_image, tmp_path, engine, *, min_faults: int, rate: float, seed: int) -> dict:
    cable = PtyCable(tmp_path / "scanner")
    daemon = Daemon(settings, port=str(cable.path), notify=lambda event: None, api=daemon_api)
    daemon.start()
    counts: Counter = Counter()
    totals = Counter()
    t0 = time.monotonic()
    try:
        c = 0
        while sum(counts.values()) < min_faults:
            tiles = case_tiles(demo_image, c)
            case_id = f"LF-{c:04d}"
            faults = Faults(rate, seed=seed + c, weights=WEIGHTS)
            info = case_info_for(case_id, f"S-{c:04d}", tiles, 4.0, TILE)
            result = ScannerEmulator(cable, info, tiles, encoding="raw", faults=faults, ack_timeout=0.3,
                                     max_retries=60, reconnect_timeout=30).run()
            counts.update(faults.counts)
            totals.update(frames=result.frames_written, retransmits=result.retransmits,
                          reconnects=result.reconnects, tiles=len(tiles))
            assert not result.rejected, result.rejected
            check_case(daemon, case_id, tiles, reference_call(engine, tiles, scanner_mpp=info.microns_per_pixel,
                                                                width=info.image_width, height=info.image_height))
            ok, why = daemon.health()
            assert ok, why
            c += 1
        with httpx.Client(base_url=f"http://127.0.0.1:{daemon.api.port}", timeout=10) as client:
            status = client.get("/status").json()
            health = client.get("/health").status_code
        # the link may still be reopening after a pull at the very end of the last case
        wait_until(lambda: daemon.link.state == "up", 10, what="the scanner link to be up again",
                   detail=lambda: f"link state {daemon.link.state}")
        ready = daemon.not_ready()
    finally:
        daemon.stop()
        cable.close()
    counters = status["link"]["counters"]
    figures = {"cases": c, "faults": sum(counts.values()), "by_kind": dict(counts), **totals,
               "host_crc_errors": counters.get("crc_errors", 0), "host_frames_bad": counters.get("frames_bad", 0),
               "host_duplicates": counters.get("duplicates", 0), "host_reconnects": counters.get("reconnects", 0),
               "seconds": round(time.monotonic() - t0, 1)}
    print(f"\nlink faults: {figures['faults']} injected over {c} cases ({totals['tiles']} tiles, "
          f"{totals['frames']} frame writes, {totals['retransmits']} retransmits, {totals['reconnects']} replugs) "
          f"in {figures['seconds']} s")
    print("  by kind:", dict(sorted(counts.items())))
    print(f"  host saw: {figures['host_crc_errors']} CRC errors, {figures['host_frames_bad']} bad frames, "
          f"{figures['host_duplicates']} duplicates, {figures['host_reconnects']} reopens")
    assert health == 200 and ready == [], ready
    assert all(counts[k] > 0 for k in WEIGHTS), counts  # every kind of fault really happened
    assert counters.get("crc_errors", 0) + counters.get("frames_bad", 0) > 0
    # the host reopened the port after pulls; two pulls close together are one reopen, so at most one each
    assert 0 < counters["reconnects"] <= counts["disconnect"]
    return figures


def test_a_few_hundred_link_faults_lose_and_duplicate_nothing(settings, demo_image, tmp_path, ov_engine):
    figures = run_faulty_cases(settings, demo_image, tmp_path, ov_engine, min_faults=300, rate=0.4, seed=100)
    assert figures["faults"] >= 300  # cases are streamed until at least this many faults: the last overshoots


# the default suite injects a few hundred faults (above); 10,000 with the slow runs (make test-slow)
@pytest.mark.slow
def test_ten_thousand_link_faults_lose_and_duplicate_nothing(settings, demo_image, tmp_path, ov_engine):
    figures = run_faulty_cases(settings, demo_image, tmp_path, ov_engine, min_faults=10_000, rate=0.4, seed=10_000)
    assert figures["faults"] >= 10_000
