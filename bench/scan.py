"""The real scan: a 3-core biopsy at 40x (0.25 um/px) or 20x as 1024-px JPEG tiles, streamed at a scanner's
pace over a real pty through the real daemon; and the CPU a lab should put beside the scanner.

Each case is made from the bundled demo slide (appliance.offline.scans.core_biopsy: three 1 x 8 mm cores
from its most tissue-rich strips, chosen by the case's seed, upsampled with sensor noise, JPEG quality 80,
compressed before the run as a scanner's hardware does). The emulator sends them at ``--pace`` mm^2 of
scanned area per minute (90: a current scanner at 40x) from this process; the daemon runs in a child
process of its own (so its CPU time and peak RSS are its own), with OpenVINO capped by ONEDNN_MAX_CPU_ISA
(its non-quantized layers then forced to f32: under a cap OpenVINO still picks bf16 and emulates it) and
pinned to ``cores`` CPUs.

Two measurements per ISA cap:
- paced (the done-means): for every case, the time from the last tile's ACK to the verdict, the tiles still
  waiting for the model when the last one was ACKed (the daemon kept up if 0 or a few), the daemon's CPU
  seconds, and at the end its peak RSS; the link's MB/s over the case.
- capacity: one case sent as fast as the link takes it, on 1 and on 2 cores: tiles/s through link, spool
  and model, as mm^2 of 40x scan a minute, the case size that bench PC calls within a minute of scanning.

    python bench/scan.py                 # the full run (about 20 min here): 5 cases x 3 caps, and 20x
    python bench/scan.py --quick         # a candidate bench PC: 2 smaller cases, its own CPU, ~3 min
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from firmware_bridge.emulator import JpegTile, ScannerEmulator  # noqa: E402
from firmware_bridge.transport import FdTransport  # noqa: E402
from report import write_json  # noqa: E402
from stream import paced, percentile  # noqa: E402

CAPS = ["", "AVX2_VNNI", "AVX2"]  # "": this CPU as it is
TILE = 1024


# ------------------------------------------------------------------------------------------ the daemon side
def serve(port: str, cores: int) -> None:
    """The child: the daemon on ``port``, one JSON line on stdout per finished case, until stdin closes."""
    os.sched_setaffinity(0, set(sorted(os.sched_getaffinity(0))[:cores]))
    from appliance.config import load_settings
    from appliance.model.engine import load_engine
    from appliance.service.daemon import Daemon
    from appliance.service.events import CaseFinished, CaseStarted, OutputsWritten, TileStored

    capped = bool(os.environ.get("ONEDNN_MAX_CPU_ISA"))
    engine = load_engine(ROOT / "models" / "idc-resnet", "openvino", precision="f32" if capped else None)
    seen: dict[str, dict] = {}
    lock = threading.Lock()
    daemon: Daemon | None = None

    def notify(event) -> None:
        now, cpu = time.monotonic(), time.process_time()
        with lock:
            case = seen.setdefault(event.case_id, {}) if hasattr(event, "case_id") else None
            if isinstance(event, CaseStarted):
                case.update(cpu0=cpu, first=None)
            elif isinstance(event, TileStored):
                case["first"] = case.get("first") or now
                case["last_ack"] = now
                progress = daemon.pipeline.book.get(event.case_id)
                case["waiting"] = progress.tiles_received - progress.tiles_processed
                case["tiles"] = progress.tiles_received
            elif isinstance(event, CaseFinished):
                case.update(verdict_at=now, verdict=event.verdict, cpu_verdict=cpu)
            elif isinstance(event, OutputsWritten):
                line = {"case": event.case_id, "verdict": case["verdict"], "tiles": case["tiles"],
                        "ack_to_verdict_s": round(case["verdict_at"] - case["last_ack"], 4),
                        "waiting_at_last_ack": case["waiting"],
                        "first_ack_to_verdict_s": round(case["verdict_at"] - case["first"], 3),
                        "cpu_to_verdict_s": round(case["cpu_verdict"] - case["cpu0"], 2),
                        "cpu_s": round(cpu - case["cpu0"], 2)}
                print(json.dumps(line), flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        settings = load_settings(None, data_dir=Path(tmp), api_port=0)
        daemon = Daemon(settings, port=port, notify=notify, engine=engine)
        daemon.start()
        print(json.dumps({"ready": True, "cpus": sorted(os.sched_getaffinity(0))}), flush=True)
        sys.stdin.read()  # until the bench closes it
        daemon.stop()
    print(json.dumps({"peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                      "cpu_s": round(time.process_time(), 2)}), flush=True)


# ------------------------------------------------------------------------------------------ the scanner side
def run_config(cases: list, cap: str, cores: int, rate: float | None, magnification: str) -> dict:
    """Stream ``cases`` to a daemon capped at ``cap`` on ``cores`` CPUs, at ``rate`` tiles/s (None: as fast
    as the link takes them); returns the daemon's lines and the link's figures."""
    from appliance.offline.scans import SCANNER_MPP
    from firmware_bridge.sink import CaseInfo

    master, slave = os.openpty()
    env = dict(os.environ)
    env.pop("ONEDNN_MAX_CPU_ISA", None)
    if cap:
        env["ONEDNN_MAX_CPU_ISA"] = cap
    child = subprocess.Popen([sys.executable, __file__, "--serve", os.ttyname(slave), "--cores", str(cores)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    try:
        ready = json.loads(child.stdout.readline())
        assert ready.get("ready") and len(ready["cpus"]) == cores, f"the daemon did not start as asked: {ready}"
        lines = []
        for n, (tiles, width, height) in enumerate(cases):
            case_id = f"SCAN-{magnification}-{cap or 'native'}-{cores}c-{n}"
            info = CaseInfo(case_id, f"S-{n}", "brightfield-he", SCANNER_MPP[magnification], TILE, TILE,
                            expected_tiles=len(tiles), image_width=width, image_height=height)
            send = [JpegTile(x, y, TILE, TILE, data) for x, y, data in tiles]
            t0 = time.monotonic()
            ScannerEmulator(FdTransport(master), info, paced(send, rate) if rate else send, encoding="jpeg").run()
            sent_s = time.monotonic() - t0
            line = json.loads(child.stdout.readline())
            line["link_mb_per_s"] = round(sum(len(d) for *_, d in tiles) / 1e6 / sent_s, 2)
            line["sending_s"] = round(sent_s, 2)
            lines.append(line)
            print(f"  {case_id}: {line['tiles']} tiles, {line['verdict']}, last ACK -> verdict "
                  f"{line['ack_to_verdict_s'] * 1e3:.0f} ms, {line['waiting_at_last_ack']} waiting, "
                  f"daemon CPU {line['cpu_s']} s, link {line['link_mb_per_s']} MB/s", flush=True)
        child.stdin.close()
        tail = json.loads(child.stdout.readline())
    finally:
        if child.poll() is None:
            if not child.stdin.closed:
                child.stdin.close()
            child.wait(120)
        os.close(master)
        os.close(slave)
    return {"cases": lines, **tail}


def area_mm2(magnification: str) -> float:
    from appliance.offline.scans import SCANNER_MPP

    return (TILE * SCANNER_MPP[magnification] / 1000) ** 2  # one tile


def summarise(res: dict, magnification: str, rate: float | None) -> dict:
    lat = [c["ack_to_verdict_s"] for c in res["cases"]]
    out = {"p50_s": round(statistics.median(lat), 3), "p95_s": round(percentile(lat, 0.95), 3),
           "max_waiting": max(c["waiting_at_last_ack"] for c in res["cases"]),
           "cpu_s_per_case": round(statistics.mean(c["cpu_s"] for c in res["cases"]), 1),
           # the daemon's CPU per tile up to the verdict (link, spool, decode, model; not the files after)
           "cpu_ms_per_tile": round(1e3 * statistics.mean(c["cpu_to_verdict_s"] / c["tiles"] for c in res["cases"]), 2),
           "peak_rss_mb": res["peak_rss_mb"],
           "link_mb_per_s": round(statistics.mean(c["link_mb_per_s"] for c in res["cases"]), 2)}
    if rate is None:  # as fast as it goes: the daemon's capacity
        per_s = statistics.mean(c["tiles"] / c["first_ack_to_verdict_s"] for c in res["cases"])
        out.update(tiles_per_s=round(per_s, 1), mm2_per_min=round(per_s * area_mm2(magnification) * 60, 1))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--serve", help=argparse.SUPPRESS)
    ap.add_argument("--cores", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="this CPU only, 2 cases of 1 x 3 mm cores, no 20x")
    ap.add_argument("--cases", type=int, default=5)
    ap.add_argument("--pace", type=float, default=90.0, help="mm^2 of scanned area per minute")
    ap.add_argument("--caps", default=",".join(c or "native" for c in CAPS))
    ap.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "scan.json")
    args = ap.parse_args(argv)
    if args.serve:
        serve(args.serve, args.cores)
        return 0

    import tifffile

    from appliance.offline.demo import DEMO_CASE
    from appliance.offline.scans import core_biopsy

    slide = tifffile.imread(DEMO_CASE)
    caps = ["" if c == "native" else c for c in args.caps.split(",")]
    n_cases, core = (2, (1.0, 3.0)) if args.quick else (args.cases, (1.0, 8.0))
    if args.quick:
        caps = [""]
    mags = ["40x"] if args.quick else ["40x", "20x"]
    result = {"pace_mm2_per_min": args.pace, "tile_px": TILE, "jpeg_quality": 80, "cores": args.cores,
              "cpu": _cpu_name(), "runs": []}
    for mag in mags:
        print(f"making {n_cases} {mag} cases of 3 cores {core[0]:g} x {core[1]:g} mm ...", flush=True)
        cases = [core_biopsy(slide, mag, seed=39 + i, core_mm=core) for i in range(n_cases)]
        rate = args.pace / 60 / area_mm2(mag)
        for cap in (caps if mag == "40x" else [""]):
            print(f"{mag}, {cap or 'native ISA'}, {args.cores} cores, paced at {rate:.1f} tiles/s:", flush=True)
            res = run_config(cases, cap, args.cores, rate, mag)
            result["runs"].append({"magnification": mag, "cap": cap or "native", "cores": args.cores,
                                   "rate_tiles_per_s": round(rate, 2), "mode": "paced",
                                   **summarise(res, mag, rate), "detail": res})
    # capacity, on every run (quick too): one case as fast as the link takes it
    cases = [core_biopsy(slide, "40x", seed=99, core_mm=core)]
    for cap in caps:
        for cores in sorted({1, args.cores}):
            print(f"capacity: 40x, {cap or 'native ISA'}, {cores} core(s), unpaced:", flush=True)
            res = run_config(cases, cap, cores, None, "40x")
            result["runs"].append({"magnification": "40x", "cap": cap or "native", "cores": cores,
                                   "mode": "capacity", **summarise(res, "40x", None), "detail": res})
    _table(result)
    write_json(args.json, result)
    return 0


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def _table(result: dict) -> None:
    print(f"\n{result['cpu']}; pace {result['pace_mm2_per_min']:g} mm^2/min; JPEG q80 tiles of {TILE} px")
    print(f"{'mode':<9}{'mag':<5}{'ISA cap':<11}{'cores':>5}{'p50 ms':>8}{'p95 ms':>8}{'waiting':>8}"
          f"{'CPU s':>7}{'ms/tile':>8}{'RSS MB':>8}{'MB/s':>7}{'tiles/s':>8}{'mm2/min':>9}")
    for r in result["runs"]:
        print(f"{r['mode']:<9}{r['magnification']:<5}{r['cap']:<11}{r['cores']:>5}{r['p50_s'] * 1e3:>8.0f}"
              f"{r['p95_s'] * 1e3:>8.0f}{r['max_waiting']:>8}{r['cpu_s_per_case']:>7}{r['cpu_ms_per_tile']:>8}"
              f"{r['peak_rss_mb']:>8.0f}"
              f"{r['link_mb_per_s']:>7}{r.get('tiles_per_s', ''):>8}{r.get('mm2_per_min', ''):>9}")


if __name__ == "__main__":
    sys.exit(main())
