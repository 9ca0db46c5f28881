"""`appliance batch` on a real Dask LocalCluster of worker processes, a real case store and real IDC tissue
(crops of the bundled case), with one unreadable file among them."""

from __future__ import annotations

import csv
import json
import os
import sqlite3
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

from appliance.config import load_settings
from appliance.offline.batch import BatchInput, connect, run_batch
from appliance.offline.triage import triage_path
from tests.conftest import DEMO_CASE
from tests.waiting import wait_until

CLI = [sys.executable, "-m", "appliance.cli"]
WINDOWS = [(0, 0), (0, 1200), (800, 0), (800, 1200), (1200, 1800)]


def crops(folder: Path, windows=WINDOWS, size=(800, 700)) -> list[Path]:
    image = tifffile.imread(DEMO_CASE)
    paths = []
    for i, (y, x) in enumerate(windows):
        p = folder / f"core{i}.png"
        Image.fromarray(image[y:y + size[0], x:x + size[1]]).save(p)
        paths.append(p)
    return paths


def run(args, data: Path, **kw) -> subprocess.CompletedProcess:
    env = dict(os.environ, APPLIANCE_DATA_DIR=str(data))
    return subprocess.run([*CLI, "batch", *map(str, args)], capture_output=True, text=True, env=env,
                          stdin=subprocess.DEVNULL, timeout=600, **kw)


def report_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def cases(data: Path) -> list[dict]:
    """The cases table, read as another program would, while the batch may still be writing."""
    db = data / "appliance.db"
    if not db.exists():
        return []
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10) as conn:
        conn.row_factory = sqlite3.Row
        if conn.execute("select 1 from sqlite_master where type = 'table' and name = 'cases'").fetchone() is None:
            return []  # the batch has made the file and not yet its tables
        rows = [dict(r) for r in conn.execute("select * from cases")]
    for r in rows:
        r["reasons"] = json.loads(r["reasons"]) if r.get("reasons") else []
    return rows


def test_batch_records_every_input_fails_the_unreadable_one_and_a_rerun_does_nothing(ov_engine, tmp_path):
    inputs = crops(tmp_path)
    broken = tmp_path / "broken.svs"
    broken.write_bytes(b"II*\x00" + bytes(100))  # a TIFF header and nothing else
    data = tmp_path / "var"
    report = tmp_path / "report.csv"
    first = run([*inputs, broken, "--workers", "2", "--report", report], data)
    assert first.returncode == 1, first.stderr  # something failed
    assert "5 done, 0 skipped, 1 failed" in first.stdout and "Not for diagnosis" in first.stdout
    rows = report_rows(report)
    assert [r["input"] for r in rows] == [str(p) for p in [*inputs, broken]]
    assert set(rows[0]) >= {"input", "specimen", "status", "verdict", "score", "reasons", "model_sha256", "seconds"}
    assert [r["status"] for r in rows] == ["done"] * 5 + ["failed"]
    assert "broken.svs" in rows[5]["reasons"] and "damaged" in rows[5]["reasons"]
    assert len({r["model_sha256"] for r in rows}) == 1 and len(rows[0]["model_sha256"]) == 64

    stored = {c["id"]: c for c in cases(data)}
    assert len(stored) == 6
    for row, path in zip(rows[:5], inputs):
        case = stored[row["case_id"]]
        assert case["source"] == str(path) and case["verdict"] == row["verdict"]
        assert (data / "cases" / row["case_id"] / "summary.json").is_file()
        # the call equals `appliance triage` of the same input
        alone = triage_path(ov_engine, path)
        assert (alone["verdict"], alone["score"]) == (case["verdict"], case["score"]) == (row["verdict"],
                                                                                         float(row["score"]))
    assert stored[rows[5]["case_id"]]["status"] == "failed"
    assert "damaged" in stored[rows[5]["case_id"]]["reasons"][0]["message"]
    assert {r["verdict"] for r in rows[:5]} >= {"suspicious", "benign-appearing"}  # real calls, not one answer

    again = run([*inputs, broken, "--workers", "2", "--report", report], data)
    assert again.returncode == 0, again.stderr
    assert "0 done, 6 skipped, 0 failed" in again.stdout
    assert [r["status"] for r in report_rows(report)] == ["skipped"] * 6
    assert [(r["verdict"], r["score"]) for r in report_rows(report)] == [(r["verdict"], r["score"]) for r in rows]
    assert len(cases(data)) == 6


