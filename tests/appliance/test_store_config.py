"""The case store on a real SQLite file, and the settings object."""

import hashlib
import sqlite3
import threading

import pytest

from appliance.config import load_settings
from appliance.errors import ConfigError
from appliance.model.ref import ModelRef
from appliance.store.spool import TileSpool
from appliance.errors import StoreError
from tests.stores import open_store


def test_store_uses_wal_full_sync_and_migrations(tmp_path):
    store = open_store(tmp_path / "a.db")
    store.case_started("C1", specimen_id="S1", tiles_expected=2, model=ModelRef("m", "1", "ab", "openvino"))
    # the writer commits on its own connection, with synchronous=FULL
    assert store.write(lambda db: db.execute("pragma synchronous").fetchone()[0]) == 2  # FULL
    store.close()
    conn = sqlite3.connect(tmp_path / "a.db")
    assert conn.execute("pragma journal_mode").fetchone()[0] == "wal"
    names = [r[0] for r in conn.execute("select name from _sqlite_migrations")]
    assert names == ["0001_cases_and_tiles", "0002_events_audit_models_signoff", "0003_warnings_patch_threshold",
                     "0004_case_rule", "0005_revision_and_deliveries", "0006_early_rule",
                     "0007_site_operating_point", "0008_users", "0009_accession"]


def test_concurrent_writers_are_serialised_through_one_thread(store):
    store.case_started("C1")
    threads = [threading.Thread(target=lambda i=i: store.tile_stored("C1", i, i * 50, 0, 50, 50, f"{i:064x}"))
               for i in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(store.tiles("C1")) == 40
    assert store.get_case("C1")["tiles_received"] == 40


def test_store_errors_are_named(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a dir")
    with pytest.raises(StoreError, match="cannot open the case database"):
        open_store(blocker / "a.db")


def test_spool_writes_are_atomic_and_refuse_unsafe_case_ids(tmp_path):
    import numpy as np

    spool = TileSpool(tmp_path)
    spool.begin_case("C-1", {"a": 1})
    px = np.arange(50 * 50 * 3, dtype=np.uint8).reshape(50, 50, 3)
    stored, sha = spool.store_tile("C-1", 0, 0, 0, px)
    assert sha == hashlib.sha256(px.tobytes()).hexdigest()
    (path,) = spool.tiles("C-1")
    assert path == stored
    # a digest the link already computed is kept, not computed again
    assert spool.store_tile("C-1", 1, 50, 0, px, sha256="f" * 64)[1] == "f" * 64
    assert np.array_equal(np.load(path), px)
    assert not list((tmp_path / "C-1").glob(".*tmp"))
    with pytest.raises(StoreError, match="not allowed"):
        spool.begin_case("../escape", {})


def test_settings_reject_unknown_keys(tmp_path, monkeypatch):
    f = tmp_path / "a.toml"
    f.write_text('api_port = 9001\nserial_prot = "/dev/ttyACM0"\n')
    with pytest.raises(ConfigError, match="serial_prot"):
        load_settings(f)
    f.write_text("api_port = 9001\n")
    assert load_settings(f).api_port == 9001
    monkeypatch.setenv("APPLIANCE_API_PORT", "9002")
    assert load_settings(f).api_port == 9002  # environment beats the file
    monkeypatch.setenv("APPLIANCE_API_PROT", "1")
    with pytest.raises(ConfigError, match="APPLIANCE_API_PROT"):
        load_settings(f)


def _documented_schema() -> dict[str, list[str]]:
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "appliance" / "store" / "SCHEMA.md").read_text()
    tables: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        if m := re.match(r"^## (\w+)", line):
            current = m.group(1)
            tables[current] = []
        elif current and line.startswith("| ") and not line.startswith("| column") and not line.startswith("|---"):
            tables[current].append(line.split("|")[1].strip())
    return tables


def test_migrations_build_the_documented_schema_on_an_empty_database(tmp_path):
    import sqlite_utils

    store = open_store(tmp_path / "new.db")
    store.close()
    db = sqlite_utils.Database(tmp_path / "new.db")
    documented = _documented_schema()
    actual = {t: [c.name for c in db[t].columns] for t in db.table_names() if not t.startswith("_")}
    assert actual == documented
    applied = [r["name"] for r in db["_sqlite_migrations"].rows]
    assert applied == ["0001_cases_and_tiles", "0002_events_audit_models_signoff", "0003_warnings_patch_threshold",
                       "0004_case_rule", "0005_revision_and_deliveries", "0006_early_rule",
                     "0007_site_operating_point", "0008_users", "0009_accession"]
    assert db.execute("pragma journal_mode").fetchone()[0] == "wal"


def test_migrations_upgrade_a_database_made_by_the_previous_schema_and_keep_its_cases(tmp_path):
    import sqlite_utils
    from sqlite_utils.migrations import Migrations

    from appliance.store import migrations as store_mod

    old = Migrations("appliance")  # the schema as released with migration 0001 only
    old(name="0001_cases_and_tiles")(store_mod._initial)
    db = sqlite_utils.Database(tmp_path / "old.db")
    old.apply(db)
    db["cases"].insert({"id": "OLD-1", "status": "done", "verdict": "benign-appearing", "score": 0.1,
                        "research_use_only": 1})
    db["tiles"].insert({"case_id": "OLD-1", "idx": 0, "x": 0, "y": 0, "w": 10, "h": 10, "sha256": "ab"})
    db.conn.close()

    store = open_store(tmp_path / "old.db")
    try:
        case = store.get_case("OLD-1")
        assert case["verdict"] == "benign-appearing" and case["signed_off_by"] is None
        assert store.tiles("OLD-1")[0]["sha256"] == "ab"
        store.sign_off("OLD-1", by="JS", comment="agree")
        assert store.get_case("OLD-1")["signed_off_by"] == "JS"
        assert [a["action"] for a in store.audit_log("OLD-1")] == ["sign-off"]
    finally:
        store.close()
    db = sqlite_utils.Database(tmp_path / "old.db")
    assert {t: [c.name for c in db[t].columns] for t in db.table_names() if not t.startswith("_")} \
        == _documented_schema()


def test_sign_off_is_refused_while_a_case_is_running_and_for_unknown_cases(store):
    store.case_started("C-1", specimen_id="S")
    with pytest.raises(StoreError, match="still receiving"):
        store.sign_off("C-1", by="AB")
    with pytest.raises(StoreError, match="no case"):
        store.sign_off("nope", by="AB")
    assert store.audit_log() == []


def test_eta_comes_from_the_case_own_processing_rate():
    from appliance.service.cases import CaseProgress, eta_seconds

    p = CaseProgress("C", "S", tiles_expected=100, started=10.0)
    assert eta_seconds(p, 20.0) is None  # nothing processed yet: no rate to go on
    p.tiles_processed = 25
    assert eta_seconds(p, 20.0) == 30.0  # 2.5 tiles/s, 75 to go
    p.tiles_expected = None
    assert eta_seconds(p, 20.0) is None  # the scanner did not say how many
