"""The lab's systems, small and real, for the outbox tests: an HL7 v2 MLLP listener (python-hl7's asyncio
MLLP server) and a FHIR endpoint (http.server) that validates what it gets with fhir.resources, both on real
local sockets. Each can be stopped and started again on the same port, answer a rejection, or hold an ACK."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MllpReceiver:
    """Parses every message with ``hl7``, records (MSH-10, message text) and answers ``answer`` (AA, AE, AR).
    With ``hold`` cleared, the ACK waits until it is set (``got`` is set when a message has arrived)."""

    def __init__(self, answer: str = "AA"):
        self.port = free_port()
        self.answer = answer
        self.received: list[tuple[str, str]] = []
        self.got = threading.Event()
        self.hold = threading.Event()
        self.hold.set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server = None
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def accepted(self) -> set[str]:
        return {mid for mid, _ in self.received}

    async def _handle(self, reader, writer) -> None:
        import hl7

        try:
            while not reader.at_eof():
                message = await reader.readmessage()
                mid = str(message.segment("MSH")[10])
                self.received.append((mid, str(message)))
                self.got.set()
                while not self.hold.is_set():
                    await asyncio.sleep(0.01)
                writer.writemessage(message.create_ack(ack_code=self.answer, message_id=f"ACK-{mid}"))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, hl7.exceptions.ParseException):
            pass
        finally:
            writer.close()

    def start(self) -> None:
        import hl7.mllp

        ready = threading.Event()

        def run() -> None:
            self._loop = asyncio.new_event_loop()
            self._server = self._loop.run_until_complete(
                hl7.mllp.start_hl7_server(self._handle, "127.0.0.1", self.port))
            ready.set()
            self._loop.run_forever()
            self._server.close()
            tasks = asyncio.all_tasks(self._loop)  # connections still open: end them here, not at garbage collection
            for task in tasks:
                task.cancel()

            async def ended() -> None:
                await asyncio.gather(*tasks, return_exceptions=True)

            self._loop.run_until_complete(ended())
            self._loop.run_until_complete(self._server.wait_closed())
            self._loop.close()

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        ready.wait(10)

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop = self._thread = None


class FhirReceiver:
    """POST <base>/DiagnosticReport: checks the bearer token, validates the body as a FHIR R4B
    DiagnosticReport and records its message id; answers ``status`` (201, or 422, 503, ...)."""

    def __init__(self, token: str, status: int = 201):
        self.port = free_port()
        self.token, self.status = token, status
        self.received: list[tuple[str, dict]] = []  # (message id, body) of every request that validated
        self.answered: list[int] = []
        self._server: ThreadingHTTPServer | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}/fhir"

    def accepted(self) -> set[str]:
        return {mid for (mid, _), code in zip(self.received, self.answered) if 200 <= code < 300}

    def start(self) -> None:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_POST(self) -> None:
                from fhir.resources.R4B.diagnosticreport import DiagnosticReport

                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.path != "/fhir/DiagnosticReport" or \
                        self.headers.get("Authorization") != f"Bearer {outer.token}":
                    return self._answer(401 if self.path == "/fhir/DiagnosticReport" else 404, {})
                try:
                    report = DiagnosticReport.model_validate(json.loads(body))
                except ValueError as exc:
                    return self._answer(400, {"error": str(exc)[:500]})
                mid = next(i.value for i in report.identifier if i.system.endswith("message-id"))
                outer.received.append((mid, json.loads(body)))
                outer.answered.append(outer.status)
                self._answer(outer.status, {"resourceType": "OperationOutcome", "issue": [
                    {"severity": "error", "code": "invalid", "diagnostics": "rejected by the test"}]}
                    if outer.status >= 400 else {"resourceType": "DiagnosticReport", "id": mid})

            def _answer(self, code: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/fhir+json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
