"""The daemon is SIGKILLed and restarted under an open terminal UI: a banner, then recovery by itself."""

import asyncio
import os
import signal
import socket
import subprocess
import sys

import httpx

from appliance.tui.app import TriageApp
from appliance.tui.widgets import Banner
from tests.conftest import MODEL_DIR
from tests.ptys import PtyPair
from tests.tui.conftest import wait_for
from tests.waiting import wait_until


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_daemon(env: dict, serial: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "appliance.cli", "run", "--port", serial], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{env['APPLIANCE_API_PORT']}"

    def healthy() -> bool:
        assert proc.poll() is None, proc.stderr.read()  # it exited: no point waiting
        try:
            return httpx.get(f"{url}/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_until(healthy, 60, interval=0.1, what=f"the daemon to answer {url}/health")
    except BaseException:
        proc.kill()
        raise
    return proc


def test_banner_while_the_daemon_is_down_then_recovery_without_restarting_the_tui(tmp_path):
    port = free_port()
    pty = PtyPair()
    env = dict(os.environ, APPLIANCE_DATA_DIR=str(tmp_path / "var"), APPLIANCE_MODEL_DIR=str(MODEL_DIR),
               APPLIANCE_API_PORT=str(port))
    procs = [start_daemon(env, pty.path)]

    async def scenario():
        app = TriageApp(f"http://127.0.0.1:{port}", tmp_path / "var" / "api-token", poll_s=0.1)
        async with app.run_test(size=(80, 24)) as pilot:
            banner = app.live.query_one(Banner)
            await wait_for(pilot, lambda: app.connected is True, what="the first status")
            shown_while_up = banner.has_class("-shown")
            procs[0].send_signal(signal.SIGKILL)
            procs[0].wait(10)
            await wait_for(pilot, lambda: banner.has_class("-shown"), what="the banner")
            down_text = str(banner.content)
            procs.append(await asyncio.to_thread(start_daemon, env, pty.path))
            await wait_for(pilot, lambda: not banner.has_class("-shown"), what="recovery")
            link = str(app.live.query_one("#link").content)
            return shown_while_up, down_text, app.is_running, link

    try:
        shown_while_up, down_text, running, link = asyncio.run(scenario())
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
                p.wait(20)
        pty.close()
    assert not shown_while_up
    assert "DAEMON NOT REACHABLE" in down_text and f"127.0.0.1:{port}" in down_text
    assert running and "Scanner link:" in link
