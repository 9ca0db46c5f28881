"""What a power cut, a full disk or two threads at once would find: case files fsynced before they take their
name (seen in the system calls the real process makes, under strace); a call that cannot be stored failing its
case at once (a real full disk: the case store on a tmpfs filled to the last byte) instead of leaving it
`processing`; and a CASE_END meeting a timeout giving one outcome (a real busy database holds the CASE_END at
its commit)."""

from __future__ import annotations

import os
import re
import shutil
import sqlite3
import subprocess
import sys
import threading

import pytest

from appliance.service.cases import CaseProgress
from appliance.service.worker import PipelineWorker
from appliance.offline.sources import tiles_from_image
from tests.conftest import DEMO_CASE, MODEL_DIR
from tests.stores import open_store

CASE_FILES = ("summary.json", "overlay.png", "regions.geojson", "case.ome.tif", "heatmap.ome.tif")


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace")
def test_every_case_file_is_fsynced_before_its_rename_and_its_folder_after(tmp_path):
    """`appliance triage --out` under strace: for each case file, the fsync of its temporary name comes
    before the rename to the final name, and an fsync of the case folder after it."""
    out = tmp_path / "case"
    trace = tmp_path / "trace"
    env = dict(os.environ, APPLIANCE_DATA_DIR=str(tmp_path / "var"), APPLIANCE_MODEL_DIR=str(MODEL_DIR))
    run = subprocess.run(["strace", "-f", "-y", "-qq", "-e", "trace=fsync,fdatasync,rename,renameat,renameat2",
                          "-o", str(trace), sys.executable, "-m", "appliance.cli", "triage", str(DEMO_CASE), "--out",
                          str(out)], env=env, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert run.returncode == 0, run.stderr[-2000:]
    calls = trace.read_text().splitlines()
    for name in CASE_FILES:
        final, tmp = str(out / name), str(out / f".{name}.tmp")
        renamed = [i for i, c in enumerate(calls) if "rename" in c and f'"{final}"' in c]
        assert renamed, f"{name} was never renamed into place"
        synced = [i for i, c in enumerate(calls) if re.search(r"f(data)?sync\(\d+<" + re.escape(tmp) + ">", c)]
        assert synced and synced[-1] < renamed[-1], f"{name}: renamed without its data fsynced first"
        folder = [i for i, c in enumerate(calls) if re.search(r"fsync\(\d+<" + re.escape(str(out)) + r">\)", c)]
        assert any(i > renamed[-1] for i in folder), f"{name}: its folder was not fsynced after the rename"


def test_a_call_that_cannot_be_stored_fails_the_case_at_once_and_says_why(tmp_path, ov_engine, demo_image):
    """The case store on a 4 MB tmpfs, filled to the last byte between the tiles and the end of the case: the
    call is made but cannot be stored. The case fails at once, visibly (its progress, the failed event, the
    log), instead of staying `processing` with nobody told until a restart."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    disk = tmp_path / "db"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs", str(disk)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    events: list[tuple[str, dict]] = []
    store = worker = None
    try:
        store = open_store(disk / "appliance.db")
        worker = PipelineWorker(ov_engine, store, 64, lambda event: events.append((event.kind, event.data())),
                                tmp_path / "cases")
        worker.start()
        store.case_started("FULL-1", specimen_id="S-1", model=ov_engine.model_ref)
        progress = CaseProgress("FULL-1", "S-1", None)
        worker.begin(progress)
        for t in list(tiles_from_image(demo_image, 200))[:20]:
            worker.tile(progress, t.x, t.y, t.pixels.copy(), tmp_path / "unused.npy")
        with open(disk / "filler", "wb") as f:  # the disk fills up: every byte taken
            try:
                while True:
                    f.write(b"\0" * 65536)
                    f.flush()
            except OSError:
                pass
        worker.end(progress)
        assert progress.done.wait(120), "the case was left processing: nobody was told the call was not stored"
        assert progress.result is None and "could not be stored" in progress.failed
        assert "database or disk is full" in progress.failed
        failed = [d for kind, d in events if kind == "failed"]
        assert failed and failed[0]["case_id"] == "FULL-1" and failed[0]["message"] == progress.failed
        (disk / "filler").unlink()  # room again: the store takes writes, and the pipeline goes on
        store.case_failed("FULL-1", progress.failed)
        assert store.get_case("FULL-1")["status"] == "failed"
        assert worker.alive(60)[0]
    finally:
        if worker is not None:
            worker.stop()
        if store is not None:
            store.close()
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def _inside(thread: threading.Thread, function: str) -> bool:
    """Whether ``thread`` is running ``function`` now (somewhere on its stack)."""
    frame = sys._current_frames().get(thread.ident)
    while frame is not None:
        if frame.f_code.co_name == function:
            return True
        frame = frame.f_back
    return False


def test_a_case_end_and_a_timeout_at_the_same_moment_give_one_outcome(tmp_path, ov_engine, demo_image):
    """The link thread's CASE_END and the housekeeping thread's timeout meet: the CASE_END has passed its
    check and waits to commit (another writer holds the database), when the case times out. One of them
    must win whole: here the CASE_END, whose ACK the scanner gets. Before each change was one step under a lock
    (now the case book's) the timeout abandoned the case too, and the case then failed in the pipeline (ended
    after it was abandoned)."""
    from firmware_bridge.sink import CaseInfo, TileReceived

    from appliance.service.receiver import CaseReceiver, StorageGuard
    from appliance.store.spool import TileSpool
    from tests.waiting import wait_until

    events: list[tuple[str, dict]] = []
    store = open_store(tmp_path / "appliance.db")
    worker = PipelineWorker(ov_engine, store, 64, lambda event: events.append((event.kind, event.data())),
                            tmp_path / "cases")
    worker.start()
    receiver = CaseReceiver(TileSpool(tmp_path / "spool"), store, worker, ov_engine.model_ref,
                            lambda event: events.append((event.kind, event.data())), StorageGuard(tmp_path, 1))
    try:
        tiles = list(tiles_from_image(demo_image, 200))[:24]
        receiver.case_began(CaseInfo("RACE-1", "S-1", "brightfield-he", 4.0, 200, 200, expected_tiles=len(tiles),
                                     image_width=demo_image.shape[1], image_height=demo_image.shape[0]))
        for i, t in enumerate(tiles):
            receiver.tile_received(TileReceived("RACE-1", i, t.x, t.y, t.pixels.shape[1], t.pixels.shape[0], decoded=t.pixels.copy()))
        blocker = sqlite3.connect(store.path, timeout=10)
        blocker.execute("BEGIN IMMEDIATE")  # another writer: the CASE_END's commit waits for it
        ended = threading.Thread(target=receiver.case_ended, args=("RACE-1", len(tiles)))
        ended.start()
        wait_until(lambda: _inside(ended, "case_processing"), timeout=10, what="the CASE_END waiting to commit")
        abandoned: list[str] = []
        timeout = threading.Thread(target=lambda: abandoned.extend(receiver.abandon_stale(0.0)))
        timeout.start()  # the scanner has been quiet longer than the limit (0 s)
        timeout.join(0.5)
        blocker.rollback()
        blocker.close()
        ended.join(30)
        timeout.join(30)
        progress = receiver.book["RACE-1"]
        assert progress.done.wait(60)
        assert abandoned == [] and progress.abandoned is None
        assert progress.failed is None and progress.result is not None
        assert store.get_case("RACE-1")["status"] in ("done", "cannot-call")
    finally:
        worker.stop()
        store.close()


def test_a_case_end_sent_again_after_a_restart_is_acked_when_its_case_was_called_meanwhile(tmp_path, demo_image,
                                                                                            pty_pair):
    """Found by the power-cut test: the cut kept a CASE_END's commit but took its ACK; the restarted daemon
    called the case from the spool, and a second cut came before the scanner sent CASE_END again. The third
    daemon refused it as 'not open' and the scanner gave up on a case that was called. Here: a case called,
    a new daemon, and a scanner sending only its CASE_END again, on a real pty."""
    import numpy as np

    from appliance.config import load_settings
    from appliance.offline.demo import case_info_for
    from appliance.service.daemon import Daemon
    from firmware_bridge import PtyCable
    from firmware_bridge.emulator import ScannerEmulator, TileToSend
    from firmware_bridge.messages import Ack, CaseEnd
    from tests.firmware_bridge.conftest import ScriptedScanner

    tiles = [TileToSend(x, y, np.ascontiguousarray(demo_image[400 + y: 600 + y, 700 + x: 900 + x]))
             for y in range(0, 400, 200) for x in range(0, 400, 200)]
    info = case_info_for("RE-END", "S", tiles, 4.0, 200)
    settings = load_settings(None, data_dir=tmp_path / "var", model_dir=MODEL_DIR, api_port=0)
    cable = PtyCable(tmp_path / "scanner")
    first = Daemon(settings, port=str(cable.path))
    first.start()
    try:
        ScannerEmulator(cable, info, tiles, encoding="raw").run()
        assert first.wait_case("RE-END", 120).result is not None
    finally:
        first.stop()
        cable.close()
    second = Daemon(settings, port=pty_pair.path)
    second.start()
    try:
        scanner = ScriptedScanner(pty_pair.scanner)
        seq = scanner.send(CaseEnd("RE-END", len(tiles)))
        assert scanner.expect(10) == Ack(seq, "RE-END", -1)
    finally:
        second.stop()
