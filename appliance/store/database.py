"""The case log in SQLite: one writer thread owns the only write connection; reads borrow one of a few
read-only connections (records.ReadPool).

Durability is chosen on purpose: WAL so readers (API, TUI) never block the writer, and
``synchronous=FULL`` so a committed case row survives power loss, not just a process crash.

CaseStore is one object in four files: this one (the writer, the case lifecycle, the reads), and the
deliveries, site points and reviewers beside it.
"""

from __future__ import annotations

import json
import queue
import sqlite3
import threading
from concurrent.futures import Future
from contextlib import AbstractContextManager
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Protocol

import sqlite_utils

from appliance.errors import CaseNotFoundError, CaseStateError, StoreError
from appliance.model.ref import ModelRef
from appliance.pipeline.result import TriageResult
from appliance.store.deliveries import DeliveryRecords
from appliance.store.migrations import migrations
from appliance.store.records import ReadPool, audit, decode_row, utcnow
from appliance.store.reviewers import ReviewerRecords
from appliance.store.site_points import SitePointRecords
from appliance.terms import OPEN_STATUSES, CaseStatus, ReasonCode, Verdict

__all__ = ["CaseStore", "DeliveryPlanner", "utcnow"]


class DeliveryPlanner(Protocol):
    """What the store is given to queue a call's messages (appliance.lis.outbox.Outbox): the delivery rows for
    one revision of a case, built inside the transaction that records it. Falsy when there is nowhere to send."""

    def __bool__(self) -> bool: ...

    def deliveries(self, case: dict, revision: int, at: str) -> list[dict]: ...



def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, check_same_thread=False, timeout=10)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA foreign_keys=ON")
    return conn


