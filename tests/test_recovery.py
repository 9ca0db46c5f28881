"""Crash recovery: the daemon is SIGKILLed after the scanner was told every tile and CASE_END are safe but
before the verdict; a new daemon on the same data finishes the case from the spool with the verdict and
score an uninterrupted run gives. Real subprocess, real pty (PtyCable), real SQLite, real model."""

import os
import signal
import subprocess
import sys
import time

import numpy as np

from appliance.config import load_settings
from appliance.daemon import Daemon
from appliance.demo import case_info_for
from appliance.engine import load_engine
from appliance.pipeline import TriageSession
from firmware_bridge import PtyCable
from firmware_bridge.emulator import ScannerEmulator, TileToSend
from tests.conftest import MODEL_DIR


def test_case_acked_before_a_sigkill_is_finished_after_restart_with_the_same_call(tmp_path, demo_image):
    tiles = [TileToSend(x, y, np.ascontiguousarray(demo_image[400 + y: 600 + y, 700 + x: 900 + x]))
             for y in range(0, 600, 200) for x in range(0, 800, 200)]
    info = case_info_for("CRASH-1", "S-CRASH", tiles, 4.0, 200)
    data = tmp_path / "var"
    cable = PtyCable(tmp_path / "scanner")
    env = dict(os.environ, APPLIANCE_DATA_DIR=str(data), APPLIANCE_MODEL_DIR=str(MODEL_DIR), APPLIANCE_API_PORT="0",
               APPLIANCE_FAULT_INJECTION="1")
    env.pop("NOTIFY_SOCKET", None)
    proc = subprocess.Popen([sys.executable, "-m", "appliance.cli", "run", "--port", str(cable.path)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while "[fault-injection]" not in (line := proc.stderr.readline()) and time.monotonic() < deadline:
            assert line or proc.poll() is None, "appliance run died"
        proc.send_signal(signal.SIGUSR1)  # the pipeline hangs: tiles are ACKed but no verdict can be made
        result = ScannerEmulator(cable, info, tiles, encoding="zlib").run()
        assert result.tiles_sent >= len(tiles)  # every tile and CASE_END acknowledged
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        cable.close()

    restarted = Daemon(load_settings(None, data_dir=data, model_dir=MODEL_DIR, api_port=0),
                       port=str(tmp_path / "no-scanner-yet"), serve_api=False)
    restarted.start()
    try:
        progress = restarted.wait_case("CRASH-1", 120)
        assert progress is not None and progress.result is not None
        case = restarted.store.get_case("CRASH-1")
        kinds = [e["kind"] for e in restarted.store.events("CRASH-1")]
    finally:
        restarted.stop()
    assert "resumed" in kinds and kinds.index("case-ended") < kinds.index("resumed") < kinds.index("finished")

    # the uninterrupted call on the same tiles, through the same session code
    reference = TriageSession(load_engine(MODEL_DIR), scanner_mpp=4.0, width=info.image_width,
                              height=info.image_height)
    try:
        for t in tiles:
            reference.add_tile(t.x, t.y, t.pixels)
        expected = reference.finish()
    finally:
        reference.close()
    assert case["status"] in ("done", "cannot-call")
    assert (case["verdict"], case["score"]) == (expected.verdict, expected.score)
    assert case["patches_scored"] == len(expected.patches) and case["tiles_received"] == len(tiles)
