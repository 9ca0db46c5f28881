"""Pull the plug: the daemon's whole data folder (spool, database, case files, token) on the lazy file system
(tests/lazyfs.py), cases streamed by the scanner emulator over a real pty, an MLLP receiver as the LIS, and
the power cut again and again at seeded moments: the daemon SIGKILLed and everything not fsynced dropped at
once. After every cut the file system is mounted again from what survived and the daemon restarted on it,
and the scanner resumes as after a link loss.

The moments, each case going through all five in its life:

* ``mid-stream``: after k of the case's tiles were ACKed (k seeded);
* ``write-ack``: inside one of a not-yet-sent tile's spool operations (its write, fsync or rename, before or
  after the operation; seeded): the tile is being made durable, its ACK not yet sent;
* ``case-end``: at the first database write or fsync after the scanner's last tile ACK, that is as the
  daemon records the CASE_END it is about to receive;
* ``case-files``: at the nth operation on the case's files (n seeded, up to as many as a case makes);
* ``lis``: while the call's HL7 message waits at the receiver, which holds back its ACK.

Checked after every cut, on what survived: ``PRAGMA integrity_check`` is ok; every tile the scanner saw ACKed
is in the store and in the spool with the sha256 it sent; every file under its final name is whole (JSON
parses, PNG decodes, OpenSlide opens the pyramids, the API token is a token), and a summary.json names only
files that are there. At each case's end: the call equals an uninterrupted run's, its files are all there
(made again from the spool if a cut took them), and its LIS message arrived with that call, never two
different messages under one id.

Slow (``make test-power SEED=n``); POWER_SEED and POWER_CASES choose the seed (printed) and the number of
cases (8: 40 cuts)."""

from __future__ import annotations

import json
import os
import random
import re
import sqlite3
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from appliance.model.engine import load_engine
from appliance.offline.demo import case_info_for
from firmware_bridge import PtyCable
from firmware_bridge.emulator import ScannerEmulator, TileToSend
from tests.appliance_run import ApplianceRun
from tests.conftest import MODEL_DIR
from tests.lazyfs import Lazy, fuse_missing
from tests.lis_receivers import MllpReceiver
from tests.results import reference_call
from tests.waiting import wait_until

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(fuse_missing() is not None, reason=f"power-cut test needs FUSE: {fuse_missing()}")]

MOMENTS = ("mid-stream", "write-ack", "case-end", "case-files", "lis")
TILE, GRID = 200, (3, 4)  # 12 tiles of 200 x 200 px per case
FILE_OPS = "create,mkdir,rename,fsync,fsyncdir,unlink,rmdir"  # the structural operations (not each write)


def case_files_pattern(case_id: str) -> str:
    """The case's own files and folder (not its .work folder of the session's scratch files)."""
    return rf"^/cases/{re.escape(case_id)}(/(?!\.work)|$)"


@dataclass
class Case:
    info: object
    tiles: list
    emulator: ScannerEmulator | None = None
    thread: threading.Thread | None = None
    error: str | None = None
    sent: list[int] = field(default_factory=list)  # tiles put on the wire, as the scanner reports progress
    on_all_acked: object = None  # called (in the scanner's thread) once every tile is ACKed

    @property
    def case_id(self) -> str:
        return self.info.case_id

    def acked(self) -> set[int]:
        return set(self.emulator.result.acked)

    def digests(self) -> dict[int, str]:
        return dict(self.emulator.result.digests)


