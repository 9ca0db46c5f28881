"""Crash recovery: the daemon is SIGKILLed after the scanner was told every tile and CASE_END are safe but
before the verdict; a new daemon on the same data finishes the case from the spool with the verdict and
score an uninterrupted run gives. Real subprocess, real pty (PtyCable), real SQLite, real model."""

import signal
import time

import numpy as np
import pytest

from appliance.config import load_settings
from appliance.service.daemon import Daemon
from appliance.offline.demo import case_info_for
from appliance.model.engine import load_engine
from tests.results import reference_call
from firmware_bridge import PtyCable
from firmware_bridge.emulator import ScannerEmulator, TileToSend
from tests.appliance_run import ApplianceRun
from tests.conftest import MODEL_DIR
from tests.waiting import wait_until


def uninterrupted_call(engine, info, tiles):
    """The call an uninterrupted run makes on the same tiles, through the same session code."""
    return reference_call(engine, tiles, scanner_mpp=4.0, width=info.image_width, height=info.image_height)


def test_case_acked_before_a_sigkill_is_finished_after_restart_with_the_same_call(tmp_path, demo_image):
    tiles = [TileToSend(x, y, np.ascontiguousarray(demo_image[400 + y: 600 + y, 700 + x: 900 + x]))
             for y in range(0, 600, 200) for x in range(0, 800, 200)]
    info = case_info_for("CRASH-1", "S-CRASH", tiles, 4.0, 200)
    data = tmp_path / "var"
    cable = PtyCable(tmp_path / "scanner")
    daemon = ApplianceRun(cable.path, data, APPLIANCE_FAULT_INJECTION="1")
    try:
        daemon.wait_for("[fault-injection]", 10)
        daemon.proc.send_signal(signal.SIGUSR1)  # the pipeline hangs: tiles are ACKed but no verdict can be made
        result = ScannerEmulator(cable, info, tiles, encoding="zlib").run()
        assert result.tiles_sent == len(tiles)  # every tile and CASE_END acknowledged (run() returned)
        assert sorted(result.acked) == list(range(len(tiles)))
    finally:
        daemon.kill()  # after CASE_END was ACKed, before the hung pipeline could call the case
        cable.close()

    restarted = Daemon(load_settings(None, data_dir=data, model_dir=MODEL_DIR, api_port=0),
                       port=str(tmp_path / "no-scanner-yet"))
    restarted.start()
    try:
        progress = restarted.wait_case("CRASH-1", 120)
        assert progress is not None and progress.result is not None
    finally:
        restarted.stop()  # the writer drains its queue: every event is committed
    case = restarted.store.get_case("CRASH-1")
    kinds = [e["kind"] for e in restarted.store.events("CRASH-1")]
    assert "resumed" in kinds and kinds.index("case-ended") < kinds.index("resumed") < kinds.index("finished")

    # the uninterrupted call on the same tiles, through the same session code
    expected = uninterrupted_call(load_engine(MODEL_DIR), info, tiles)
    assert expected.verdict == "suspicious"  # 600 x 800 px of the demo slide's tumour, by the shipped model
    assert case["status"] == "done"
    assert (case["verdict"], case["score"]) == (expected.verdict, expected.score)
    assert case["patches_scored"] == len(expected.patches) and case["tiles_received"] == len(tiles)


