"""GET /cases reads a page of cases on a handful of pooled connections, with one query for their deliveries:
before the pool it opened 501 SQLite connections for 500 cases (one per case for its deliveries)."""

import sqlite3

import httpx

from appliance.store.records import READERS
from tests.stores import open_store

CASES = 500


def _fill(store, n: int) -> None:
    """``n`` finished cases, each with one delivered message, written in one transaction by the store's writer."""
    cases = [{"id": f"R-{i:04d}", "specimen_id": f"S-{i}", "source": "test", "status": "done",
              "received_at": f"2026-12-01T00:{i // 60:02d}:{i % 60:02d}.000+00:00", "tiles_received": 3,
              "verdict": "benign-appearing", "score": 0.1, "research_use_only": 1} for i in range(n)]
    deliveries = [{"id": f"R-{i:04d}.r1.x", "case_id": f"R-{i:04d}", "revision": 1, "message_id": f"R-{i:04d}.r1",
                   "destination": "mllp:lis:2575", "kind": "hl7", "payload": "MSH|...", "status": "delivered",
                   "attempts": 1, "next_attempt_at": "", "last_error": None, "created_at": "", "delivered_at": ""}
                  for i in range(n)]

    def write(db):
        db["cases"].insert_all(cases)
        db["deliveries"].insert_all(deliveries)

    store.write(write)


def test_a_page_of_500_cases_opens_at_most_a_handful_of_connections(api, monkeypatch):
    store, url = api
    _fill(store, CASES)
    opened = []
    real_connect = sqlite3.connect

    def counting_connect(*args, **kwargs):
        opened.append(args[0] if args else kwargs.get("database"))
        return real_connect(*args, **kwargs)

    monkeypatch.setattr(sqlite3, "connect", counting_connect)
    for _ in range(3):  # the pool is kept: later pages open nothing new
        r = httpx.get(f"{url}/cases", params={"limit": CASES}, timeout=60)
        assert r.status_code == 200, r.text
        cases = r.json()["cases"]
        assert len(cases) == CASES
        assert all(len(c["deliveries"]) == 1 and c["deliveries"][0]["message_id"] == f"{c['id']}.r1" for c in cases)
        assert all("payload" not in c["deliveries"][0] for c in cases)
    assert len(opened) <= READERS, f"{len(opened)} connections for three pages of {CASES} cases"
    assert 0 < READERS <= 8


def test_reads_work_on_after_the_store_is_closed(tmp_path):
    """A read after close (a tool that read the store once the daemon stopped) still works, on its own
    connection, and leaves nothing open behind."""
    store = open_store(tmp_path / "a.db")
    _fill(store, 3)
    store.close()
    assert [c["id"] for c in store.list_cases(limit=10)] == ["R-0002", "R-0001", "R-0000"]
    assert store.deliveries_of(["R-0001"])["R-0001"][0]["status"] == "delivered"
