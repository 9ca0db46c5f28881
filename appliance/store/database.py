"""The case log in SQLite: one writer thread owns the only write connection; readers open their own.

Durability is chosen on purpose: WAL so readers (API, TUI) never block the writer, and
``synchronous=FULL`` so a committed case row survives power loss, not just a process crash.
"""

from __future__ import annotations

import hashlib
import json
import queue
import sqlite3
import threading
from concurrent.futures import Future
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable

import sqlite_utils

from appliance.errors import CaseNotFoundError, CaseStateError, StoreError, UserNotFoundError
from appliance.pipeline.result import TriageResult
from appliance.store.migrations import migrations
from appliance.terms import OPEN_STATUSES, CaseStatus, DeliveryStatus, Verdict

def utcnow() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


_JSON_COLUMNS = ("reasons", "warnings", "timings_ms", "measures", "report")


def _decode_row(row: dict) -> dict:
    out = dict(row)
    for col in _JSON_COLUMNS:
        if out.get(col):
            out[col] = json.loads(out[col])
    for col in ("early_positive", "research_use_only"):
        if out.get(col) is not None:
            out[col] = bool(out[col])
    return out


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, check_same_thread=False, timeout=10)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA foreign_keys=ON")
    return conn


class CaseStore:
    """Writes go through ``submit`` to the single writer thread; reads use short-lived connections."""

    def __init__(self, path: Path, destinations: Iterable[str] = ()):
        """``destinations`` (``mllp:host:port``, ``fhir:<base url>``): where each call is to be delivered; a
        delivery row per destination is written in the same transaction as the call."""
        self.path = Path(path)
        self.destinations = list(destinations)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite_utils.Database(_connect(self.path))
            migrations.apply(self._db)
        except (sqlite3.Error, OSError) as exc:
            raise StoreError(f"cannot open the case database {self.path}: {exc}") from None
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

    # -- case lifecycle -------------------------------------------------------------------------------
    def case_started(self, case_id: str, *, specimen_id: str = "", source: str = "", tiles_expected: int | None = None,
                     model: dict | None = None) -> None:
        model = model or {}
        row = {
            "id": case_id,
            "specimen_id": specimen_id,
            "source": source,
            "status": CaseStatus.RECEIVING,
            "received_at": utcnow(),
            "tiles_expected": tiles_expected,
            "tiles_received": 0,
            "model_name": model.get("name"),
            "model_version": model.get("version"),
            "model_sha256": model.get("sha256"),
            "engine": model.get("backend"),
            "research_use_only": 1,
        }
        self.write(lambda db: db["cases"].upsert(row, pk="id"))

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
        """The call, from the typed result (its patch list is counted here, never turned into dicts)."""
        model = result.model
        fields = {
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
            "model_name": model["name"],
            "model_version": model["version"],
            "model_sha256": model["sha256"],
            "engine": model["backend"],
        }

        def _write(db: sqlite_utils.Database) -> None:
            db["cases"].update(case_id, fields)
            self._queue_deliveries(db, case_id, fields["finished_at"])

        self.write(_write)

    def case_abandoned(self, case_id: str, message: str) -> None:
        fields = {"status": CaseStatus.ABANDONED, "finished_at": utcnow(),
                  "reasons": json.dumps([{"code": "abandoned", "message": message}])}
        self.write(lambda db: db["cases"].update(case_id, fields))

    def case_failed(self, case_id: str, message: str) -> None:
        fields = {"status": CaseStatus.FAILED, "finished_at": utcnow(),
                  "reasons": json.dumps([{"code": "failed", "message": message}])}
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
            _audit(db, at, by, via, "sign-off", case_id, {"comment": comment})
            self._queue_deliveries(db, case_id, at)
            return {"case_id": case_id, "signed_off_by": by, "signed_off_at": at}

        return self.write(_write)

    # -- the site operating point -------------------------------------------------------------------
    def accept_site_point(self, point: dict, *, by: str, via: str) -> dict:
        """Put a site operating point in force (``point``: the site_points columns from model_sha256 to
        report), ending the one in force if any; audited, and an event. Returns the stored row."""
        at = utcnow()

        def _write(db: sqlite_utils.Database) -> dict:
            db.execute("update site_points set ended_at = ?, ended_by = ?, ended_why = 'replaced' "
                       "where ended_at is null", [at, by])
            row = dict(point, report=json.dumps(point["report"]), accepted_at=at, accepted_by=by, accepted_via=via)
            pk = db["site_points"].insert(row).last_pk
            detail = {"site_point": pk, "threshold": point["threshold"], "report_sha256": point["report_sha256"],
                      "model_sha256": point["model_sha256"]}
            _audit(db, at, by, via, "site-accept", None, detail)
            db["events"].insert({"at": at, "case_id": None, "kind": "site-accepted",
                                 "detail": json.dumps(detail | {"by": by, "via": via})})
            return _decode_row(next(db["site_points"].rows_where("id = ?", [pk])))

        return self.write(_write)

    def reset_site_point(self, *, by: str, via: str) -> dict:
        """End the site operating point in force (the model's threshold decides again); audited, and an event.
        Raises CaseStateError when none is in force."""
        at = utcnow()

        def _write(db: sqlite_utils.Database) -> dict:
            rows = list(db["site_points"].rows_where("ended_at is null"))
            if not rows:
                raise CaseStateError("no site operating point is in force; the model's threshold already decides")
            db["site_points"].update(rows[0]["id"], {"ended_at": at, "ended_by": by, "ended_why": "reset"})
            detail = {"site_point": rows[0]["id"], "threshold": rows[0]["threshold"]}
            _audit(db, at, by, via, "site-reset", None, detail)
            db["events"].insert({"at": at, "case_id": None, "kind": "site-reset",
                                 "detail": json.dumps(detail | {"by": by, "via": via})})
            return _decode_row(next(db["site_points"].rows_where("id = ?", [rows[0]["id"]])))

        return self.write(_write)

    def site_point(self) -> dict | None:
        """The site operating point in force, or None."""
        rows = self._rows("site_points", "ended_at is null", [], "id desc", limit=1)
        return _decode_row(rows[0]) if rows else None

    def site_points(self) -> list[dict]:
        """Every site operating point ever accepted, newest first (ended ones say when, by whom and why)."""
        return [_decode_row(r) for r in self._rows("site_points", None, [], "id desc")]

    def recent_cases(self, limit: int) -> list[dict]:
        """The last ``limit`` finished cases (called or cannot-call), newest first, for the drift watch."""
        db = self._reader()
        try:
            rows = db["cases"].rows_where("status in (?, ?)", [CaseStatus.DONE, CaseStatus.CANNOT_CALL],
                                          order_by="finished_at desc, id desc", limit=limit)
            return [_decode_row(r) for r in rows]
        finally:
            db.conn.close()

    # -- the outbox ----------------------------------------------------------------------------------
    def _queue_deliveries(self, db: sqlite_utils.Database, case_id: str, at: str) -> None:
        """A new revision of the case, and one pending delivery of it per destination (inside the caller's
        transaction). A message that cannot be built is a failed delivery with the reason, never a lost call."""
        if not self.destinations:
            return
        from appliance.lis.messages import fhir_report, hl7_oru, message_id

        row = next(db["cases"].rows_where("id = ?", [case_id]))
        revision = (row.get("revision") or 0) + 1
        db["cases"].update(case_id, {"revision": revision})
        row["revision"] = revision
        mid = message_id(case_id, revision)
        for dest in self.destinations:
            kind = "hl7" if dest.startswith("mllp:") else "fhir"
            status, payload, error = DeliveryStatus.PENDING, None, None
            try:
                payload = hl7_oru(row, revision, at) if kind == "hl7" else json.dumps(fhir_report(row, revision, at))
            except Exception as exc:  # noqa: BLE001 - a message that cannot be built must not lose the call
                status, error = DeliveryStatus.FAILED, f"the message could not be built: {exc}"
            db["deliveries"].insert({
                "id": f"{mid}.{hashlib.sha256(dest.encode()).hexdigest()[:10]}", "case_id": case_id, "revision": revision, "message_id": mid,
                "destination": dest, "kind": kind, "payload": payload, "status": status, "attempts": 0,
                "next_attempt_at": at, "last_error": error, "created_at": at, "delivered_at": None,
            }, replace=True)

    def due_deliveries(self, now: str, destination: str, limit: int = 20) -> list[dict]:
        """Pending messages to ``destination`` whose time has come, oldest first."""
        return self._rows("deliveries", "destination = ? and status = ? and next_attempt_at <= ?",
                          [destination, DeliveryStatus.PENDING, now], "next_attempt_at, id", limit=limit)

    def deliveries(self, case_id: str | None = None) -> list[dict]:
        where, args = ("case_id = ?", [case_id]) if case_id else (None, [])
        return self._rows("deliveries", where, args, "created_at, id")

    def delivery_counts(self) -> dict[str, int]:
        db = self._reader()
        try:
            rows = db.execute("select status, count(*) from deliveries group by status").fetchall()
        finally:
            db.conn.close()
        counts = {s.value: 0 for s in DeliveryStatus}
        counts.update({status: n for status, n in rows})
        return counts

    def delivery_attempted(self, delivery_id: str, status: DeliveryStatus, *, error: str | None = None,
                           next_attempt_at: str | None = None) -> None:
        """The outcome of one attempt: delivered, failed (rejected: no more tries), or pending again."""
        def _write(db: sqlite_utils.Database) -> None:
            db.execute("update deliveries set attempts = attempts + 1, status = ?, last_error = ?, "
                       "next_attempt_at = coalesce(?, next_attempt_at), delivered_at = ? where id = ?",
                       [status, error, next_attempt_at, utcnow() if status == DeliveryStatus.DELIVERED else None,
                        delivery_id])

        self.write(_write)

    def retry_delivery(self, delivery_id: str, *, by: str, via: str = "api") -> dict:
        """Queue a failed delivery again (the same message), and audit it. Raises CaseNotFoundError for an
        unknown id, CaseStateError when it is not failed."""
        at = utcnow()

        def _write(db: sqlite_utils.Database) -> dict:
            rows = list(db["deliveries"].rows_where("id = ?", [delivery_id]))
            if not rows:
                raise CaseNotFoundError(f"no delivery {delivery_id!r}")
            if rows[0]["status"] != DeliveryStatus.FAILED or rows[0]["payload"] is None:
                raise CaseStateError(f"delivery {delivery_id!r} is {rows[0]['status']}; only a failed message "
                                     f"can be queued again")
            db["deliveries"].update(delivery_id, {"status": DeliveryStatus.PENDING, "next_attempt_at": at})
            _audit(db, at, by, via, "delivery-retry", rows[0]["case_id"], {"delivery": delivery_id})
            return {"delivery_id": delivery_id, "status": DeliveryStatus.PENDING}

        return self.write(_write)

    # ------------------------------------------------------------------------------------- reviewers
    def set_user(self, name: str, password_hash: str, *, by: str, via: str = "cli") -> bool:
        """Add a reviewer, or give one a new password (enabling it again); audited. True if it is new."""
        at = utcnow()

        def _write(db: sqlite_utils.Database) -> bool:
            new = not list(db["users"].rows_where("name = ?", [name]))
            if new:
                db["users"].insert({"name": name, "password_hash": password_hash, "created_at": at, "changed_at": at,
                                    "disabled_at": None})
            else:
                db["users"].update(name, {"password_hash": password_hash, "changed_at": at, "disabled_at": None})
            _audit(db, at, by, via, "user-added" if new else "user-password", None, {"user": name})
            return new

        return self.write(_write)

    def disable_user(self, name: str, *, by: str, via: str = "cli") -> None:
        """A reviewer can no longer log in (kept: the audit names them). Raises UserNotFoundError."""
        at = utcnow()

        def _write(db: sqlite_utils.Database) -> None:
            if not list(db["users"].rows_where("name = ?", [name])):
                raise UserNotFoundError(f"no reviewer named {name!r}")
            db["users"].update(name, {"disabled_at": at})
            _audit(db, at, by, via, "user-disabled", None, {"user": name})

        self.write(_write)

    def user(self, name: str) -> dict | None:
        rows = self._rows("users", "name = ?", [name], "name")
        return rows[0] if rows else None

    def users(self) -> list[dict]:
        return [{k: v for k, v in r.items() if k != "password_hash"} for r in self._rows("users", None, [], "name")]

    def audit(self, actor: str, action: str, *, case_id: str | None = None, detail: dict | None = None,
              via: str = "api") -> None:
        self.write(lambda db: _audit(db, utcnow(), actor, via, action, case_id, detail or {}))

    def event(self, kind: str, *, case_id: str | None = None, detail: dict | None = None) -> None:
        """A lifecycle event or error, kept for the case's history (committed before this returns, so the
        history never lags what the scanner or a client was told)."""
        row = {"at": utcnow(), "case_id": case_id, "kind": kind, "detail": json.dumps(detail or {}, default=str)}
        self.write(lambda db: db["events"].insert(row))

    def model_seen(self, model: dict) -> None:
        at = utcnow()

        def _write(db: sqlite_utils.Database) -> None:
            sha = model["sha256"]
            if db["models"].count_where("sha256 = ?", [sha]):
                db["models"].update(sha, {"last_seen": at})
            else:
                db["models"].insert({"sha256": sha, "name": model["name"], "version": model["version"],
                                     "backend": model.get("backend"), "first_seen": at, "last_seen": at})

        self.write(_write)

    # -- reads ----------------------------------------------------------------------------------------
    def counts(self) -> dict:
        """Totals for /metrics: tiles stored, and cases by verdict (status while unfinished)."""
        db = self._reader()
        try:
            tiles = db.execute("select count(*) from tiles").fetchone()[0]
            rows = db.execute("select coalesce(verdict, status), count(*) from cases group by 1").fetchall()
            return {"tiles": tiles, "by_verdict": {k: v for k, v in rows}}
        finally:
            db.conn.close()

    def open_cases(self) -> list[dict]:
        """Cases a previous run left receiving or processing (to resume after a crash), oldest first."""
        db = self._reader()
        try:
            rows = db["cases"].rows_where(f"status in ({', '.join('?' * len(OPEN_STATUSES))})", list(OPEN_STATUSES),
                                          order_by="received_at")
            return [_decode_row(r) for r in rows]
        finally:
            db.conn.close()

    def called_cases(self, latest: int | None = None) -> list[dict]:
        """id and tiles_received of the cases that got a call (done or cannot-call), oldest first; only the
        ``latest`` ones, if given."""
        db = self._reader()
        try:
            rows = db.execute("select id, tiles_received from cases where status in (?, ?) order by received_at desc"
                              + (f" limit {int(latest)}" if latest is not None else ""),
                              [CaseStatus.DONE, CaseStatus.CANNOT_CALL]).fetchall()
            return [{"id": r[0], "tiles_received": r[1]} for r in reversed(rows)]
        finally:
            db.conn.close()

    def events(self, case_id: str | None = None) -> list[dict]:
        return self._rows("events", "case_id = ?" if case_id else None, [case_id] if case_id else [], "id")

    def audit_log(self, case_id: str | None = None) -> list[dict]:
        return self._rows("audit", "case_id = ?" if case_id else None, [case_id] if case_id else [], "id")

    def models(self) -> list[dict]:
        return self._rows("models", None, [], "first_seen")

    def _rows(self, table: str, where: str | None, args: list, order: str, limit: int | None = None) -> list[dict]:
        db = self._reader()
        try:
            rows = db[table].rows_where(where, args, order_by=order, limit=limit)
            return [dict(r, detail=json.loads(r["detail"])) if "detail" in r else dict(r) for r in rows]
        finally:
            db.conn.close()

    def _reader(self) -> sqlite_utils.Database:
        conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=10)
        return sqlite_utils.Database(conn)

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
        db = self._reader()
        try:
            rows = db["cases"].rows_where(" and ".join(where) or None, args, order_by="received_at desc",
                                          limit=limit, offset=offset)
            return [_decode_row(r) for r in rows]
        finally:
            db.conn.close()

    def get_case(self, case_id: str) -> dict | None:
        db = self._reader()
        try:
            rows = list(db["cases"].rows_where("id = ?", [case_id]))
            return _decode_row(rows[0]) if rows else None
        finally:
            db.conn.close()

    def tiles(self, case_id: str) -> list[dict]:
        db = self._reader()
        try:
            return list(db["tiles"].rows_where("case_id = ?", [case_id], order_by="idx"))
        finally:
            db.conn.close()


def _audit(db: sqlite_utils.Database, at: str, actor: str, via: str, action: str, case_id: str | None,
           detail: dict) -> None:
    db["audit"].insert({"at": at, "actor": actor, "via": via, "action": action, "case_id": case_id,
                        "detail": json.dumps(detail, default=str)})