class Bench:
    """The appliance on the lazy file system, its scanner cable and its LIS; cut(), then recover()."""

    def __init__(self, root: Path, rng: random.Random):
        self.root, self.rng = root, rng
        self.lis = MllpReceiver()
        self.lis.start()
        self.cable = PtyCable(root / "scanner")
        self.fs = Lazy(root / "backing", root / "var")
        self.env = {"APPLIANCE_LIS_MLLP": json.dumps([self.lis.address])}
        self.daemon = ApplianceRun(self.cable.path, self.fs.mnt, **self.env)
        self.cuts: list[tuple[str, str, str]] = []  # (case, moment, what the file system cut at)
        self.violations: list[str] = []

    # ------------------------------------------------------------------------------------ the scanner
    def stream(self, case: Case) -> None:
        total = len(case.tiles)

        def progress(sent: int, acked: int, _total) -> None:
            case.sent.append(sent)
            if acked == total and case.on_all_acked is not None:
                hook, case.on_all_acked = case.on_all_acked, None
                hook()  # before run() goes on to send CASE_END

        case.emulator = ScannerEmulator(self.cable, case.info, case.tiles, encoding="raw", ack_timeout=0.5,
                                        max_retries=600, keep_digests=True, progress=progress)

        def run() -> None:
            try:
                case.emulator.run()
            except Exception as exc:  # noqa: BLE001 - reported as a violation
                case.error = repr(exc)

        case.thread = threading.Thread(target=run, name=f"scanner {case.case_id}", daemon=True)
        case.thread.start()

    # ------------------------------------------------------------------------------------ the power
    def cut_now(self, case: Case, moment: str) -> None:
        """Cut on the test's command: the daemon SIGKILLed and the pending writes dropped at once."""
        self.fs.command(f"cut {self.daemon.pid}")
        self._after_cut(case, moment)

    def wait_cut(self, case: Case, moment: str, missed, timeout: float = 120) -> bool:
        """Wait for the armed cut to fire (the daemon killed inside its operation) or for ``missed()``; True
        if the cut landed."""
        def passed() -> bool:
            try:
                return missed()
            except OSError:  # the power just went: the file system answers nothing any more
                return False

        wait_until(lambda: self.daemon.proc.poll() is not None or passed(), timeout, interval=0.01,
                   what=f"the {moment} cut of {case.case_id} (or its moment to pass)")
        if self.daemon.proc.poll() is None:
            self.fs.disarm()  # atomic with the operations: from here no armed cut can fire
            if self.daemon.proc.poll() is None:
                print(f"  {case.case_id} {moment}: the moment passed before its cut (not counted)")
                return False
        self._after_cut(case, moment)
        return True

    def _after_cut(self, case: Case, moment: str) -> None:
        self.daemon.kill()
        what = wait_until(lambda: self.fs.cuts(), 10, what="the file system's word on its cut")[-1]
        self.cuts.append((case.case_id, moment, what))
        self.fs.unmount()
        print(f"  cut {len(self.cuts):2d}: {case.case_id} {moment:10s} {what}", flush=True)

    def remount(self, cases: list[Case]) -> None:
        """Mount what survived and check it, before anything else touches it."""
        self.fs = Lazy(self.fs.backing, self.fs.mnt)
        where = f"after cut {len(self.cuts)} ({self.cuts[-1][0]} {self.cuts[-1][1]}: {self.cuts[-1][2]})"
        for problem in check_survivors(self.fs.mnt, cases):
            self.violations.append(f"{where}: {problem}")
            print("  VIOLATION", self.violations[-1], flush=True)

    def restart(self) -> None:
        """The daemon started again on what survived (unless the last moment passed without its cut)."""
        if self.daemon.proc.poll() is not None:
            self.daemon = ApplianceRun(self.cable.path, self.fs.mnt, wait_ready=False, **self.env)
            try:
                self.daemon.wait_for("[ready]", 120)
            except AssertionError:
                if self.daemon.proc.wait(10) is None or not wait_until(self.fs.cuts, 5, what="a cut"):
                    raise  # not killed by an armed cut as it started: it failed to start

    def close(self) -> None:
        self.daemon.kill()
        self.fs.close()
        self.cable.close()
        self.lis.stop()


# ---------------------------------------------------------------------------------------- the checks
def check_survivors(mnt: Path, cases: list[Case]) -> list[str]:
    """What must hold on the file system as a power cut left it (a list of what does not)."""
    problems = []
    db_path = mnt / "appliance.db"
    stored: dict[tuple[str, int], str] = {}
    if db_path.exists():
        conn = sqlite3.connect(db_path)
        try:
            ok = conn.execute("pragma integrity_check").fetchone()[0]
            if ok != "ok":
                problems.append(f"integrity_check: {ok}")
            stored = {(c, i): s for c, i, s in conn.execute("select case_id, idx, sha256 from tiles")}
        except sqlite3.DatabaseError as exc:
            problems.append(f"the database cannot be read: {exc}")
        finally:
            conn.close()
    elif any(c.emulator and c.acked() for c in cases):
        problems.append("appliance.db is gone, with ACKed tiles")
    from appliance.store.spool import pixel_digest

    for case in cases:
        if case.emulator is None:
            continue
        digests = case.digests()
        for idx in sorted(case.acked()):
            want = digests.get(idx)
            if stored.get((case.case_id, idx)) != want:
                problems.append(f"{case.case_id} tile {idx} was ACKed but the store has "
                                f"{stored.get((case.case_id, idx))!r}, not its sha256 {want}")
            spooled = list((mnt / "spool" / case.case_id).glob(f"tile-{idx:06d}_*.npy"))
            try:
                if len(spooled) != 1 or pixel_digest(np.load(spooled[0], allow_pickle=False)) != want:
                    problems.append(f"{case.case_id} tile {idx} was ACKed but its spooled pixels are not "
                                    f"the ones sent ({[p.name for p in spooled]})")
            except (OSError, ValueError) as exc:
                problems.append(f"{case.case_id} tile {idx}: its spool file cannot be read: {exc}")
    problems += [f"truncated or broken: {p}" for p in broken_files(mnt)]
    return problems


