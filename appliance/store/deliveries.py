"""The case store's outbox rows: one per (message, destination), written in the transaction that records
or signs off a call, by the outbox the store was given (appliance.lis.outbox.Outbox; the store knows no HL7
or FHIR), then marked by the sender's attempts."""

from __future__ import annotations

import sqlite_utils

from appliance.errors import CaseNotFoundError, CaseStateError
from appliance.store.records import audit, decode_row, utcnow
from appliance.terms import DeliveryStatus


class DeliveryRecords:
    """Part of CaseStore (its writer and reads): the deliveries."""

    def _queue_deliveries(self, db: sqlite_utils.Database, case_id: str, at: str) -> None:
        """A new revision of the case, and the outbox's delivery rows for it (inside the caller's transaction,
        so the call and its deliveries commit together)."""
        if not self.outbox:
            return
        row = decode_row(next(db["cases"].rows_where("id = ?", [case_id])))
        revision = (row.get("revision") or 0) + 1
        db["cases"].update(case_id, {"revision": revision})
        for delivery in self.outbox.deliveries(dict(row, revision=revision), revision, at):
            db["deliveries"].insert(delivery, replace=True)

    def due_deliveries(self, now: str, destination: str, limit: int = 20) -> list[dict]:
        """Pending messages to ``destination`` whose time has come, oldest first."""
        return self._rows("deliveries", "destination = ? and status = ? and next_attempt_at <= ?",
                          [destination, DeliveryStatus.PENDING, now], "next_attempt_at, id", limit=limit)

    def deliveries(self, case_id: str | None = None) -> list[dict]:
        where, args = ("case_id = ?", [case_id]) if case_id else (None, [])
        return self._rows("deliveries", where, args, "created_at, id")

    def deliveries_of(self, case_ids: list[str]) -> dict[str, list[dict]]:
        """The deliveries of each of ``case_ids`` without their payloads, in one query (a page of cases)."""
        out: dict[str, list[dict]] = {case_id: [] for case_id in case_ids}
        if not case_ids:
            return out
        with self._reading() as db:
            rows = db["deliveries"].rows_where(f"case_id in ({', '.join('?' * len(case_ids))})", list(case_ids),
                                               select=", ".join(c for c in db["deliveries"].columns_dict
                                                                if c != "payload"),
                                               order_by="created_at, id")
            for row in rows:
                out[row["case_id"]].append(row)
        return out

    def delivery_counts(self) -> dict[str, int]:
        with self._reading() as db:
            rows = db.execute("select status, count(*) from deliveries group by status").fetchall()
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
            audit(db, at, by, via, "delivery-retry", rows[0]["case_id"], {"delivery": delivery_id})
            return {"delivery_id": delivery_id, "status": DeliveryStatus.PENDING}

        return self.write(_write)