class CaseStore(DeliveryRecords, SitePointRecords, ReviewerRecords):
    """Writes go through ``submit`` to the single writer thread; reads borrow a pooled read connection."""

    def __init__(self, path: Path, outbox: DeliveryPlanner | None = None):
        """``outbox``: where each call is to be delivered; its delivery rows are written in the same transaction
        as the call (None: the calls go nowhere)."""
        self.path = Path(path)
        self.outbox = outbox
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite_utils.Database(_connect(self.path))
            migrations.apply(self._db)
        except (sqlite3.Error, OSError) as exc:
            raise StoreError(f"cannot open the case database {self.path}: {exc}") from None
        self._readers = ReadPool(self.path)
        self._queue: queue.Queue[tuple[Callable, Future] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._writer, name="store-writer", daemon=True)
        self._thread.start()

    # -- the writer ---------------------------------------------------------------------------------
    def _writer(self) -> None:
        while (item := self._queue.get()) is not None:
            fn, fut = item
            try:
                with self._db.conn:
                    fut.set_result(fn(self._db))
            except Exception as exc:  # handed to the caller through the future, never dropped
                fut.set_exception(exc)
        self._db.conn.close()

    def submit(self, fn: Callable[[sqlite_utils.Database], Any]) -> Future:
        fut: Future = Future()
        if not self._thread.is_alive():
            fut.set_exception(StoreError("the case database is closed"))
            return fut
        self._queue.put((fn, fut))
        return fut

    def write(self, fn: Callable[[sqlite_utils.Database], Any], timeout: float = 30) -> Any:
        """Run ``fn`` on the writer thread inside a transaction and wait for it to commit."""
        try:
            return self.submit(fn).result(timeout)
        except sqlite3.Error as exc:
            raise StoreError(f"writing to {self.path} failed: {exc}") from None

    def close(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join(timeout=30)
        self._readers.close()

    # -- case lifecycle -------------------------------------------------------------------------------
    def case_started(self, case_id: str, *, specimen_id: str = "", source: str = "", tiles_expected: int | None = None,
                     model: ModelRef | None = None, accession: str = "") -> None:
        row = _started_row(case_id, specimen_id=specimen_id, source=source, tiles_expected=tiles_expected,
                           model=model, accession=accession)
        self.write(lambda db: db["cases"].upsert(row, pk="id"))

    def case_recorded(self, case_id: str, outcome: TriageResult | str, *, specimen_id: str = "", source: str = "",
                      model: ModelRef | None = None) -> None:
        """A case started and finished in one transaction: its call, or (a message) its failure. A batch's
        cases are recorded so, never left open in the store by a batch killed between the two."""
        row = _started_row(case_id, specimen_id=specimen_id, source=source, model=model)
        fields = _failed_fields(outcome) if isinstance(outcome, str) else _finished_fields(outcome)

        def _write(db: sqlite_utils.Database) -> None:
            db["cases"].upsert(row, pk="id")
            db["cases"].update(case_id, fields)
            if not isinstance(outcome, str):
                self._queue_deliveries(db, case_id, fields["finished_at"])

        self.write(_write)

    def tile_stored(self, case_id: str, idx: int, x: int, y: int, w: int, h: int, sha256: str) -> None:
        def _write(db: sqlite_utils.Database) -> None:
            db["tiles"].upsert(
                {"case_id": case_id, "idx": idx, "x": x, "y": y, "w": w, "h": h, "sha256": sha256,
                 "stored_at": utcnow()},
                pk=("case_id", "idx"),
            )
            db.execute(
                "update cases set tiles_received = (select count(*) from tiles where case_id = ?) where id = ?",
                [case_id, case_id],
            )

        self.write(_write)

    def case_processing(self, case_id: str) -> None:
        self.write(lambda db: db["cases"].update(case_id, {"status": CaseStatus.PROCESSING}))

    def case_finished(self, case_id: str, result: TriageResult) -> None:
        fields = _finished_fields(result)

        def _write(db: sqlite_utils.Database) -> None:
            db["cases"].update(case_id, fields)
            self._queue_deliveries(db, case_id, fields["finished_at"])

        self.write(_write)

    def case_abandoned(self, case_id: str, message: str) -> None:
        fields = {"status": CaseStatus.ABANDONED, "finished_at": utcnow(),
                  "reasons": json.dumps([{"code": ReasonCode.ABANDONED, "message": message}])}
        self.write(lambda db: db["cases"].update(case_id, fields))

    def case_failed(self, case_id: str, message: str) -> None:
        fields = _failed_fields(message)
        self.write(lambda db: db["cases"].update(case_id, fields))

    def sign_off(self, case_id: str, *, by: str, comment: str = "", via: str = "api") -> dict:
        """Sign a finished case off (who, when, comment) and audit it. Raises CaseNotFoundError, or
        CaseStateError while the case is still open."""
        at = utcnow()

        def _write(db: sqlite_utils.Database) -> dict:
            rows = list(db["cases"].rows_where("id = ?", [case_id]))
            if not rows:
                raise CaseNotFoundError(f"no case {case_id!r}")
            if rows[0]["status"] in OPEN_STATUSES:
                raise CaseStateError(f"case {case_id!r} is still {rows[0]['status']}; sign off once it is finished")
            db["cases"].update(case_id, {"signed_off_by": by, "signed_off_at": at, "sign_off_comment": comment})
            audit(db, at, by, via, "sign-off", case_id, {"comment": comment})
            self._queue_deliveries(db, case_id, at)
            return {"case_id": case_id, "signed_off_by": by, "signed_off_at": at}

        return self.write(_write)


    def audit(self, actor: str, action: str, *, case_id: str | None = None, detail: dict | None = None,
              via: str = "api") -> None:
        self.write(lambda db: audit(db, utcnow(), actor, via, action, case_id, detail or {}))

    def event(self, kind: str, *, case_id: str | None = None, detail: dict | None = None) -> None:
        """A lifecycle event or error, kept for the case's history (committed before this returns, so the
        history never lags what the scanner or a client was told)."""
        row = {"at": utcnow(), "case_id": case_id, "kind": kind, "detail": json.dumps(detail or {}, default=str)}
        self.write(lambda db: db["events"].insert(row))

    def model_seen(self, model: ModelRef) -> None:
        at = utcnow()

        def _write(db: sqlite_utils.Database) -> None:
            if db["models"].count_where("sha256 = ?", [model.sha256]):
                db["models"].update(model.sha256, {"last_seen": at})
            else:
                db["models"].insert({"sha256": model.sha256, "name": model.name, "version": model.version,
                                     "backend": model.backend, "first_seen": at, "last_seen": at})

        self.write(_write)

    # -- reads ----------------------------------------------------------------------------------------
    def counts(self) -> dict:
        """Totals for /metrics: tiles stored, and cases by verdict (status while unfinished)."""
        with self._reading() as db:
            tiles = db.execute("select count(*) from tiles").fetchone()[0]
            rows = db.execute("select coalesce(verdict, status), count(*) from cases group by 1").fetchall()
            return {"tiles": tiles, "by_verdict": {k: v for k, v in rows}}

    def open_cases(self) -> list[dict]:
        """Cases a previous run left receiving or processing (to resume after a crash), oldest first."""
        with self._reading() as db:
            rows = db["cases"].rows_where(f"status in ({', '.join('?' * len(OPEN_STATUSES))})", list(OPEN_STATUSES),
                                          order_by="received_at")
            return [decode_row(r) for r in rows]

    def called_cases(self, latest: int | None = None) -> list[dict]:
        """id and tiles_received of the cases that got a call (done or cannot-call), oldest first; only the
        ``latest`` ones, if given."""
        with self._reading() as db:
            rows = db.execute("select id, tiles_received from cases where status in (?, ?) order by received_at desc"
                              + (f" limit {int(latest)}" if latest is not None else ""),
                              [CaseStatus.DONE, CaseStatus.CANNOT_CALL]).fetchall()
            return [{"id": r[0], "tiles_received": r[1]} for r in reversed(rows)]

    def events(self, case_id: str | None = None) -> list[dict]:
        return self._rows("events", "case_id = ?" if case_id else None, [case_id] if case_id else [], "id")

    def audit_log(self, case_id: str | None = None) -> list[dict]:
        return self._rows("audit", "case_id = ?" if case_id else None, [case_id] if case_id else [], "id")

    def models(self) -> list[dict]:
        return self._rows("models", None, [], "first_seen")

    def _rows(self, table: str, where: str | None, args: list, order: str, limit: int | None = None) -> list[dict]:
        with self._reading() as db:
            rows = db[table].rows_where(where, args, order_by=order, limit=limit)
            return [dict(r, detail=json.loads(r["detail"])) if "detail" in r else dict(r) for r in rows]

    def _reading(self) -> AbstractContextManager[sqlite_utils.Database]:
        """A read connection, borrowed for a ``with`` block."""
        return self._readers.connection()

    def list_cases(self, limit: int = 50, offset: int = 0, *, verdict: str | None = None, since: str | None = None,
                   until: str | None = None, signed_off: bool | None = None) -> list[dict]:
        """Newest first; filters: verdict, received_at >= since and < until (ISO-8601), signed off or not."""
        where, args = [], []
        if verdict is not None:
            where.append("verdict = ?")
            args.append(verdict)
        if since is not None:
            where.append("received_at >= ?")
            args.append(since)
        if until is not None:
            where.append("received_at < ?")
            args.append(until)
        if signed_off is not None:
            where.append("signed_off_at is not null" if signed_off else "signed_off_at is null")
        with self._reading() as db:
            rows = db["cases"].rows_where(" and ".join(where) or None, args, order_by="received_at desc",
                                          limit=limit, offset=offset)
            return [decode_row(r) for r in rows]

    def get_case(self, case_id: str) -> dict | None:
        with self._reading() as db:
            rows = list(db["cases"].rows_where("id = ?", [case_id]))
            return decode_row(rows[0]) if rows else None

    def tiles(self, case_id: str) -> list[dict]:
        with self._reading() as db:
            return list(db["tiles"].rows_where("case_id = ?", [case_id], order_by="idx"))


def _started_row(case_id: str, *, specimen_id: str = "", source: str = "", tiles_expected: int | None = None,
                 model: ModelRef | None = None, accession: str = "") -> dict:
    return {
        "id": case_id,
        "specimen_id": specimen_id,
        "accession": accession or None,
        "source": source,
        "status": CaseStatus.RECEIVING,
        "received_at": utcnow(),
        "tiles_expected": tiles_expected,
        "tiles_received": 0,
        **(model.columns() if model else {}),
        "research_use_only": 1,
    }


def _finished_fields(result: TriageResult) -> dict:
    """The call, from the typed result (its patch list is counted here, never turned into dicts)."""
    return {
        "status": CaseStatus.CANNOT_CALL if result.verdict == Verdict.CANNOT_CALL else CaseStatus.DONE,
        "finished_at": utcnow(),
        "verdict": result.verdict,
        "score": result.score,
        "threshold": result.threshold,
        "reasons": json.dumps([asdict(r) for r in result.reasons]),
        "warnings": json.dumps([asdict(w) for w in result.warnings]),
        "patch_threshold": result.patch_threshold,
        "case_rule": result.case_rule,
        "early_rule": result.early_rule,
        "early_threshold": result.early_threshold,
        "early_score": result.early_score,
        "threshold_source": result.threshold_source,
        "site_accepted_at": result.site_accepted_at,
        "site_report_sha256": result.site_report_sha256,
        "measures": json.dumps(result.measures),
        "patches_scored": len(result.patches),
        "early_positive": int(result.early_positive),
        "early_positive_after_tiles": result.early_positive_after_tiles,
        "timings_ms": json.dumps(result.timings_ms),
        **result.model.columns(),
    }


def _failed_fields(message: str) -> dict:
    return {"status": CaseStatus.FAILED, "finished_at": utcnow(),
            "reasons": json.dumps([{"code": ReasonCode.FAILED, "message": message}])}
