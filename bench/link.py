"""Scanner-link throughput over a real pty: MB/s and tiles/s of tile pixels the host hands to its sink.

The scanner emulator runs in a child process (as a real scanner is another machine) with its
payloads encoded before the clock starts; the host (HostLink, as the daemon runs it, sha256
of every tile included) runs here with a sink that only counts. The clock runs at the host
from CASE_BEGIN to CASE_END. Tiles are cut from the bundled H&E case. 1 MB = 10^6 bytes.

    .venv/bin/python bench/link.py [--json PATH] [--tile-size 256] [--tiles 300] [--profile DIR]
"""

from __future__ import annotations

import argparse
import cProfile
import json
import multiprocessing as mp
import os
import platform
import pstats
import threading
import time
import tty
from pathlib import Path

import numpy as np
import tifffile

ROOT = Path(__file__).resolve().parents[1]

from firmware_bridge.emulator import ScannerEmulator, TileToSend
from firmware_bridge.host import HostLink
from firmware_bridge.sink import CaseInfo, TileReceived
from firmware_bridge.messages import CaseBegin
from firmware_bridge.transport import FdTransport, open_port

CASE_TIF = ROOT / "appliance" / "offline" / "demo_case" / "idc-10253.tif"
ENCODINGS = ["raw", "zlib", "png", "jpeg"]


class CountingSink:
    """Stores nothing: counts pixel bytes and times the case at the host."""

    def __init__(self) -> None:
        self.tiles = 0
        self.pixel_bytes = 0
        self.payload_bytes = 0
        self.began = self.ended = 0.0
        self.cpu_began = self.cpu_ended = 0.0
        self.done = threading.Event()

    def case_began(self, info: CaseInfo) -> None:
        self.began, self.cpu_began = time.perf_counter(), time.process_time()

    def tile_received(self, tile: TileReceived) -> None:
        self.tiles += 1
        self.pixel_bytes += tile.pixels.nbytes
        self.payload_bytes += tile.payload_size

    def case_ended(self, case_id: str, tile_count: int) -> None:
        self.ended, self.cpu_ended = time.perf_counter(), time.process_time()
        self.done.set()


class ProfiledHostLink(HostLink):
    """HostLink whose reader thread runs under cProfile (cProfile only sees its own thread)."""

    profile_path: Path | None = None

    def _pump(self) -> None:
        profiler = cProfile.Profile()
        try:
            profiler.runcall(super()._pump)
        finally:
            if self.profile_path is not None:
                profiler.dump_stats(self.profile_path)