def test_a_batch_killed_halfway_resumes_and_records_each_case_once(tmp_path):
    windows = [(y, x) for y in (0, 600, 1200) for x in (0, 900, 1800)]  # 9 cores of real tissue
    inputs = crops(tmp_path, windows)
    data = tmp_path / "var"
    proc = subprocess.Popen([*CLI, "batch", *map(str, inputs), "--workers", "1"], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            env=dict(os.environ, APPLIANCE_DATA_DIR=str(data)))
    try:
        wait_until(lambda: sum(c["status"] in ("done", "cannot-call") for c in cases(data)) >= 2, timeout=300,
                   what="two cases recorded")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and its cluster's processes, as a power cut would
        proc.wait()
    halfway = [c for c in cases(data) if c["status"] in ("done", "cannot-call")]
    assert 2 <= len(halfway) < len(inputs)
    assert len(cases(data)) == len(halfway)  # nothing left open for a restarting daemon to find

    report = tmp_path / "report.csv"
    rest = run([*inputs, "--workers", "1", "--report", report], data)
    assert rest.returncode == 0, rest.stderr
    statuses = [r["status"] for r in report_rows(report)]
    assert statuses.count("skipped") >= len(halfway) and statuses.count("done") >= 1
    assert set(statuses) <= {"skipped", "done"}
    stored = cases(data)
    assert len(stored) == len(inputs) == len({c["id"] for c in stored})  # each case once
    assert {c["source"] for c in stored} == {str(p) for p in inputs}
    assert all(c["status"] in ("done", "cannot-call") for c in stored)


def test_a_worker_killed_mid_slide_has_its_slide_retried_and_recorded_once(tmp_path):
    image = tifffile.imread(DEMO_CASE)
    inputs = []
    for i, flip in enumerate((lambda a: a, np.fliplr, np.flipud, lambda a: a[::-1, ::-1])):
        p = tmp_path / f"whole{i}.tif"
        tifffile.imwrite(p, np.ascontiguousarray(flip(image)))  # a whole case each: about a second of work
        inputs.append(BatchInput(p, f"S-{i}"))
    settings = load_settings(None, data_dir=tmp_path / "var")
    killed = []
    with connect(workers=2) as (client, _):
        pids = client.run(os.getpid)  # worker address -> pid

        def kill_a_busy_worker() -> None:
            busy = wait_until(lambda: next((w for w, tasks in client.processing().items() if tasks), None),
                              timeout=120)
            os.kill(pids[busy], signal.SIGKILL)
            killed.append(busy)

        killer = threading.Thread(target=kill_a_busy_worker)
        killer.start()
        rows = run_batch(inputs, settings, client)
        killer.join()
    assert killed
    assert [r.status for r in rows] == ["done"] * 4
    stored = cases(tmp_path / "var")
    assert len(stored) == 4 and {c["specimen_id"] for c in stored} == {"S-0", "S-1", "S-2", "S-3"}
    assert all(c["verdict"] == "suspicious" for c in stored)  # the bundled case, however it is turned


def test_a_missing_input_fails_with_its_reason_and_an_input_given_twice_is_one_case(tmp_path):
    (core,) = crops(tmp_path, WINDOWS[:1])
    twin = tmp_path / "twin.png"
    twin.write_bytes(core.read_bytes())  # the same bytes under another name: the same specimen scanned twice
    missing = tmp_path / "gone.svs"
    settings = load_settings(None, data_dir=tmp_path / "var")
    with connect(workers=1) as (client, _):
        rows = run_batch([BatchInput(core), BatchInput(missing), BatchInput(core), BatchInput(twin)], settings, client)
    assert [r.status for r in rows] == ["done", "failed", "done", "done"]
    assert "gone.svs: cannot be read" in rows[1].reasons and "No such file" in rows[1].reasons
    assert rows[0].case_id == rows[2].case_id != rows[3].case_id  # the case id carries the file's name
    assert rows[0].verdict == rows[2].verdict == rows[3].verdict and rows[0].score == rows[3].score
    assert len(cases(tmp_path / "var")) == 2
