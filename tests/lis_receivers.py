"""The lab's systems, small and real, for the outbox tests: an HL7 v2 MLLP listener (python-hl7's asyncio
MLLP server) and a FHIR endpoint (http.server), both on real local sockets and both strict, as a lab's
interface engine often is: a message hl7apy's strict v2.5.1 validation refuses is answered AR, a report the FHIR
JSON schemas or fhir.resources refuse is answered 422 (tests/lis_validators.py), and each keeps what it refused
in ``refused``. Each can be stopped and started again on the same port, answer a rejection, or hold an ACK."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from tests.lis_validators import fhir_schema_errors, hl7_strict_errors


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MllpReceiver:
    """Parses every message with ``hl7``, records (MSH-10, message text) and answers ``answer`` (AA, AE, AR), or
    AR with hl7apy's reason when strict validation refuses it (kept in ``refused``). With ``hold`` cleared, the
    ACK waits until it is set (``got`` is set when a message has arrived)."""

    def __init__(self, answer: str = "AA"):
        self.port = free_port()
        self.answer = answer
        self.received: list[tuple[str, str]] = []
        self.refused: list[tuple[str, str]] = []  # (MSH-10, hl7apy's reason)
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
                refusal = hl7_strict_errors(str(message))
                if refusal is None:
                    self.received.append((mid, str(message)))
                else:
                    self.refused.append((mid, refusal))
                self.got.set()
                while not self.hold.is_set():
                    await asyncio.sleep(0.01)
                code = self.answer if refusal is None else "AR"
                ack = str(message.create_ack(ack_code=code, message_id=f"ACK-{mid}"))
                if refusal is not None:  # MSA-3, the text: the reason, without HL7's delimiters
                    text = "".join(" " if c in "|^~\\&\r\n" else c for c in refusal[:200])
                    ack = ack.replace(f"MSA|AR|{mid}", f"MSA|AR|{mid}|{text}", 1)
                writer.writemessage(ack)
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
    """POST <base>/DiagnosticReport: checks the bearer token, validates the body against the FHIR JSON schemas
    and as a FHIR R4B DiagnosticReport (fhir.resources) and records its message id; answers ``status`` (201, or
    422, 503, ...), or 422 with the reasons when the body does not validate (kept in ``refused``)."""

    def __init__(self, token: str, status: int = 201):
        self.port = free_port()
        self.token, self.status = token, status
        self.received: list[tuple[str, dict]] = []  # (message id, body) of every request that validated
        self.answered: list[int] = []
        self.refused: list[str] = []  # why each body that did not validate was refused
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
                    errors = fhir_schema_errors(json.loads(body))
                    report = DiagnosticReport.model_validate(json.loads(body))
                except ValueError as exc:
                    errors = [str(exc)[:500]]
                if errors:
                    outer.refused.append("; ".join(errors))
                    return self._answer(422, {"resourceType": "OperationOutcome", "issue": [
                        {"severity": "error", "code": "invalid", "diagnostics": e} for e in errors]})
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
