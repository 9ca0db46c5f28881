"""Streaming latency: tiles fed at a steady rate through the real daemon; time from the last tile's ACK to
the verdict, per case, p50/p95.

The scanner emulator writes to a real pty at ``--rate`` tiles/s (a generator paces it); the daemon reads the
other end with pyserial, spools, ACKs and triages as in production. The last tile's ACK is taken when the
daemon's sink returns for it (the link sends the ACK right after); the verdict when the pipeline reports
the case finished (stored in SQLite). Output files are written after the verdict and are not counted.

    python bench/stream.py [--cases 10] [--rate 40] [--tile-size 200] [--json bench/results/stream.json]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

from appliance.config import load_settings
from appliance.service.daemon import Daemon
from appliance.service.events import CaseFinished, Event, TileStored
from appliance.offline.demo import DEMO_CASE, DEMO_CASE_MPP, case_info_for
from appliance.offline.sources import iter_case_tiles
from firmware_bridge.emulator import ScannerEmulator, TileToSend
from firmware_bridge.transport import FdTransport
from report import write_json  # noqa: E402  (bench/ is the script's folder)


def paced(tiles, rate: float):
    t0 = time.perf_counter()
    for i, t in enumerate(tiles):
        delay = t0 + i / rate - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        yield t


def percentile(xs, q):
    xs = sorted(xs)
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=10)
    ap.add_argument("--rate", type=float, default=40.0, help="tiles per second from the scanner")
    ap.add_argument("--tile-size", type=int, default=200)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    tiles = [TileToSend(t.x, t.y, t.pixels) for t in iter_case_tiles(DEMO_CASE, args.tile_size)]
    last_tile: dict[str, float] = {}
    finished: dict[str, float] = {}
    verdicts: dict[str, str] = {}
    lock = threading.Lock()

    def notify(event: Event) -> None:
        now = time.perf_counter()
        with lock:
            if isinstance(event, TileStored):
                last_tile[event.case_id] = now
            elif isinstance(event, CaseFinished):
                finished[event.case_id] = now
                verdicts[event.case_id] = event.verdict

    master, slave = os.openpty()
    with tempfile.TemporaryDirectory() as tmp:
        settings = load_settings(None, data_dir=Path(tmp), api_port=0)
        daemon = Daemon(settings, port=os.ttyname(slave), notify=notify)
        daemon.start()
        lat = []
        try:
            for i in range(args.cases):
                case_id = f"STREAM-{i:03d}"
                info = case_info_for(case_id, "stream bench", tiles, DEMO_CASE_MPP, args.tile_size)
                ScannerEmulator(FdTransport(master), info, paced(tiles, args.rate), encoding="raw").run()
                progress = daemon.wait_case(case_id, 120)
                if progress is None:
                    raise SystemExit(f"case {case_id} did not finish")
                progress.outputs_done.wait(120)
                lat.append(finished[case_id] - last_tile[case_id])
                print(f"case {case_id}: {len(tiles)} tiles at {args.rate:g}/s, verdict {verdicts[case_id]}, "
                      f"last ACK -> verdict {lat[-1] * 1e3:.0f} ms", flush=True)
        finally:
            daemon.stop()
            os.close(master)
            os.close(slave)
    res = {"cases": args.cases, "tiles_per_case": len(tiles), "tile_px": args.tile_size, "rate_tiles_per_s": args.rate,
           "latency_s": [round(x, 4) for x in lat], "p50_s": round(statistics.median(lat), 4),
           "p95_s": round(percentile(lat, 0.95), 4), "max_s": round(max(lat), 4)}
    print(f"\nlast tile ACK -> verdict over {args.cases} cases: p50 {res['p50_s'] * 1e3:.0f} ms, "
          f"p95 {res['p95_s'] * 1e3:.0f} ms, max {res['max_s'] * 1e3:.0f} ms   (target p95 <= 1 s)")
    write_json(args.json, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