def broken_files(mnt: Path) -> list[str]:
    """Every file under its final name that is not whole (temporary names and .work folders are not final)."""
    import openslide
    from PIL import Image

    broken = []
    token = mnt / "api-token"
    if token.exists() and not re.fullmatch(r"[A-Za-z0-9_\-]{32,}\s*", token.read_text()):
        broken.append(f"{token.name} ({token.stat().st_size} bytes)")
    for case_dir in sorted((mnt / "cases").glob("*")) if (mnt / "cases").is_dir() else []:
        for p in sorted(case_dir.iterdir()):
            if p.name.startswith("."):
                continue
            try:
                if p.suffix in (".json", ".geojson"):
                    data = json.loads(p.read_text())
                    if p.name == "summary.json":
                        missing = [n for n in data["outputs"] if not (case_dir / n).exists()]
                        if missing:
                            broken.append(f"{p.relative_to(mnt)} names files that are not there: {missing}")
                elif p.suffix == ".png":
                    Image.open(p).load()
                elif p.name.endswith(".ome.tif"):
                    with openslide.OpenSlide(p) as slide:
                        level = slide.level_count - 1
                        slide.read_region((0, 0), level, slide.level_dimensions[level]).load()
                else:
                    broken.append(f"{p.relative_to(mnt)}: a case file this test does not know how to check")
            except Exception as exc:  # noqa: BLE001 - every way a file can be broken
                broken.append(f"{p.relative_to(mnt)}: {type(exc).__name__}: {exc}")
    for spool_dir in sorted((mnt / "spool").glob("*")) if (mnt / "spool").is_dir() else []:
        info = spool_dir / "case.json"
        try:
            if info.exists():
                json.loads(info.read_text())
        except ValueError as exc:
            broken.append(f"{info.relative_to(mnt)}: {exc}")
    return broken


def of_case(message_id: str) -> str:
    """The case a message id (``<case id>.r<revision>``) belongs to."""
    return message_id.rsplit(".r", 1)[0]


def lis_results(text: str) -> dict[str, str]:
    """OBX code -> value of an ORU^R01 (segments end in CR)."""
    out = {}
    for seg in re.split(r"[\r\n]+", text):
        f = seg.split("|")
        if f[0] == "OBX" and len(f) > 5:
            out[f[3].split("^")[0]] = f[5]
    return out


# ---------------------------------------------------------------------------------------- the test
def test_power_cuts_at_seeded_moments_lose_no_acked_tile_leave_no_torn_file_and_change_no_call(tmp_path,
                                                                                             demo_image):
    seed = int(os.environ.get("POWER_SEED") or time.time_ns() % 1_000_000)
    n_cases = int(os.environ.get("POWER_CASES", "8"))
    print(f"\npower-cut test: seed {seed}, {n_cases} cases (again: make test-power SEED={seed})", flush=True)
    rng = random.Random(seed)
    engine = load_engine(MODEL_DIR)
    bench = Bench(tmp_path, rng)
    cases: list[Case] = []
    rows, cols = GRID
    try:
        # one case uninterrupted first: how many operations a case's files take (the range of the case-files
        # cut), and the system seen working on this file system before any cut
        calibration = new_case("PC-CAL", demo_image, rng, rows, cols, at=(400, 700))
        bench.fs.arm(FILE_OPS, "before", 10 ** 9, case_files_pattern(calibration.case_id))
        cases.append(calibration)
        bench.stream(calibration)
        finish_case(bench, calibration, engine)
        wait_until(lambda: (bench.fs.mnt / "cases" / calibration.case_id / "summary.json").exists(), 60,
                   what="the calibration case's files")
        file_ops = bench.fs.disarm()
        print(f"  a case's files take {file_ops} operations ({FILE_OPS})", flush=True)
        assert file_ops > 5

        for c in range(n_cases):
            case = new_case(f"PC-{c + 1:02d}", demo_image, rng, rows, cols)
            cases.append(case)
            run_case_through_five_cuts(bench, case, cases, rng, file_ops)
            finish_case(bench, case, engine)
        bench.daemon.stop()
        check_deliveries(bench, cases)
    except BaseException:
        print("the daemon's last words:\n" + "".join(bench.daemon.lines[-40:]))
        raise
    finally:
        bench.close()

    counts = Counter(moment for _c, moment, _w in bench.cuts)
    print(f"\npower-cut test, seed {seed}: {len(bench.cuts)} cuts over {n_cases} cases; per moment: "
          + ", ".join(f"{m} {counts[m]}" for m in MOMENTS))
    print(f"violations: {len(bench.violations)}")
    for v in bench.violations:
        print("  ", v)
    assert bench.violations == []
    assert len(bench.cuts) >= 30 and len({c for c, _m, _w in bench.cuts}) >= 5
    assert all(counts[m] >= 5 for m in MOMENTS), counts