def he_tiles(size: int, count: int) -> list[TileToSend]:
    """count size x size tiles of tissue (mostly-white glass skipped), cycling over the slide."""
    image = tifffile.imread(CASE_TIF)
    h, w = image.shape[:2]
    tissue = []
    for y in range(0, h - size + 1, size):
        for x in range(0, w - size + 1, size):
            tile = np.ascontiguousarray(image[y : y + size, x : x + size, :3])
            if tile.mean() < 225:
                tissue.append(tile)
    if not tissue:
        raise SystemExit(f"no tissue tiles of {size} px in {CASE_TIF}")
    cols = max(1, int(np.sqrt(count)))
    return [TileToSend((i % cols) * size, (i // cols) * size, tissue[i % len(tissue)]) for i in range(count)]


def _scan(master: int, case: CaseBegin, tiles, encoding: str, window: int, go, report, profile_dir) -> None:
    """Child process: the scanner. Encodes everything, waits for the host, then streams."""
    transport = FdTransport(master, timeout=0.05, write_timeout=30.0)
    emulator = ScannerEmulator(transport, case, tiles, encoding=encoding, window=window, pre_encode=True,
                               heartbeat_interval=0)
    go.wait()
    profiler = cProfile.Profile() if profile_dir else None
    if profiler:
        profiler.enable()
    result = emulator.run()
    if profiler:
        profiler.disable()
        profiler.dump_stats(Path(profile_dir) / f"scanner-{encoding}.prof")
    report.send({"frames_written": result.frames_written, "retransmits": result.retransmits})


def run_one(tiles: list[TileToSend], encoding: str, window: int, hash_tiles: bool, profile_dir: str | None) -> dict:
    size = tiles[0].pixels.shape[0]
    case = CaseBegin(f"BENCH-{encoding}", "bench", "brightfield-HE", 4.0, size, size, expected_tiles=len(tiles))
    master, slave = os.openpty()
    tty.setraw(slave)
    ctx = mp.get_context("fork")  # before any thread starts here, so the child inherits none
    go, (report_r, report_w) = ctx.Event(), ctx.Pipe(duplex=False)
    child = ctx.Process(target=_scan, args=(master, case, tiles, encoding, window, go, report_w, profile_dir))
    child.start()
    sink = CountingSink()
    link_cls = ProfiledHostLink if profile_dir else HostLink
    link = link_cls(open_port(os.ttyname(slave), timeout=0.05), sink, read_timeout=0.05, hash_tiles=hash_tiles)
    if profile_dir:
        link.profile_path = Path(profile_dir) / f"host-{encoding}.prof"
    link.start()
    try:
        go.set()
        if not sink.done.wait(600):
            raise SystemExit(f"{encoding}: the case did not end within 600 s")
        scanner = report_r.recv()
    finally:
        # The parent's copy of the master keeps the pty up when the child exits, so the
        # host stops cleanly instead of reading a hang-up.
        link.stop()
        child.join(30)
        os.close(master)
        os.close(slave)
    seconds = sink.ended - sink.began
    return {
        "tiles": sink.tiles,
        "tile_size": size,
        "seconds": round(seconds, 4),
        "pixel_mb": round(sink.pixel_bytes / 1e6, 3),
        "payload_mb": round(sink.payload_bytes / 1e6, 3),
        "mb_per_s": round(sink.pixel_bytes / 1e6 / seconds, 2),
        "payload_mb_per_s": round(sink.payload_bytes / 1e6 / seconds, 2),
        "tiles_per_s": round(sink.tiles / seconds, 1),
        "compression": round(sink.pixel_bytes / sink.payload_bytes, 2),
        "host_cpu_share": round((sink.cpu_ended - sink.cpu_began) / seconds, 2),
        "retransmits": scanner["retransmits"],
    }


def _print_profile(path: Path, top: int) -> None:
    print(f"\n--- {path.name}: top {top} by own time")
    pstats.Stats(str(path)).sort_stats("tottime").print_stats(top)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write the results here as JSON")
    parser.add_argument("--tile-size", type=int, default=256)
    parser.add_argument("--tiles", type=int, default=300, help="tiles per encoding (default 300)")
    parser.add_argument("--encodings", default=",".join(ENCODINGS))
    parser.add_argument("--window", type=int, default=4, help="scanner window (default 4, the emulator's)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per encoding; the best is reported")
    parser.add_argument("--no-hash", action="store_true", help="skip the host's per-tile sha256")
    parser.add_argument("--profile", metavar="DIR", help="cProfile both ends into DIR and print the top entries")
    args = parser.parse_args(argv)

    tiles = he_tiles(args.tile_size, args.tiles)
    if args.profile:
        Path(args.profile).mkdir(parents=True, exist_ok=True)
        args.repeat = 1
    encodings = [e.strip() for e in args.encodings.split(",") if e.strip()]
    results = {}
    for encoding in encodings:
        runs = [run_one(tiles, encoding, args.window, not args.no_hash, args.profile) for _ in range(args.repeat)]
        results[encoding] = max(runs, key=lambda r: r["mb_per_s"])

    print(f"scanner link over a pty: {args.tiles} H&E tiles of {args.tile_size}x{args.tile_size} px per encoding, "
          f"window {args.window}, best of {args.repeat}, host sha256 {'off' if args.no_hash else 'on'}")
    print(f"{'encoding':<9}{'pixel MB/s':>11}{'tiles/s':>9}{'wire MB/s':>11}{'ratio':>7}{'host CPU':>10}{'seconds':>9}")
    for encoding, r in results.items():
        print(f"{encoding:<9}{r['mb_per_s']:>11.1f}{r['tiles_per_s']:>9.0f}{r['payload_mb_per_s']:>11.1f}"
              f"{r['compression']:>7.1f}{r['host_cpu_share']:>9.0%}{r['seconds']:>9.2f}")
    report = {
        **({"raw_mb_per_s": results["raw"]["mb_per_s"]} if "raw" in results else {}),
        **{f"{e}_mb_per_s": r["mb_per_s"] for e, r in results.items()},
        "encodings": results,
        "tile_size": args.tile_size,
        "tiles_per_encoding": args.tiles,
        "window": args.window,
        "host_sha256": not args.no_hash,
        "mb": "10^6 bytes of decoded RGB pixels delivered to the host's sink per second",
        "source": str(CASE_TIF.relative_to(ROOT)),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
    }
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {args.json}")
    if args.profile:
        for encoding in encodings:
            for side in ("host", "scanner"):
                _print_profile(Path(args.profile) / f"{side}-{encoding}.prof", 12)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
