"""The outbox's senders: one thread per destination (a receiver that hangs never holds up another) that
delivers its due messages from the case store, one at a time, and records each attempt's outcome there. A pending message is tried again after an exponential backoff (1 s doubling to
BACKOFF_MAX_S); a rejected one waits for an operator (POST /deliveries/{id}/retry). The rows are written in
the transaction that records the call, so a restart or kill -9 loses none: whatever was not acknowledged is
sent again, the same bytes with the same message id."""

from __future__ import annotations

import logging
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path

from appliance.lis.senders import send
from appliance.store import CaseStore
from appliance.store.database import utcnow
from appliance.terms import DeliveryStatus

log = logging.getLogger(__name__)

BACKOFF_MAX_S = 300.0
POLL_S = 0.5


def backoff_s(attempts: int, first: float = 1.0, most: float = BACKOFF_MAX_S) -> float:
    return min(most, first * 2 ** max(0, attempts - 1))


class Outbox:
    def __init__(self, store: CaseStore, token_file: Path | None = None, *, first_backoff_s: float = 1.0,
                 max_backoff_s: float = BACKOFF_MAX_S, timeout_s: float = 10.0):
        self.store, self.token_file = store, token_file
        self.first_backoff_s, self.max_backoff_s, self.timeout_s = first_backoff_s, max_backoff_s, timeout_s
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(dest,), name=f"outbox {dest}", daemon=True)
                         for dest in store.destinations]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            if thread.is_alive():
                thread.join(timeout=self.timeout_s + 5)

    def _run(self, destination: str) -> None:
        while not self._stop.is_set():
            try:
                due = self.store.due_deliveries(utcnow(), destination)
            except Exception:  # noqa: BLE001 - the store is busy or closing: look again shortly
                log.exception("outbox: cannot read the due deliveries")
                due = []
            for d in due:
                if self._stop.is_set():
                    return
                self.deliver(d)
            self._stop.wait(POLL_S if not due else 0)

    def deliver(self, d: dict) -> None:
        outcome = send(d["destination"], d["payload"], token_file=self.token_file, timeout=self.timeout_s)
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
