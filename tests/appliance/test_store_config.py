"""The case store on a real SQLite file, and the settings object."""

import sqlite3
import threading

import pytest

from appliance.config import ConfigError, load_settings
from appliance.spool import TileSpool
from appliance.errors import StoreError
from appliance.store import CaseStore


def test_store_uses_wal_full_sync_and_migrations(tmp_path):
    store = CaseStore(tmp_path / "a.db")
    store.case_started("C1", specimen_id="S1", tiles_expected=2, model={"name": "m", "version": "1",
                                                                          "sha256": "ab", "backend": "openvino"})
    store.close()
    conn = sqlite3.connect(tmp_path / "a.db")
    assert conn.execute("pragma journal_mode").fetchone()[0] == "wal"
    names = [r[0] for r in conn.execute("select name from _sqlite_migrations")]
    assert names == ["0001_cases_and_tiles"]
    # the writer sets synchronous=FULL on its own connection; check it is what the store opens with
    from appliance.store import _connect

    assert _connect(tmp_path / "a.db").execute("pragma synchronous").fetchone()[0] == 2  # FULL


def test_concurrent_writers_are_serialised_through_one_thread(tmp_path):
    store = CaseStore(tmp_path / "a.db")
    store.case_started("C1")
    threads = [threading.Thread(target=lambda i=i: store.tile_stored("C1", i, i * 50, 0, 50, 50, f"{i:064x}"))
               for i in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(store.tiles("C1")) == 40
    assert store.get_case("C1")["tiles_received"] == 40
    store.close()


def test_store_errors_are_named(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a dir")
    with pytest.raises(StoreError, match="cannot open the case database"):
        CaseStore(blocker / "a.db")


def test_spool_writes_are_atomic_and_refuse_unsafe_case_ids(tmp_path):
    import numpy as np

    spool = TileSpool(tmp_path)
    spool.begin_case("C-1", {"a": 1})
    px = np.arange(50 * 50 * 3, dtype=np.uint8).reshape(50, 50, 3)
    sha = spool.store_tile("C-1", 0, 0, 0, px)
    assert len(sha) == 64
    (path,) = spool.tiles("C-1")
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