def new_case(case_id: str, image: np.ndarray, rng: random.Random, rows: int, cols: int,
             at: tuple[int, int] | None = None) -> Case:
    """A case of rows x cols tiles from the demo slide, at ``at`` or at a seeded place mostly on tissue (so
    that every case has its full set of files)."""
    h, w = rows * TILE, cols * TILE
    while at is None:
        oy, ox = rng.randrange(0, image.shape[0] - h, 50), rng.randrange(0, image.shape[1] - w, 50)
        if (image[oy:oy + h, ox:ox + w].mean(axis=2) < 200).mean() > 0.6:
            at = (oy, ox)
    oy, ox = at
    tiles = [TileToSend(x, y, np.ascontiguousarray(image[oy + y: oy + y + TILE, ox + x: ox + x + TILE]))
             for y in range(0, h, TILE) for x in range(0, w, TILE)]
    return Case(case_info_for(case_id, f"S-{case_id}", tiles, 4.0, TILE), tiles)


def run_case_through_five_cuts(bench: Bench, case: Case, cases: list[Case], rng: random.Random,
                               file_ops: int) -> None:
    n = len(case.tiles)
    bench.lis.hold.clear()  # this case's LIS message waits for its ACK until the last cut
    heard_before = len(bench.lis.received)

    # 1. mid-stream, after k ACKs
    k = rng.randint(1, 4)
    bench.stream(case)
    wait_until(lambda: len(case.acked()) >= k, 120, interval=0.005, what=f"{k} ACKs of {case.case_id}")
    bench.cut_now(case, "mid-stream")
    bench.remount(cases)

    # 2. inside a tile's spool operations, a tile never sent before the cut
    unsent = range(max(case.sent[-1], max(case.acked()) + 1), n)
    op, when = rng.choice([("write", "before"), ("write", "after"), ("fsync", "before"), ("fsync", "after"),
                           ("rename", "before"), ("rename", "after")])
    if unsent:
        j = rng.choice(unsent)
        bench.fs.arm(op, when, 1, rf"^/spool/{re.escape(case.case_id)}/\.?tile-{j:06d}_")
        bench.restart()
        if bench.wait_cut(case, "write-ack", missed=lambda: j in case.acked()):
            if j in case.acked():
                bench.violations.append(f"{case.case_id}: tile {j} was ACKed although the power went while it "
                                        f"was being stored")
            bench.remount(cases)
    else:
        print(f"  {case.case_id} write-ack: every tile was sent before the first cut (not counted)")

    # 3. at CASE_END: armed from the scanner's thread when its last tile is ACKed, before CASE_END goes out
    op, when = rng.choice([("write", "before"), ("fsync", "before"), ("fsync", "after")])
    case.on_all_acked = lambda: bench.fs.arm(op, when, 1, r"^/appliance\.db-wal$")
    bench.restart()  # (if every tile was ACKed already, the moment has passed: it is not counted)
    if bench.wait_cut(case, "case-end", missed=lambda: not case.thread.is_alive()):
        bench.remount(cases)

    # 4. while the case's files are written
    nth = rng.randint(1, file_ops - 1)  # (the calibration's count has the case folder's mkdir at CASE_BEGIN too)
    bench.fs.arm(FILE_OPS, rng.choice(["before", "after"]), nth, case_files_pattern(case.case_id))
    bench.restart()
    summary = bench.fs.mnt / "cases" / case.case_id / "summary.json"
    if bench.wait_cut(case, "case-files", missed=summary.exists):
        bench.remount(cases)

    # 5. while the LIS message waits for its ACK
    bench.restart()
    wait_until(lambda: any(of_case(mid) == case.case_id for mid, _t in bench.lis.received[heard_before:]), 120,
               what=f"the LIS message of {case.case_id}")
    time.sleep(rng.uniform(0, 0.2))
    bench.cut_now(case, "lis")
    bench.remount(cases)
    bench.lis.hold.set()
    bench.restart()


