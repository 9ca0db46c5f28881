"""`appliance run` as systemd runs it: the notify protocol on a real unix datagram socket, a real pty as
the scanner port, and a pipeline hang injected with SIGUSR1 (settings.fault_injection)."""

import os
import signal
import time
from contextlib import closing

from appliance.service.systemd import SystemdNotifier
from tests.appliance_run import ApplianceRun
from tests.conftest import receive_datagrams as receive
from tests.stores import open_store
from tests.waiting import wait_until


def test_notifier_speaks_the_datagram_protocol(notify_socket):
    path, sock = notify_socket
    n = SystemdNotifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "3000000"})
    assert n.enabled and n.watchdog_interval == 1.5
    assert n.ready("loaded")
    assert n.watchdog()
    assert n.status("case A") and not n.status("case A")  # unchanged status is not resent
    got = receive(sock, 0.5)
    assert got[0].split("\n")[:2] == ["READY=1", "STATUS=loaded"] and got[1:] == ["WATCHDOG=1", "STATUS=case A"]
    assert not SystemdNotifier({}).enabled and not SystemdNotifier({}).ready("x")  # not under systemd: a no-op
    assert SystemdNotifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "1000", "WATCHDOG_PID": "1"}).watchdog_interval is None


def test_run_is_ready_after_the_port_opens_and_withholds_the_watchdog_when_the_pipeline_hangs(
        notify_socket, pty_pair, tmp_path):
    path, sock = notify_socket
    daemon = ApplianceRun(pty_pair.path, tmp_path / "var", notify_socket=path, wait_ready=False,
                          WATCHDOG_USEC="400000", APPLIANCE_FAULT_INJECTION="1", APPLIANCE_PIPELINE_STALL_S="1")
    proc = daemon.proc
    try:
        sock.settimeout(60)
        first = sock.recv(4096).decode()  # nothing comes before READY=1 but STATUS= while waiting for the port
        while first.startswith("STATUS="):
            first = sock.recv(4096).decode()
        assert first.startswith("READY=1"), first
        assert f"MAINPID={proc.pid}" in first
        healthy = receive(sock, 2.0)
        assert healthy.count("WATCHDOG=1") >= 5  # every 0.2 s while healthy

        proc.send_signal(signal.SIGUSR1)  # the pipeline thread hangs from now on
        # beyond pipeline_stall_s (1 s) the service loop finds the pipeline unhealthy and says so, once
        daemon.wait_for("not healthy, withholding the systemd watchdog", 30, anywhere=True)
        receive(sock, 0.05)  # drop what was sent before the stall was seen
        hung = receive(sock, 2.0)
        assert "WATCHDOG=1" not in hung, hung
        assert proc.poll() is None  # alive but unhealthy: systemd's watchdog is what restarts it

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        assert any("STOPPING=1" in d for d in receive(sock, 1.0))
    finally:
        daemon.kill()


def test_ready_waits_for_the_scanner_port_to_appear(notify_socket, pty_pair, tmp_path):
    path, sock = notify_socket
    port = tmp_path / "scanner"  # not plugged in yet
    daemon = ApplianceRun(port, tmp_path / "var", notify_socket=path, wait_ready=False)
    proc = daemon.proc
    try:
        sock.settimeout(60)
        waiting = sock.recv(4096).decode()
        assert waiting.startswith("STATUS=model loaded; waiting for the scanner port"), waiting
        assert not any(d.startswith("READY=1") for d in receive(sock, 1.5))
        os.symlink(pty_pair.path, port)  # the scanner is plugged in
        sock.settimeout(10)
        got = sock.recv(4096).decode()
        while not got.startswith("READY=1"):
            assert got.startswith("STATUS="), got
            got = sock.recv(4096).decode()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        daemon.kill()


def test_sigterm_mid_case_stops_cleanly_with_every_acked_tile_whole(tmp_path, demo_image):
    import hashlib
    import threading

    import numpy as np

    from appliance.offline.demo import case_info_for
    from firmware_bridge import PtyCable
    from firmware_bridge.emulator import ScannerEmulator, TileToSend
    from firmware_bridge.errors import BridgeError

    tiles = [TileToSend(x, y, demo_image[y: y + 200, 600 + x: 800 + x].copy())
             for y in range(0, 1000, 200) for x in range(0, 1000, 200)]
    acked = []
    cable = PtyCable(tmp_path / "scanner")
    daemon = ApplianceRun(cable.path, tmp_path / "var")  # the scanner starts once the port is served

    def slow(ts):
        for t in ts:
            time.sleep(0.05)  # a scanner's pace, so that the SIGTERM lands mid-case
            yield t

    info = case_info_for("TERM-1", "S", tiles, 4.0, 200)
    scanner = ScannerEmulator(cable, info, slow(tiles), encoding="raw", reconnect_timeout=1.0, ack_timeout=1.0,
                              max_retries=2, progress=lambda sent, done, total: acked.append(done))

    def run():
        try:
            scanner.run()
        except BridgeError:
            pass  # the host went away mid-case: expected

    t = threading.Thread(target=run, daemon=True)
    try:
        t.start()
        wait_until(lambda: acked and acked[-1] >= 5, 60, what="5 tiles ACKed",
                   detail=lambda: f"ACKed: {acked}\n" + "".join(daemon.lines[-30:]))
        assert acked and acked[-1] >= 5, (acked, "".join(daemon.lines[-30:]))
        assert daemon.stop() == 0
        cable.unplug()  # nobody listens any more: the scanner gives up after reconnect_timeout
        t.join(60)
        assert not t.is_alive()
    finally:
        daemon.kill()
        cable.close()
    spool = tmp_path / "var" / "spool" / "TERM-1"
    assert not list(spool.glob(".*.tmp"))  # no half-written tile
    with closing(open_store(tmp_path / "var" / "appliance.db")) as store:
        rows = store.tiles("TERM-1")
    assert len(rows) >= 5  # how many more than the 5 waited for depends on when the SIGTERM landed
    assert set(scanner.result.acked) <= {r["idx"] for r in rows}  # no ACKed tile is missing
    assert len(scanner.result.acked) == acked[-1] < len(tiles)  # and the case really was cut short
    for r in rows:  # every tile the scanner was told is safe is on disk, whole
        f = spool / f"tile-{r['idx']:06d}_x{r['x']}_y{r['y']}.npy"
        assert hashlib.sha256(np.load(f).tobytes()).hexdigest() == r["sha256"] == \
            hashlib.sha256(tiles[r["idx"]].pixels.tobytes()).hexdigest()
