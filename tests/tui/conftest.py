"""The terminal UI against a real daemon: a scanner emulator streams over a pty, the app talks HTTP."""

import threading
import time

import numpy as np
import pytest

from appliance.service.daemon import Daemon

from appliance.api.app import daemon_api
from appliance.offline.demo import DEMO_CASE_MPP, case_info_for
from appliance.offline.sources import tiles_from_image
from firmware_bridge.emulator import ScannerEmulator, TileToSend
from tests.ptys import PtyPair


class Bench:
    """A running daemon on a pty and a way to stream the demo case into it, paced like a scanner."""

    def __init__(self, settings, demo_image):
        self.settings = settings
        self.tiles = [TileToSend(t.x, t.y, np.ascontiguousarray(t.pixels)) for t in tiles_from_image(demo_image, 200)]
        self.pty = PtyPair()
        self.daemon = Daemon(settings, port=self.pty.path, notify=lambda event: None, api=daemon_api)
        self.daemon.start()
        self.url = f"http://127.0.0.1:{self.daemon.api.port}"
        self.scanner: threading.Thread | None = None

    def stream(self, case_id: str, pace: float = 0.03, tiles: list[TileToSend] | None = None) -> threading.Thread:
        """Stream the demo case (or ``tiles``) as case ``case_id`` from a scanner thread."""
        tiles = tiles or self.tiles
        info = case_info_for(case_id, f"SPEC-{case_id}", tiles, DEMO_CASE_MPP, 200)
        emulator = ScannerEmulator(self.pty.transport(), info, tiles, encoding="raw",
                                   progress=lambda *_: time.sleep(pace))
        self.scanner = threading.Thread(target=emulator.run, name="scanner", daemon=True)
        self.scanner.start()
        return self.scanner

    def close(self) -> None:
        if self.scanner is not None:
            self.scanner.join(60)
        self.daemon.stop()
        self.pty.close()


@pytest.fixture
def bench(settings, demo_image):
    b = Bench(settings, demo_image)
    try:
        yield b
    finally:
        b.close()


async def wait_for(pilot, condition, timeout: float = 60.0, what: str = "condition", interval: float = 0.05):
    """The async twin of tests.waiting.wait_until for Pilot tests: let the app run (``pilot.pause``) until
    ``condition()`` holds and return its value; fail naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not (got := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        await pilot.pause(interval)
    return got