def finish_case(bench: Bench, case: Case, engine) -> None:
    """The case's scanner done, the case called, and the call the one an uninterrupted run makes."""
    case.thread.join(180)
    if case.error or case.thread.is_alive():
        bench.violations.append(f"{case.case_id}: the scanner did not deliver the case: {case.error or 'hung'}")
        return
    db = bench.fs.mnt / "appliance.db"

    def row():
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            return conn.execute("select status, verdict, score from cases where id = ?", [case.case_id]).fetchone()
        finally:
            conn.close()

    wait_until(lambda: (r := row()) is not None and r[0] in ("done", "cannot-call", "failed"), 120,
               what=f"{case.case_id} called")
    status, verdict, score = row()
    expected = reference_call(engine, case.tiles, scanner_mpp=4.0, width=case.info.image_width,
                              height=case.info.image_height)
    print(f"  {case.case_id}: {status}, {verdict} {score} (uninterrupted: {expected.verdict} {expected.score})",
          flush=True)
    if (verdict, score) != (str(expected.verdict), expected.score):
        bench.violations.append(f"{case.case_id}: called {verdict} {score} ({status}); uninterrupted: "
                                f"{expected.verdict} {expected.score}")
    summary = bench.fs.mnt / "cases" / case.case_id / "summary.json"
    try:
        wait_until(summary.exists, 120, what=f"the files of {case.case_id}")
    except AssertionError:
        bench.violations.append(f"{case.case_id}: its files are not all there (no summary.json)")
    wait_until(lambda: any(of_case(mid) == case.case_id for mid, _t in bench.lis.received), 120,
               what=f"the LIS message of {case.case_id}")
    # its ACK recorded before the next case begins, whose held ACK must hold back only its own message
    wait_until(lambda: delivery_status(db, case.case_id) == {"delivered"}, 120,
               what=f"the LIS ACK of {case.case_id}'s message recorded", detail=lambda: delivery_status(db, case.case_id))
    for mid, text in bench.lis.received:
        if of_case(mid) == case.case_id and lis_results(text).get("TRIAGE-CALL") != str(expected.verdict):
            bench.violations.append(f"{case.case_id}: LIS message {mid} says {lis_results(text).get('TRIAGE-CALL')}"
                                    f", not {expected.verdict}")


def delivery_status(db: Path, case_id: str) -> set[str]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return {s for (s,) in conn.execute("select status from deliveries where case_id = ?", [case_id])}
    finally:
        conn.close()


def check_deliveries(bench: Bench, cases: list[Case]) -> None:
    """Every case's message arrived at least once, and one id never carried two different messages."""
    by_id: dict[str, set[str]] = {}
    for mid, text in bench.lis.received:
        by_id.setdefault(mid, set()).add(text)
    for mid, texts in by_id.items():
        if len(texts) > 1:
            calls = sorted({(lis_results(t).get("TRIAGE-CALL"), lis_results(t).get("TRIAGE-SCORE")) for t in texts})
            bench.violations.append(f"LIS message {mid} arrived as {len(texts)} different messages: {calls}")
    for case in cases:
        if not any(of_case(mid) == case.case_id for mid, _t in bench.lis.received):
            bench.violations.append(f"{case.case_id}: its LIS message never arrived")
    conn = sqlite3.connect(f"file:{bench.fs.mnt / 'appliance.db'}?mode=ro", uri=True)
    try:
        undelivered = conn.execute("select case_id, destination, status from deliveries "
                                   "where status != 'delivered'").fetchall()
    finally:
        conn.close()
    bench.violations += [f"{c}: its message to {d} is still {s} after the run" for c, d, s in undelivered]
    print(f"  LIS: {len(bench.lis.received)} messages received, {len(by_id)} distinct ids "
          f"({len(bench.lis.received) - len(by_id)} sent again after a cut)", flush=True)
