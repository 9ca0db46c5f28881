"""The case store's reviewers: who may log in to the viewer (a password hash, never the password), audited."""

from __future__ import annotations

import sqlite_utils

from appliance.errors import UserNotFoundError
from appliance.store.records import audit, utcnow


class ReviewerRecords:
    """Part of CaseStore (its writer and reads): the reviewers."""

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
            audit(db, at, by, via, "user-added" if new else "user-password", None, {"user": name})
            return new

        return self.write(_write)

    def disable_user(self, name: str, *, by: str, via: str = "cli") -> None:
        """A reviewer can no longer log in (kept: the audit names them). Raises UserNotFoundError."""
        at = utcnow()

        def _write(db: sqlite_utils.Database) -> None:
            if not list(db["users"].rows_where("name = ?", [name])):
                raise UserNotFoundError(f"no reviewer named {name!r}")
            db["users"].update(name, {"disabled_at": at})
            audit(db, at, by, via, "user-disabled", None, {"user": name})

        self.write(_write)

    def user(self, name: str) -> dict | None:
        rows = self._rows("users", "name = ?", [name], "name")
        return rows[0] if rows else None

    def users(self) -> list[dict]:
        return [{k: v for k, v in r.items() if k != "password_hash"} for r in self._rows("users", None, [], "name")]
