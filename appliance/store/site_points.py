"""The case store's record of the site operating points: each accepted (and each ended) with who, when,
through what and the report it rests on; and the recent calls the drift watch re-judges."""

from __future__ import annotations

import json

import sqlite_utils

from appliance.errors import CaseStateError
from appliance.store.records import audit, decode_row, utcnow
from appliance.terms import CaseStatus, EventKind


class SitePointRecords:
    """Part of CaseStore (its writer and reads): the site operating points."""

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
            audit(db, at, by, via, "site-accept", None, detail)
            db["events"].insert({"at": at, "case_id": None, "kind": EventKind.SITE_ACCEPTED,
                                 "detail": json.dumps(detail | {"by": by, "via": via})})
            return decode_row(next(db["site_points"].rows_where("id = ?", [pk])))

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
            audit(db, at, by, via, "site-reset", None, detail)
            db["events"].insert({"at": at, "case_id": None, "kind": EventKind.SITE_RESET,
                                 "detail": json.dumps(detail | {"by": by, "via": via})})
            return decode_row(next(db["site_points"].rows_where("id = ?", [rows[0]["id"]])))

        return self.write(_write)

    def site_point(self) -> dict | None:
        """The site operating point in force, or None."""
        rows = self._rows("site_points", "ended_at is null", [], "id desc", limit=1)
        return decode_row(rows[0]) if rows else None

    def site_points(self) -> list[dict]:
        """Every site operating point ever accepted, newest first (ended ones say when, by whom and why)."""
        return [decode_row(r) for r in self._rows("site_points", None, [], "id desc")]

    def recent_cases(self, limit: int) -> list[dict]:
        """The last ``limit`` finished cases (called or cannot-call), newest first, for the drift watch."""
        with self._reading() as db:
            rows = db["cases"].rows_where("status in (?, ?)", [CaseStatus.DONE, CaseStatus.CANNOT_CALL],
                                          order_by="finished_at desc, id desc", limit=limit)
            return [decode_row(r) for r in rows]
