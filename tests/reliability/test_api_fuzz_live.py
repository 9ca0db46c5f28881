"""The status API's whole OpenAPI surface fuzzed (schemathesis) against a live daemon: the real Daemon with the
real model on a pty, holding a case it finished itself. No request makes a 5xx, with and without the token;
afterwards the daemon is healthy and ready, the finished case is unchanged, and a new case still goes through."""

import hashlib
import time

import httpx
import numpy as np
import pytest

from appliance.config import load_settings
from appliance.service.daemon import Daemon
from appliance.api.app import daemon_api
from appliance.offline.demo import case_info_for
from firmware_bridge.emulator import ScannerEmulator, TileToSend
from tests.conftest import MODEL_DIR
from tests.openapi_fuzz import fuzz_api, schema_operation_count
from tests.ptys import PtyPair
from tests.waiting import wait_until

EXAMPLES = 500  # per operation, each sent twice (without and with the token)


def stream(daemon: Daemon, pty: PtyPair, case_id: str, tiles: list[TileToSend]):
    ScannerEmulator(pty.transport(), case_info_for(case_id, "S-" + case_id, tiles, 4.0, 200), tiles,
                    encoding="zlib").run()
    progress = daemon.wait_case(case_id, timeout=120)
    assert progress is not None and progress.result is not None
    assert progress.outputs_done.wait(60)
    return progress


@pytest.mark.slow
def test_openapi_fuzz_against_a_live_daemon_makes_no_server_error(tmp_path, demo_image, pty_pair):
    tiles = [TileToSend(x, y, np.ascontiguousarray(demo_image[600 + y: 800 + y, 400 + x: 600 + x]))
             for y in range(0, 600, 200) for x in range(0, 600, 200)]
    daemon = Daemon(load_settings(None, data_dir=tmp_path / "var", model_dir=MODEL_DIR, api_port=0),
                    port=pty_pair.path, notify=lambda event: None, api=daemon_api)
    daemon.start()
    t0 = time.monotonic()
    try:
        stream(daemon, pty_pair, "LIVE-1", tiles)
        before = daemon.store.get_case("LIVE-1")
        files = {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
                 for p in (daemon.settings.cases_dir / "LIVE-1").iterdir()}
        base = f"http://127.0.0.1:{daemon.api.port}"
        operations, calls = fuzz_api(base, daemon.settings.token_path.read_text().strip(), EXAMPLES)
        assert len(operations) >= 8
        assert len(operations) == schema_operation_count(base)  # every operation of the schema was fuzzed
        # the daemon is alive, healthy and ready (the fuzzer may have asked for a reconnect: give it time)
        wait_until(lambda: not daemon.not_ready(), 15, interval=0.1, what="the daemon to be ready again",
                   detail=lambda: f"not ready: {daemon.not_ready()}")
        assert daemon.not_ready() == [] and daemon.health() == (True, "")
        with httpx.Client(base_url=base, timeout=10) as c:
            assert c.get("/health").status_code == 200 and c.get("/ready").status_code == 200
        after_fuzz = daemon.store.get_case("LIVE-1")
        stream(daemon, pty_pair, "LIVE-2", tiles)  # and it still takes a case
    finally:
        daemon.stop()
    by_class = {f"{k}xx": sum(1 for s in calls if s // 100 == k) for k in (2, 3, 4, 5)}
    print(f"\nAPI fuzz against a live daemon: {len(operations)} operations x {EXAMPLES} examples max, "
          f"{len(calls)} requests, by status class {by_class}, {time.monotonic() - t0:.0f} s")
    assert len(calls) >= 1000  # the fuzzer really ran (how many examples hypothesis draws per operation varies)
    # the finished case kept its call and its files (sign-off may have been fuzzed; the verdict is never changed)
    for key in ("verdict", "score", "status", "tiles_received", "model_sha256", "finished_at"):
        assert after_fuzz[key] == before[key], key
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in (daemon.settings.cases_dir / "LIVE-1").iterdir()} == files
    # 600 x 600 px of the demo slide's tumour, called suspicious by the shipped model, before and after the fuzz
    assert before["verdict"] == "suspicious" and before["status"] == "done"
    assert daemon.store.get_case("LIVE-2")["status"] == "done"
    assert daemon.store.get_case("LIVE-2")["verdict"] == "suspicious"
