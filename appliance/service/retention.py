"""Retention of case files (spool tiles and output files) by age and by total size.

Only finished cases are ever removed, and only signed-off ones unless ``retention_unsigned`` is set.
The case's row in SQLite (verdict, reasons, model, audit trail) is kept; a ``purged`` event records what
went and why. Oldest finished cases go first.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

from appliance.config import Settings
from appliance.store.database import CaseStore
from appliance.terms import FINISHED_STATUSES, EventKind

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Purge:
    case_id: str
    reason: str
    bytes: int


def folder_bytes(path: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_size
            except OSError:
                pass
    return total


def case_folders(settings: Settings, case_id: str) -> list[Path]:
    return [p for p in (settings.spool_dir / case_id, settings.cases_dir / case_id) if p.exists()]


def plan(store: CaseStore, settings: Settings, now: datetime | None = None) -> list[Purge]:
    """Which cases' files to remove now, and why (nothing when no limit is configured)."""
    if settings.retention_days is None and settings.retention_max_gb is None:
        return []
    now = now or datetime.now(timezone.utc)
    cases = [c for c in store.list_cases(limit=1_000_000) if c["status"] in FINISHED_STATUSES and c.get("finished_at")]
    cases = [c for c in cases if c.get("signed_off_at") or settings.retention_unsigned]
    cases.sort(key=lambda c: c["finished_at"])
    sizes = {c["id"]: sum(folder_bytes(p) for p in case_folders(settings, c["id"])) for c in cases}
    out: list[Purge] = []
    chosen = set()
    if settings.retention_days is not None:
        cutoff = now - timedelta(days=settings.retention_days)
        for c in cases:
            if sizes[c["id"]] and datetime.fromisoformat(c["finished_at"]) < cutoff:
                out.append(Purge(c["id"], f"older than {settings.retention_days:g} days", sizes[c["id"]]))
                chosen.add(c["id"])
    if settings.retention_max_gb is not None:
        limit = settings.retention_max_gb * 1e9
        total = folder_bytes(settings.spool_dir) + folder_bytes(settings.cases_dir)
        total -= sum(p.bytes for p in out)
        for c in cases:
            if total <= limit:
                break
            if c["id"] in chosen or not sizes[c["id"]]:
                continue
            out.append(Purge(c["id"], f"case files above {settings.retention_max_gb:g} GB in total", sizes[c["id"]]))
            total -= sizes[c["id"]]
    return out


def apply(store: CaseStore, settings: Settings, now: datetime | None = None) -> list[Purge]:
    """Remove the planned cases' spool and output folders. A removal is recorded as ``purged`` only when
    its folders are really gone; otherwise ``purge-failed`` says what is left and why (the next run tries
    again). Returns the cases whose files are gone."""
    done = []
    for p in plan(store, settings, now):
        errors: list[str] = []
        for folder in case_folders(settings, p.case_id):
            shutil.rmtree(folder, onerror=lambda _fn, path, info: errors.append(f"{path}: {info[1]}"))
        left = [str(f) for f in case_folders(settings, p.case_id)]
        if left:
            log.error("retention could not remove the files of case %s: %s", p.case_id, "; ".join(errors or left))
            store.event(EventKind.PURGE_FAILED, case_id=p.case_id, detail={"reason": p.reason, "left": left,
                                                                          "errors": errors})
            continue
        store.event(EventKind.PURGED, case_id=p.case_id, detail={"reason": p.reason, "bytes": p.bytes})
        done.append(p)
    return done
