"""A tampered model at start: `appliance run` comes up degraded instead of crash-looping under systemd.

A real copy of the model with one byte of its OpenVINO weights changed; `appliance run` as a subprocess with
a real NOTIFY_SOCKET (unix datagrams) and WATCHDOG_USEC; real HTTP to /ready, /status and /health. The
process is up and serving its status (READY=1 with STATUS=NOT READY: <file, sha256 mismatch>), keeps feeding
the watchdog, never opens the scanner port, and exits 0 on SIGTERM."""

import os
import re
import shutil
import signal

import httpx

from appliance.config import load_settings
from appliance.service.daemon import Daemon
from appliance.api.app import daemon_api
from tests.appliance_run import ApplianceRun
from tests.conftest import MODEL_DIR
from tests.conftest import receive_datagrams as receive
from tests.waiting import wait_until


def tampered_copy(tmp_path, filename="model.int8.bin"):
    model = shutil.copytree(MODEL_DIR, tmp_path / "idc-resnet", ignore=shutil.ignore_patterns("work"))
    with open(model / filename, "r+b") as f:
        f.seek(1000)
        b = f.read(1)
        f.seek(1000)
        f.write(bytes([b[0] ^ 0x01]))  # one bit of one byte
    return model


def test_run_with_a_tampered_model_is_up_not_ready_and_says_why(notify_socket, pty_pair, tmp_path):
    path, sock = notify_socket
    model = tampered_copy(tmp_path)
    scanner = tmp_path / "scanner"
    os.symlink(pty_pair.path, scanner)  # a scanner is plugged in: the daemon must still not open it
    daemon = ApplianceRun(scanner, tmp_path / "var", model_dir=model, notify_socket=path, wait_ready=False,
                          WATCHDOG_USEC="400000", APPLIANCE_FAULT_INJECTION="1")
    proc = daemon.proc
    try:
        sock.settimeout(60)
        first = sock.recv(4096).decode()
        fields = dict(line.split("=", 1) for line in first.split("\n"))
        assert fields.get("READY") == "1", first  # READY=1 at once: nothing to wait for
        assert fields["MAINPID"] == str(proc.pid)
        status_line = fields["STATUS"]
        assert status_line.startswith("NOT READY: "), status_line
        assert "model.int8.bin" in status_line and "sha256 mismatch" in status_line and "\n" not in status_line

        url = daemon.wait_for("[api] url=", 60).split("url=", 1)[1].strip()

        beats = receive(sock, 2.0)  # the watchdog goes on: the process does what it can, serve its status
        watchdogs = beats.count("WATCHDOG=1")
        with httpx.Client(base_url=url, timeout=10) as c:
            ready = c.get("/ready")
            status = c.get("/status").json()
            health = c.get("/health")
            token = (tmp_path / "var" / "api-token").read_text().strip()
            reconnect = c.post("/link/reconnect", json={"initials": "AB", "reason": "try"},
                               headers={"Authorization": f"Bearer {token}"})
        assert proc.poll() is None
        device = pty_pair.path
        open_files = {os.path.realpath(f"/proc/{proc.pid}/fd/{fd}") for fd in os.listdir(f"/proc/{proc.pid}/fd")}
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        after = receive(sock, 1.0)
    finally:
        daemon.kill()
    text = "".join(daemon.lines)
    print(f"\nSTATUS={status_line}\nWATCHDOG=1 datagrams in 2 s: {watchdogs}; /ready {ready.status_code} "
          f"{ready.json()}")
    assert watchdogs >= 5, beats  # every 0.2 s for 2 s: how many fit in the window depends on scheduling
    assert ready.status_code == 503
    reasons = ready.json()["reasons"]
    assert len(reasons) == 1 and str(model / "model.int8.bin") in reasons[0] and "sha256 mismatch" in reasons[0]
    assert status["problem"] == reasons[0] == status_line.removeprefix("NOT READY: ")
    assert status["link"] is None and status["model"] is None  # the port was never opened, no model is loaded
    assert health.status_code == 200
    assert reconnect.status_code == 409 and "sha256 mismatch" in reconnect.json()["detail"]
    assert any("STOPPING=1" in d for d in after)
    # one clear error line, no traceback
    errors = [line for line in text.splitlines() if "sha256 mismatch" in line]
    assert len(errors) == 1 and errors[0].startswith("NOT READY"), text
    assert "Traceback" not in text
    assert device not in open_files  # the scanner port was never opened


def test_daemon_with_a_missing_model_file_starts_degraded_and_records_why(tmp_path):
    model = shutil.copytree(MODEL_DIR, tmp_path / "idc-resnet", ignore=shutil.ignore_patterns("work"))
    (model / "model.int8.xml").unlink()
    settings = load_settings(None, data_dir=tmp_path / "var", model_dir=model, api_port=0)
    daemon = Daemon(settings, port=str(tmp_path / "scanner"), notify=lambda event: None, api=daemon_api)
    daemon.start()
    try:
        assert daemon.link is None and daemon.pipeline is None and daemon.engine is None
        assert re.search(r"model file .*model\.int8\.xml is missing", daemon.problem)
        assert daemon.not_ready() == [daemon.problem]
        assert daemon.health() == (True, "")
        assert daemon.status_line() == f"NOT READY: {daemon.problem}"
        with httpx.Client(base_url=f"http://127.0.0.1:{daemon.api.port}", timeout=10) as c:
            ready = c.get("/ready")
            status = c.get("/status").json()
            cases = c.get("/cases")
    finally:
        daemon.stop()
    assert ready.status_code == 503 and ready.json()["reasons"] == [daemon.problem]
    assert status["problem"] == daemon.problem and status["storage"]["free_bytes"] > 0
    assert cases.status_code == 200  # the history stays readable
    assert [e["detail"]["reason"] for e in daemon.store.events() if e["kind"] == "not-ready"] == [daemon.problem]


def test_good_model_is_ready_and_has_no_problem(settings, pty_pair):
    """The other side of the same switch: with the real model the daemon opens the link and is not degraded."""
    daemon = Daemon(settings, port=pty_pair.path, notify=lambda event: None, api=daemon_api)
    daemon.start()
    try:
        wait_until(lambda: not daemon.not_ready(), 10, what="the daemon to be ready",
                   detail=lambda: f"not ready: {daemon.not_ready()}")
        assert daemon.problem is None and daemon.not_ready() == []
        assert daemon.status().problem is None and daemon.link is not None
    finally:
        daemon.stop()
