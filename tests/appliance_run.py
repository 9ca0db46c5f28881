"""`appliance run` as a subprocess on a scanner port, as systemd runs it, for the tests that need the real
process: started, waited on until it says it is ready, its stderr read (and kept) by a thread."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from tests.conftest import MODEL_DIR


class ApplianceRun:
    """One `appliance run` on ``port`` with its data in ``data``, ``env`` added to its environment.

    On return it is ready (its `[ready]` line seen), unless ``wait_ready`` is False: the systemd tests watch
    READY=1 on ``notify_socket`` instead (without one, NOTIFY_SOCKET is removed from its environment)."""

    def __init__(self, port: str | Path, data: Path, *, model_dir: Path = MODEL_DIR, notify_socket: str | None = None,
                 wait_ready: bool = True, timeout: float = 120.0, **env: str):
        full_env = dict(os.environ, APPLIANCE_DATA_DIR=str(data), APPLIANCE_MODEL_DIR=str(model_dir),
                        APPLIANCE_API_PORT="0", **env)
        full_env.pop("NOTIFY_SOCKET", None)
        if notify_socket is not None:
            full_env["NOTIFY_SOCKET"] = notify_socket
        self.proc = subprocess.Popen([sys.executable, "-m", "appliance.cli", "run", "--port", str(port)],
                                     env=full_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self._said = threading.Condition()
        self._ended = False
        threading.Thread(target=self._read, daemon=True).start()
        if wait_ready:
            self.wait_for("[ready]", timeout)

    def _read(self) -> None:
        for line in self.proc.stderr:
            with self._said:
                self.lines.append(line)
                self._said.notify_all()
        with self._said:
            self._ended = True
            self._said.notify_all()

    def wait_for(self, prefix: str, timeout: float, *, anywhere: bool = False) -> str:
        """The first stderr line starting with ``prefix`` (containing it, if ``anywhere``), waiting up to
        ``timeout`` seconds for it. (Woken by each new line, not polling.)"""
        deadline = time.monotonic() + timeout
        with self._said:
            while True:
                found = next((line for line in self.lines
                              if (prefix in line if anywhere else line.startswith(prefix))), None)
                if found is not None:
                    return found
                left = deadline - time.monotonic()
                if self._ended or left <= 0:
                    why = "exited" if self._ended else f"said nothing like it in {timeout:.0f} s"
                    raise AssertionError(f"appliance run {why} before {prefix!r}:\n" + "".join(self.lines[-30:]))
                self._said.wait(left)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, then its exit code (SIGKILL if it has not exited within ``timeout``)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def kill(self) -> None:
        """SIGKILL, if it is still running."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
