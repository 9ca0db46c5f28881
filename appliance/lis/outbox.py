"""The outbox: where each call goes (Destination), what is queued for it (Outbox, called by the store inside
the transaction that records the call), and the sender threads that deliver it (OutboxSender).

The rows are written in the transaction that records the call, so a restart or kill -9 loses none: whatever
was not acknowledged is sent again, the same bytes with the same message id. A pending message is tried
again after an exponential backoff (1 s doubling to BACKOFF_MAX_S); a rejected one waits for an operator
(POST /deliveries/{id}/retry). One sender thread per destination, so a receiver that hangs never holds up
another."""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

from appliance.errors import ConfigError
from appliance.lis.messages import Addressing, ReportedCall, fhir_report, hl7_oru
from appliance.lis.senders import send_fhir, send_mllp
from appliance.store.database import utcnow
from appliance.terms import DeliveryStatus

if TYPE_CHECKING:
    from appliance.config import Settings
    from appliance.store.database import CaseStore

log = logging.getLogger(__name__)

BACKOFF_MAX_S = 300.0
POLL_S = 0.5


class Transport(StrEnum):
    """How a destination is reached; its name is the prefix of the destination's stored name."""

    MLLP = "mllp"  # HL7 v2 ORU^R01 over MLLP: host:port
    FHIR = "fhir"  # a FHIR DiagnosticReport POSTed to <base url>/DiagnosticReport


class MessageKind(StrEnum):
    """What the deliveries table's ``kind`` column holds."""

    HL7 = "hl7"
    FHIR = "fhir"


@dataclass(frozen=True)
class Destination:
    transport: Transport
    target: str  # host:port, or the FHIR base URL

    @property
    def name(self) -> str:
        """As the deliveries table stores it: ``mllp:host:port`` or ``fhir:<base url>``."""
        return f"{self.transport}:{self.target}"

    @property
    def message_kind(self) -> MessageKind:
        return MessageKind.HL7 if self.transport == Transport.MLLP else MessageKind.FHIR

    @classmethod
    def parse(cls, name: str) -> "Destination":
        transport, _, target = name.partition(":")
        if transport not in Transport.__members__.values() or not target:
            raise ConfigError(f"{name!r} is not a LIS destination (mllp:host:port or fhir:<base url>)")
        return cls(Transport(transport), target)

    def message(self, call: ReportedCall, at: str, to: Addressing = Addressing()) -> str:
        """The message this destination takes for ``call``, with the lab's names and systems ``to``."""
        if self.transport == Transport.MLLP:
            return hl7_oru(call, at, to)
        return json.dumps(fhir_report(call, at, to))


def destinations_of(settings: "Settings") -> list[Destination]:
    """Every destination the settings name, MLLP receivers first."""
    out = [Destination(Transport.MLLP, m) for m in settings.lis_mllp]
    if settings.lis_fhir_url:
        out.append(Destination(Transport.FHIR, settings.lis_fhir_url))
    return out


def outbox_of(settings: "Settings") -> "Outbox":
    """The outbox the settings describe: their destinations, and the lab's names and identifier systems."""
    return Outbox(destinations_of(settings), Addressing.of_settings(settings))


class Outbox:
    """What the store calls inside the transaction that records (or signs off) a call: one delivery row per
    destination. The store knows nothing of HL7 or FHIR; this knows nothing of SQLite."""

    def __init__(self, destinations: Iterable[Destination], addressing: Addressing = Addressing()):
        self.destinations = list(destinations)
        self.addressing = addressing

    def __bool__(self) -> bool:
        return bool(self.destinations)

    def deliveries(self, case: dict, revision: int, at: str) -> list[dict]:
        """The rows for revision ``revision`` of ``case`` (a cases row as the store reads it). A message that
        cannot be built is a failed delivery with the reason, never a lost call."""
        call = ReportedCall.of_case(case, revision)
        rows = []
        for dest in self.destinations:
            status, payload, error = DeliveryStatus.PENDING, None, None
            try:
                payload = dest.message(call, at, self.addressing)
            except Exception as exc:  # noqa: BLE001 - a message that cannot be built must not lose the call
                status, error = DeliveryStatus.FAILED, f"the message could not be built: {exc}"
            rows.append({
                "id": f"{call.message_id}.{hashlib.sha256(dest.name.encode()).hexdigest()[:10]}",
                "case_id": call.case_id, "revision": revision, "message_id": call.message_id,
                "destination": dest.name, "kind": dest.message_kind, "payload": payload, "status": status,
                "attempts": 0, "next_attempt_at": at, "last_error": error, "created_at": at, "delivered_at": None,
            })
        return rows


def backoff_s(attempts: int, first: float = 1.0, most: float = BACKOFF_MAX_S) -> float:
    return min(most, first * 2 ** max(0, attempts - 1))


class OutboxSender:
    """One thread per destination: delivers its due messages from the store one at a time and records each
    attempt's outcome there."""

    def __init__(self, store: "CaseStore", destinations: Iterable[Destination], token_file: Path | None = None, *,
                 first_backoff_s: float = 1.0, max_backoff_s: float = BACKOFF_MAX_S, timeout_s: float = 10.0):
        self.store, self.token_file = store, token_file
        self.first_backoff_s, self.max_backoff_s, self.timeout_s = first_backoff_s, max_backoff_s, timeout_s
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(dest,), name=f"outbox {dest.name}", daemon=True)
                         for dest in destinations]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            if thread.is_alive():
                thread.join(timeout=self.timeout_s + 5)

    def _run(self, destination: Destination) -> None:
        while not self._stop.is_set():
            try:
                due = self.store.due_deliveries(utcnow(), destination.name)
            except Exception:  # noqa: BLE001 - the store is busy or closing: look again shortly
                log.exception("outbox: cannot read the due deliveries")
                due = []
            for d in due:
                if self._stop.is_set():
                    return
                self.deliver(destination, d)
            self._stop.wait(POLL_S if not due else 0)

    def deliver(self, destination: Destination, d: dict) -> None:
        if destination.transport == Transport.MLLP:
            outcome = send_mllp(destination.target, d["payload"], self.timeout_s)
        else:
            outcome = send_fhir(destination.target, d["payload"], self.token_file, self.timeout_s)
        attempts = d["attempts"] + 1
        next_at = None
        if outcome.status == DeliveryStatus.PENDING:
            wait = backoff_s(attempts, self.first_backoff_s, self.max_backoff_s)
            next_at = (datetime.now(timezone.utc) + timedelta(seconds=wait)).isoformat(timespec="milliseconds")
            log.warning("delivery %s: attempt %d failed, again in %.1f s: %s", d["id"], attempts, wait,
                        outcome.detail)
        elif outcome.status == DeliveryStatus.FAILED:
            log.error("delivery %s rejected: %s", d["id"], outcome.detail)
        self.store.delivery_attempted(d["id"], outcome.status, error=outcome.detail, next_attempt_at=next_at)