# 6 cases in the default suite, 20 with the slow runs (make test-slow)
@pytest.mark.parametrize("n_cases", [6, pytest.param(20, marks=pytest.mark.slow)])
def test_sigkill_at_random_points_in_streamed_cases_loses_nothing_and_changes_no_call(tmp_path, demo_image, n_cases):
    """One scanner streams n cases; the daemon process is SIGKILLed once per case at a random point (after
    k of n tiles were ACKed, or right after CASE_END was ACKed) and restarted at once. For every case: every
    ACKed tile is stored with the sha256 the scanner sent, the case completes, and its verdict and score
    equal an uninterrupted run of the same tiles."""
    import hashlib
    import random
    import sqlite3
    import threading

    rng = random.Random(20261123)  # its first 6 kills: 6 different points, one after CASE_END
    engine = load_engine(MODEL_DIR)
    cable = PtyCable(tmp_path / "scanner")
    data = tmp_path / "var"

    cases, kill_points = [], []
    daemon = ApplianceRun(cable.path, data)
    try:
        for c in range(n_cases):
            oy, ox = rng.randrange(0, 1400, 50), rng.randrange(0, 1700, 50)
            tiles = [TileToSend(x, y, np.ascontiguousarray(demo_image[oy + y: oy + y + 200, ox + x: ox + x + 200]))
                     for y in range(0, 600, 200) for x in range(0, 800, 200)]
            info = case_info_for(f"K-{c:02d}", f"S-{c:02d}", tiles, 4.0, 200)
            acked, out = [], {}

            def paced(ts=tiles):
                for t in ts:
                    time.sleep(0.03)  # a scanner's pace, so that the kill lands between tiles
                    yield t

            def run(info=info, acked=acked, out=out, source=paced):
                try:
                    out["result"] = ScannerEmulator(cable, info, source(), encoding="raw", ack_timeout=2.0,
                                                    max_retries=40, keep_digests=True,
                                                    progress=lambda s, a, t: acked.append(a)).run()
                except Exception as exc:  # noqa: BLE001 - reported by the assertion below
                    out["error"] = repr(exc)

            scanner = threading.Thread(target=run)
            scanner.start()
            k = rng.randint(1, len(tiles))  # k == n: after CASE_END
            if k < len(tiles):
                wait_until(lambda: (acked and acked[-1] >= k) or not scanner.is_alive(), 120, interval=0.005,
                           what=f"{k} ACKs in case {info.case_id} (or its scanner to stop)")
            else:
                scanner.join(60)
            daemon.kill()
            kill_points.append(k)
            daemon = ApplianceRun(cable.path, data)
            scanner.join(120)
            assert "result" in out, f"case {info.case_id} (killed after {k} ACKs): {out.get('error')}"
            cases.append((info, tiles, out["result"]))
        db = sqlite3.connect(f"file:{data / 'appliance.db'}?mode=ro", uri=True)
        db.row_factory = sqlite3.Row

        def counts() -> tuple[int, int]:
            open_ = db.execute("select count(*) from cases where status in ('receiving', 'processing')").fetchone()[0]
            return open_, db.execute("select count(*) from cases").fetchone()[0]

        wait_until(lambda: counts() == (0, n_cases), 120, interval=0.2, what=f"all {n_cases} cases stored and finished",
                   detail=lambda: "(open, stored) = %s" % (counts(),))
    finally:
        daemon.stop()
        cable.close()

    print(f"\nkill/restart: {len(kill_points)} SIGKILLs of `appliance run` over {len(cases)} streamed cases "
          f"({sum(len(t) for _i, t, _r in cases)} tiles, {sum(r.retransmits for _i, _t, r in cases)} retransmits, "
          f"{sum(r.reconnects for _i, _t, r in cases)} scanner reconnects)")
    print("kill points (ACKs before SIGKILL; = tiles per case means after CASE_END):", kill_points)
    assert len(set(kill_points)) > 3  # the kills really landed at different points
    assert 12 in kill_points  # and one after CASE_END was ACKed
    for info, tiles, result in cases:
        row = db.execute("select * from cases where id = ?", [info.case_id]).fetchone()
        assert row is not None and row["status"] in ("done", "cannot-call"), (info.case_id, row and row["status"])
        expected = uninterrupted_call(engine, info, tiles)  # each case a different region: its own call
        assert row["status"] == ("cannot-call" if expected.verdict == "cannot-call" else "done"), info.case_id
        stored = {r["idx"]: r["sha256"] for r in db.execute("select idx, sha256 from tiles where case_id = ?",
                                                            [info.case_id])}
        assert sorted(result.acked) == sorted(stored) == list(range(len(tiles)))
        for i, t in enumerate(tiles):
            assert stored[i] == hashlib.sha256(t.pixels.tobytes()).hexdigest()
        assert (row["verdict"], row["score"]) == (expected.verdict, expected.score), info.case_id
    db.close()
