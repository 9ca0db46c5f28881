"""The lazy file system for power-cut tests (tests/lazyfs.py), on its own: what is fsynced survives a drop,
what is not does not, and SQLite's committed transactions survive with the database intact."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from tests.lazyfs import Lazy, fuse_missing

pytestmark = pytest.mark.skipif(fuse_missing() is not None, reason=str(fuse_missing()))


@pytest.fixture
def lazy(tmp_path):
    fs = Lazy(tmp_path / "backing", tmp_path / "mnt")
    yield fs
    fs.close()


def fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def after_remount(lazy: Lazy, name: str) -> tuple[str, int]:
    """Mount the cut file system again and read the database ``name``: (integrity_check, rows in t)."""
    again = Lazy(lazy.backing, lazy.mnt)
    try:
        conn = sqlite3.connect(again.mnt / name)
        try:
            return (conn.execute("pragma integrity_check").fetchone()[0],
                    conn.execute("select count(*) from t").fetchone()[0])
        finally:
            conn.close()
    finally:
        again.unmount()


def test_what_is_fsynced_survives_and_what_is_not_is_lost(lazy):
    m = lazy.mnt
    (m / "kept.txt").write_text("kept")
    fsync(m / "kept.txt")
    (m / "named-only.txt").write_text("data never synced")
    fsync(m)  # both names durable; only kept.txt's data
    (m / "kept.txt").write_text("changed, not synced")
    (m / "never.txt").write_text("neither name nor data")
    (m / "sub").mkdir()
    (m / "sub" / "deep.txt").write_text("deep")
    fsync(m / "sub" / "deep.txt")
    fsync(m / "sub")  # deep.txt is named in sub, but sub itself is not named in the root
    lazy.cut()
    b = lazy.backing
    assert sorted(p.name for p in b.iterdir()) == ["kept.txt", "named-only.txt"]
    assert (b / "kept.txt").read_text() == "kept"
    assert (b / "named-only.txt").read_bytes() == b""  # a durable name whose data was never synced


def test_a_rename_without_its_folder_fsynced_is_lost(lazy):
    m = lazy.mnt
    (m / "f.json").write_text('{"old": 1}')
    fsync(m / "f.json")
    fsync(m)
    (m / ".f.json.tmp").write_text('{"new": 2}')
    fsync(m / ".f.json.tmp")
    os.replace(m / ".f.json.tmp", m / "f.json")  # the new data is durable, the rename is not
    lazy.cut()
    assert [p.name for p in lazy.backing.iterdir()] == ["f.json"]
    assert (lazy.backing / "f.json").read_text() == '{"old": 1}'


def test_a_rename_with_its_folder_fsynced_survives_and_remounting_shows_it(lazy, tmp_path):
    m = lazy.mnt
    (m / ".f.json.tmp").write_text('{"new": 2}')
    fsync(m / ".f.json.tmp")
    os.replace(m / ".f.json.tmp", m / "f.json")
    fsync(m)
    lazy.cut()
    again = Lazy(lazy.backing, lazy.mnt)
    try:
        assert (again.mnt / "f.json").read_text() == '{"new": 2}' and not (again.mnt / ".f.json.tmp").exists()
    finally:
        again.unmount()


def test_sqlite_commits_survive_a_cut_with_the_database_intact(lazy):
    db = lazy.mnt / "a.db"
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("create table t (id integer primary key, v text)")
    for i in range(50):
        with conn:
            conn.execute("insert into t (v) values (?)", (f"row {i}",))
    conn.close()
    lazy.cut()
    assert after_remount(lazy, "a.db") == ("ok", 50)


def test_sqlite_commits_of_a_killed_writer_survive_a_cut(lazy):
    """The writer is SIGKILLed with its connection open (the WAL not checkpointed), then the power goes."""
    script = ("import sqlite3, sys, time\n"
              "c = sqlite3.connect(sys.argv[1]); c.execute('PRAGMA journal_mode=WAL');"
              " c.execute('PRAGMA synchronous=FULL'); c.execute('create table t (v text)'); c.commit()\n"
              "for i in range(40):\n    c.execute('insert into t values (?)', (str(i),)); c.commit()\n"
              "c.execute('insert into t values (?)', ('never committed',))\n"
              "print('committed', flush=True); time.sleep(600)\n")
    writer = subprocess.Popen([sys.executable, "-c", script, str(lazy.mnt / "a.db")], stdout=subprocess.PIPE, text=True)
    assert writer.stdout.readline().strip() == "committed"
    writer.kill()
    writer.wait()
    lazy.cut()
    assert after_remount(lazy, "a.db") == ("ok", 40)


def test_a_triaged_case_s_files_survive_a_cut_whole(lazy, tmp_path):
    """`appliance triage --out` onto the lazy file system, then the power goes: every case file is there and
    whole (JSON parses, PNGs decode, the OME-TIFF pyramids open). Before the case folder's own name was
    fsynced, the cut took the whole folder."""
    import json

    import tifffile
    from PIL import Image

    from tests.conftest import DEMO_CASE, MODEL_DIR

    out = lazy.mnt / "cases" / "PC-1"
    env = dict(os.environ, APPLIANCE_DATA_DIR=str(tmp_path / "var"), APPLIANCE_MODEL_DIR=str(MODEL_DIR))
    run = subprocess.run([sys.executable, "-m", "appliance.cli", "triage", str(DEMO_CASE), "--out", str(out)],
                         env=env, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert run.returncode == 0, run.stderr[-2000:]
    written = sorted(p.name for p in out.iterdir())
    lazy.cut()
    kept = lazy.backing / "cases" / "PC-1"
    assert kept.is_dir() and sorted(p.name for p in kept.iterdir()) == written
    summary = json.loads((kept / "summary.json").read_text())
    assert set(summary["outputs"]) <= set(written)
    for p in kept.glob("*.png"):
        Image.open(p).load()
    for p in kept.glob("*.ome.tif"):
        with tifffile.TiffFile(p) as tif:
            assert tif.series[0].levels[0].asarray().size
    json.loads((kept / "regions.geojson").read_text())


def test_an_armed_cut_kills_its_caller_at_that_moment_and_nothing_after_it_lands(lazy):
    """Armed at the third fsync of a temporary file, after it: the writer is SIGKILLed inside that fsync, the
    two files renamed into place (and their folder fsynced) before it survive, and the third, whose data was
    durable but whose name was not, does not; the file system refuses everything after the cut."""
    script = ("import os, sys\n"
              "d = sys.argv[1]\n"
              "for i in range(10):\n"
              "    tmp = os.path.join(d, f'.f{i}.tmp')\n"
              "    with open(tmp, 'w') as f:\n"
              "        f.write(f'file {i}'); f.flush(); os.fsync(f.fileno())\n"
              "    os.replace(tmp, os.path.join(d, f'f{i}'))\n"
              "    fd = os.open(d, os.O_RDONLY); os.fsync(fd); os.close(fd)\n")
    lazy.arm("fsync", "after", 3, r"\.tmp$")
    writer = subprocess.run([sys.executable, "-c", script, str(lazy.mnt)], capture_output=True, timeout=30)
    assert writer.returncode == -9  # SIGKILLed by the cut
    assert lazy.cuts() == ["after fsync /.f2.tmp"]
    with pytest.raises(OSError):
        (lazy.mnt / "late").write_text("after the power went")
    lazy.unmount()
    assert sorted(p.name for p in lazy.backing.iterdir()) == ["f0", "f1"]
    assert [(lazy.backing / n).read_text() for n in ("f0", "f1")] == ["file 0", "file 1"]


def test_disarm_counts_the_operations_the_pattern_matched(lazy):
    lazy.arm("create,rename", "before", 1000, r"^/sub/")
    (lazy.mnt / "sub").mkdir()
    for i in range(3):
        (lazy.mnt / "sub" / f".{i}.tmp").write_text("x")
        os.replace(lazy.mnt / "sub" / f".{i}.tmp", lazy.mnt / "sub" / str(i))
    (lazy.mnt / "other").write_text("not matched")
    assert lazy.disarm() == 6 and lazy.cuts() == []


# ---------------------------------------------------------------------------- findings of the power-cut test
def test_the_api_token_made_on_first_run_survives_a_power_cut(lazy):
    """The first thing the power-cut test found: the token was renamed into place unsynced, so a cut soon
    after the first start left an empty file (its name made durable by SQLite's fsync of the same folder),
    and the daemon refused to start: 'the API token ... is too short'."""
    from appliance.api.auth import ensure_token

    token = ensure_token(lazy.mnt / "api-token")
    lazy.cut()
    again = Lazy(lazy.backing, lazy.mnt)
    try:
        assert ensure_token(again.mnt / "api-token") == token
    finally:
        again.unmount()


def test_a_called_case_whose_files_a_cut_took_gets_them_made_again_at_restart(lazy, tmp_path, demo_image):
    """The power goes while a called case's files are written (at the 12th operation on them): the call is
    stored, the files are not all there. Before, they never came; now the restarted daemon makes them again
    from the spool, and they carry the stored call."""
    import json

    import numpy as np

    from appliance.offline.demo import case_info_for
    from firmware_bridge import PtyCable
    from firmware_bridge.emulator import ScannerEmulator, TileToSend
    from tests.appliance_run import ApplianceRun
    from tests.waiting import wait_until

    tiles = [TileToSend(x, y, np.ascontiguousarray(demo_image[400 + y: 600 + y, 700 + x: 900 + x]))
             for y in range(0, 600, 200) for x in range(0, 800, 200)]
    info = case_info_for("PC-F", "S-F", tiles, 4.0, 200)
    cable = PtyCable(tmp_path / "scanner")
    lazy.arm("create,mkdir,rename,fsync,fsyncdir,unlink,rmdir", "before", 12, r"^/cases/PC-F(/(?!\.work)|$)")
    daemon = ApplianceRun(cable.path, lazy.mnt)
    try:
        ScannerEmulator(cable, info, tiles, encoding="raw").run()  # CASE_END is ACKed before the files begin
        assert daemon.proc.wait(120) == -9 and len(lazy.cuts()) == 1
        lazy.unmount()
        again = Lazy(lazy.backing, lazy.mnt)
        summary = again.mnt / "cases" / "PC-F" / "summary.json"
        try:
            assert not summary.exists()
            daemon = ApplianceRun(cable.path, again.mnt)
            wait_until(summary.exists, 120, what="the case's files made again")
            daemon.stop()
            kept = json.loads(summary.read_text())
            db = sqlite3.connect(again.mnt / "appliance.db")
            stored = db.execute("select verdict, score from cases where id = 'PC-F'").fetchone()
            rebuilt = [json.loads(d) for (d,) in db.execute(
                "select detail from events where case_id = 'PC-F' and kind = 'outputs'")]
            db.close()
            assert (kept["verdict"], kept["score"]) == stored and stored[0] == "suspicious"
            assert all((summary.parent / name).exists() for name in kept["outputs"])
            assert [e.get("rebuilt") for e in rebuilt] == [True]
        finally:
            daemon.kill()
            again.unmount()
    finally:
        daemon.kill()
        cable.close()
