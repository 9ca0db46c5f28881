"""What a power cut or a full disk would find: case files fsynced before they take their name (seen in the
system calls the real process makes, under strace), and a call that cannot be stored failing its case at once
(a real full disk: the case store on a tmpfs filled to the last byte) instead of leaving it `processing`."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest

from appliance.service.worker import CaseProgress, PipelineWorker
from appliance.store import CaseStore
from appliance.offline.sources import tiles_from_image
from tests.conftest import DEMO_CASE, MODEL_DIR

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
        store = CaseStore(disk / "appliance.db")
        worker = PipelineWorker(ov_engine, store, 64, lambda kind, data: events.append((kind, data)),
                                tmp_path / "cases")
        worker.start()
        store.case_started("FULL-1", specimen_id="S-1", model=ov_engine.description)
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
