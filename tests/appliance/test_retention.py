"""Retention: by age and by total size, finished and signed-off cases only, oldest first; rows stay."""

from datetime import datetime, timedelta, timezone

from appliance.service import retention
from appliance.config import load_settings
from tests.conftest import MODEL_DIR
from tests.stores import open_store

NOW = datetime(2026, 11, 22, 12, 0, tzinfo=timezone.utc)


def make_case(store, settings, case_id, *, days_ago, status="done", signed=False, size=1000):
    store.case_started(case_id, specimen_id="S")
    finished = (NOW - timedelta(days=days_ago)).isoformat()
    store.write(lambda db: db["cases"].update(case_id, {"status": status, "finished_at": finished}))
    if signed:
        store.write(lambda db: db["cases"].update(case_id, {"signed_off_by": "AB", "signed_off_at": finished}))
    for root in (settings.spool_dir, settings.cases_dir):
        (root / case_id).mkdir(parents=True)
        (root / case_id / "f.bin").write_bytes(b"x" * size)


def test_retention_removes_old_signed_off_case_files_and_keeps_everything_else(tmp_path):
    s = load_settings(None, data_dir=tmp_path, model_dir=MODEL_DIR, retention_days=30)
    store = open_store(s.db_path)
    try:
        make_case(store, s, "OLD-SIGNED", days_ago=40, signed=True)
        make_case(store, s, "OLD-UNSIGNED", days_ago=40)
        make_case(store, s, "NEW-SIGNED", days_ago=5, signed=True)
        make_case(store, s, "OLD-RUNNING", days_ago=40, status="processing", signed=True)
        assert retention.plan(store, load_settings(None, data_dir=tmp_path, model_dir=MODEL_DIR), NOW) == []

        purged = retention.apply(store, s, NOW)
        assert [p.case_id for p in purged] == ["OLD-SIGNED"] and purged[0].bytes == 2000
        assert not (s.spool_dir / "OLD-SIGNED").exists() and not (s.cases_dir / "OLD-SIGNED").exists()
        for kept in ("OLD-UNSIGNED", "NEW-SIGNED", "OLD-RUNNING"):
            assert (s.spool_dir / kept / "f.bin").exists()
        assert store.get_case("OLD-SIGNED")["status"] == "done"  # the row and verdict stay
        store.close()
        store = open_store(s.db_path)
        assert [e["kind"] for e in store.events("OLD-SIGNED")] == ["purged"]

        unsigned = load_settings(None, data_dir=tmp_path, model_dir=MODEL_DIR, retention_days=30,
                                 retention_unsigned=True)
        assert [p.case_id for p in retention.plan(store, unsigned, NOW)] == ["OLD-UNSIGNED"]
    finally:
        store.close()


def test_retention_by_size_removes_oldest_finished_cases_first_until_under_the_limit(tmp_path):
    s = load_settings(None, data_dir=tmp_path, model_dir=MODEL_DIR, retention_max_gb=5e-6)  # 5,000 bytes
    store = open_store(s.db_path)
    try:
        for i, days in enumerate((3, 1, 2, 0)):
            make_case(store, s, f"C{i}", days_ago=days, signed=True, size=1000)  # 2,000 bytes each, 8,000 in all
        purged = retention.apply(store, s, NOW)
        assert [p.case_id for p in purged] == ["C0", "C2"]  # the two oldest, leaving 4,000 bytes
        assert retention.folder_bytes(s.spool_dir) + retention.folder_bytes(s.cases_dir) == 4000
        assert retention.plan(store, s, NOW) == []
    finally:
        store.close()



def _unremovable(path):
    """Make ``path`` (a file) impossible to delete for this process, at the file-system level; returns the undo."""
    import os
    import shutil
    import subprocess

    import pytest

    if os.geteuid() != 0:
        path.parent.chmod(0o500)
        return lambda: path.parent.chmod(0o700)
    if shutil.which("chattr") is None:
        pytest.skip("running as root without chattr: no way to make a file undeletable here")
    made = subprocess.run(["chattr", "+i", str(path)], capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"this file system has no immutable flag: {made.stderr.strip()}")
    return lambda: subprocess.run(["chattr", "-i", str(path)], check=True)


def test_a_purge_that_cannot_remove_the_files_is_not_recorded_as_done(tmp_path):
    s = load_settings(None, data_dir=tmp_path, model_dir=MODEL_DIR, retention_days=30)
    store = open_store(s.db_path)
    stuck = s.cases_dir / "OLD-STUCK" / "inner" / "g.bin"
    undo = None
    try:
        make_case(store, s, "OLD-STUCK", days_ago=40, signed=True)
        stuck.parent.mkdir()
        stuck.write_bytes(b"y")
        undo = _unremovable(stuck)
        assert retention.apply(store, s, NOW) == []
        assert stuck.exists() and not (s.spool_dir / "OLD-STUCK").exists()
        (event,) = store.events("OLD-STUCK")
        assert event["kind"] == "purge-failed" and event["detail"]["left"] == [str(s.cases_dir / "OLD-STUCK")]
        assert str(stuck) in " ".join(event["detail"]["errors"])
        undo()
        undo = None  # repaired: the next run removes the rest and records it
        assert [p.case_id for p in retention.apply(store, s, NOW)] == ["OLD-STUCK"]
        assert [e["kind"] for e in store.events("OLD-STUCK")] == ["purge-failed", "purged"]
    finally:
        if undo is not None:
            undo()
        store.close()
