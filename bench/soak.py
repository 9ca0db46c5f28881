"""Soak: N cases back to back through one `appliance run` process; its resident memory after each case.

`appliance run` runs as a subprocess (as systemd runs it) on a PtyCable; per case the scanner emulator
streams the bundled demo case (appliance/offline/demo_case/idc-10253.tif, 2500x2000, 130 tiles of 200 px, or a
``--crop`` of it) under a new case id. After each case is finished and its output files are written (the
'finished' and 'outputs' events in the daemon's SQLite), the daemon's VmRSS is read from /proc/PID/status.
Memory growth is judged from case 10 on (the first cases warm the allocator, OpenVINO and the caches):

    rss_growth = (rss at case N - rss at case 10) / rss at case 10

    python bench/soak.py [--cases 100] [--crop 1000] [--encoding raw] [--json bench/results/soak.json]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

from appliance.offline.demo import DEMO_CASE, case_info_for
from appliance.offline.sources import iter_case_tiles
from firmware_bridge import PtyCable
from firmware_bridge.emulator import ScannerEmulator, TileToSend
from report import write_json  # noqa: E402  (bench/ is the script's folder)

MODEL_DIR = ROOT / "models" / "idc-resnet"
BASELINE_CASE = 10  # growth is measured from here (warm-up before)
SETTLE_S = 0.1  # idle after a case's last event ('outputs', told once the pipeline has released the case)


def vm_rss_kb(pid: int) -> int:
    """VmRSS of a process in kB, from /proc/PID/status."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def demo_tiles(crop: int | None, tile_size: int = 200) -> list[TileToSend]:
    tiles = [TileToSend(t.x, t.y, t.pixels) for t in iter_case_tiles(DEMO_CASE, tile_size)]
    if crop:
        tiles = [t for t in tiles if t.x + t.pixels.shape[1] <= crop and t.y + t.pixels.shape[0] <= crop]
    return tiles


class DaemonProcess:
    """`appliance run` on a PtyCable, its stderr drained (and kept) by a thread."""

    def __init__(self, data: Path, cable: PtyCable):
        env = dict(os.environ, APPLIANCE_DATA_DIR=str(data), APPLIANCE_MODEL_DIR=str(MODEL_DIR),
                   APPLIANCE_API_PORT="0")
        env.pop("NOTIFY_SOCKET", None)
        self.proc = subprocess.Popen([sys.executable, "-m", "appliance.cli", "run", "--port", str(cable.path)],
                                     env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True)
        self.lines: list[str] = []
        deadline = time.monotonic() + 120
        while "[ready]" not in (line := self.proc.stderr.readline()):
            if not line or time.monotonic() > deadline:
                raise RuntimeError("appliance run died before it was ready:\n" + "".join(self.lines[-20:]))
            self.lines.append(line)
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        for line in self.proc.stderr:
            if not line.startswith("[tile]"):
                self.lines.append(line)
                del self.lines[:-200]

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait()


def wait_done(db_path: Path, case_id: str, timeout: float = 300) -> dict:
    """Poll the daemon's SQLite (read-only) until the case has its verdict and its files are written."""
    deadline = time.monotonic() + timeout
    db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=10)
    db.row_factory = sqlite3.Row
    try:
        while time.monotonic() < deadline:
            row = db.execute("select status, verdict, score from cases where id = ?", [case_id]).fetchone()
            if row is not None and row["status"] not in ("receiving", "processing"):
                kinds = {r[0] for r in db.execute("select kind from events where case_id = ?", [case_id])}
                if "outputs" in kinds or "error" in kinds or row["status"] in ("failed", "abandoned"):
                    return dict(row)
            time.sleep(0.05)
    finally:
        db.close()
    raise TimeoutError(f"case {case_id} not finished within {timeout} s")


def soak(cases: int, crop: int | None, encoding: str, out=print) -> dict:
    tiles = demo_tiles(crop)
    tmp = Path(tempfile.mkdtemp(prefix="soak-"))
    cable = PtyCable(tmp / "scanner")
    data = tmp / "var"
    daemon = DaemonProcess(data, cable)
    series, verdicts, seconds = [], [], []
    t_start = time.monotonic()
    try:
        out(f"soak: {cases} cases of {len(tiles)} tiles ({encoding}) through `appliance run` pid {daemon.proc.pid}; "
            f"RSS at start {vm_rss_kb(daemon.proc.pid) / 1024:.1f} MB")
        out(f"  {'case':>5} {'verdict':>17} {'s':>6} {'VmRSS MB':>9}")
        for i in range(1, cases + 1):
            case_id = f"SOAK-{i:04d}"
            t0 = time.monotonic()
            info = case_info_for(case_id, f"S-{i:04d}", tiles, 4.0, 200)
            ScannerEmulator(cable, info, tiles, encoding=encoding, ack_timeout=5.0).run()
            row = wait_done(data / "appliance.db", case_id)
            time.sleep(SETTLE_S)
            if daemon.proc.poll() is not None:
                raise RuntimeError("the daemon died:\n" + "".join(daemon.lines[-20:]))
            rss = vm_rss_kb(daemon.proc.pid)
            series.append(rss)
            verdicts.append(row["verdict"])
            seconds.append(time.monotonic() - t0)
            if i <= 3 or i % 10 == 0 or i == cases:
                out(f"  {i:>5} {str(row['verdict']):>17} {seconds[-1]:>6.2f} {rss / 1024:>9.1f}")
    finally:
        rc = daemon.stop()
        cable.close()
        shutil.rmtree(tmp, ignore_errors=True)
    base = min(BASELINE_CASE, cases)
    rss_base, rss_last = series[base - 1], series[-1]
    growth = (rss_last - rss_base) / rss_base
    res = {
        "cases": cases,
        "tiles_per_case": len(tiles),
        "encoding": encoding,
        "crop": crop,
        f"rss{base}_kb": rss_base,
        f"rss{cases}_kb": rss_last,
        "rss_growth": round(growth, 5),
        "rss_series_kb": series,
        "case_seconds": [round(s, 3) for s in seconds],
        "verdicts": sorted(set(map(str, verdicts))),
        "wall_s": round(time.monotonic() - t_start, 1),
        "daemon_exit_code": rc,
    }
    out("")
    out(f"  RSS at case {base:<4} {rss_base / 1024:8.1f} MB")
    out(f"  RSS at case {cases:<4} {rss_last / 1024:8.1f} MB")
    out(f"  peak RSS      {max(series) / 1024:8.1f} MB")
    out(f"  rss_growth    {growth * 100:+8.2f} %   target < 5 %")
    out(f"  {cases} cases in {res['wall_s']:.0f} s; daemon exit code {rc}")
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=100)
    ap.add_argument("--crop", type=int, default=None,
                    help="Only the tiles inside the top-left CROP x CROP pixels of the demo case (default: all).")
    ap.add_argument("--encoding", choices=["raw", "zlib", "png", "jpeg"], default="raw")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.cases < 1:
        ap.error("--cases must be at least 1")
    res = soak(args.cases, args.crop, args.encoding, out=lambda s: print(s, flush=True))
    write_json(args.json, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
