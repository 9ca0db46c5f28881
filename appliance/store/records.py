"""What every part of the case store shares: the clock its rows carry, how a row's JSON columns are read
back, and the audit row; and the read connections (a small pool, so a page of cases is not hundreds of
connections)."""

from __future__ import annotations

import json
import queue
import sqlite3
import threading
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

import sqlite_utils

_JSON_COLUMNS = ("reasons", "warnings", "timings_ms", "measures", "report")

READERS = 4  # read connections kept open: the API's threads, the TUI's polls and the daemon's own reads


def utcnow() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def decode_row(row: dict) -> dict:
    """A row with its JSON columns parsed and its 0/1 flags as booleans."""
    out = dict(row)
    for col in _JSON_COLUMNS:
        if out.get(col):
            out[col] = json.loads(out[col])
    for col in ("early_positive", "research_use_only"):
        if out.get(col) is not None:
            out[col] = bool(out[col])
    return out


def audit(db: sqlite_utils.Database, at: str, actor: str, via: str, action: str, case_id: str | None,
          detail: dict) -> None:
    """Who did what, when and through what (cli, api, viewer), inside the caller's transaction."""
    db["audit"].insert({"at": at, "actor": actor, "via": via, "action": action, "case_id": case_id,
                        "detail": json.dumps(detail, default=str)})


class ReadPool:
    """Up to ``size`` read-only connections, opened when first needed and kept; a reader borrows one for the
    length of its read and gives it back (as datasette keeps its read connections). A reader that finds all
    of them borrowed waits for one: reads are short."""

    def __init__(self, path: Path, size: int = READERS):
        self.path, self.size = path, size
        self._idle: queue.LifoQueue[sqlite3.Connection] = queue.LifoQueue()
        self._count = 0  # connections opened for the pool
        self._lock = threading.Lock()
        self._closed = False

    @contextmanager
    def connection(self) -> Iterator[sqlite_utils.Database]:
        conn, pooled = self._borrow()
        try:
            yield sqlite_utils.Database(conn)
        finally:
            if pooled and not self._closed:
                if conn.in_transaction:  # a read left open would hold the WAL back from checkpointing
                    conn.rollback()
                self._idle.put(conn)
            else:
                conn.close()

    def _open(self) -> sqlite3.Connection:
        return sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=10, check_same_thread=False)

    def _borrow(self) -> tuple[sqlite3.Connection, bool]:
        """(a connection, whether it goes back to the pool). Once the pool is closed (the store closed), a read
        still works, on a connection of its own."""
        with self._lock:
            if self._closed:
                return self._open(), False
            try:
                return self._idle.get_nowait(), True
            except queue.Empty:
                pass
            if self._count < self.size:
                conn = self._open()
                self._count += 1
                return conn, True
        return self._idle.get(timeout=30), True

    def close(self) -> None:
        """Close the pooled connections (those borrowed right now close when given back)."""
        with self._lock:
            self._closed = True
            while True:
                try:
                    self._idle.get_nowait().close()
                except queue.Empty:
                    break
