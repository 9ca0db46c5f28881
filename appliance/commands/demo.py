"""`appliance demo`: the daemon and the scanner emulator talking over a real pseudo-terminal.

The emulator writes the bundled case to the pty's master end; the daemon opens the slave end by its
device path with pyserial, exactly as it opens a USB serial scanner.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from firmware_bridge.emulator import ScannerEmulator, TileToSend
from firmware_bridge.transport import FdTransport

from appliance import RESEARCH_USE_NOTICE
from appliance.config import Settings
from appliance.offline.demo import DEMO_CASE, DEMO_CASE_MPP, case_info_for
from appliance.api.app import daemon_api
from appliance.service.daemon import Daemon
from appliance.service.events import EarlyPositive, Event, TileStored
from appliance.offline.progress import Progress
from appliance.offline.sources import DEFAULT_TILE_SIZE, iter_case_tiles
from appliance.terms import EventKind, rule_words, whose_threshold

# the events the demo prints a line for (the tile bar and the early call have their own lines)
SHOWN = frozenset({EventKind.READY, EventKind.API, EventKind.CASE_STARTED, EventKind.CASE_ENDED, EventKind.FINISHED,
                   EventKind.OUTPUTS, EventKind.ERROR, EventKind.FAILED})



@dataclass
class DemoOutcome:
    case_id: str
    verdict: str | None
    score: float | None
    tiles_sent: int
    tiles_stored: int
    exit_code: int


def run_demo(settings: Settings, *, case_path: Path = DEMO_CASE, tile_size: int = DEFAULT_TILE_SIZE,
             encoding: str = "zlib", timeout: float = 300, out=sys.stdout, tui: bool = False) -> DemoOutcome:
    """Stream the case and print the call. With ``tui`` the technician's terminal UI runs over the live
    daemon while the case streams (quit it with q), and the call is printed after it closes."""
    case_id = time.strftime("DEMO-%Y%m%d-%H%M%S")
    tiles = [TileToSend(t.x, t.y, t.pixels) for t in iter_case_tiles(case_path, tile_size)]
    info = case_info_for(case_id, "IDC-10253 (CC0 IDC dataset, demo)", tiles, DEMO_CASE_MPP, tile_size)

    master, slave = os.openpty()
    port = os.ttyname(slave)
    bar = Progress("tiles", len(tiles), out)
    lock = threading.Lock()
    tui_closed = threading.Event()

    def notify(event: Event) -> None:
        if tui and not tui_closed.is_set():
            return  # the terminal UI owns the screen
        with lock:
            match event:
                case TileStored():
                    d = daemon.cases.current
                    extra = f"processed {d.tiles_processed}  running score {d.score:.3f}" if d else ""
                    bar.update(event.received, extra)
                case EarlyPositive():
                    out.write(f"\nEARLY POSITIVE after {event.tiles} tiles: case score {event.score:.3f} "
                              f"passed the threshold (final: suspicious)\n")
                case _ if event.kind in SHOWN:
                    out.write(f"[{event.kind}] " + ", ".join(f"{k}={v}" for k, v in event.data().items()
                                                           if k != "model") + "\n")
            out.flush()

    out.write(f"Bench triage appliance demo. {RESEARCH_USE_NOTICE}\n")
    out.write(f"scanner emulator -> pty {port} -> daemon; case {case_path.name}: {len(tiles)} tiles of "
              f"{tile_size}px, encoding {encoding}\n")
    daemon = Daemon(settings, port=port, notify=notify, api=daemon_api)
    try:
        daemon.start()
        emulator = ScannerEmulator(FdTransport(master), info, tiles, encoding=encoding)
        if tui:
            sent = _stream_under_tui(emulator, f"http://{settings.api_host}:{daemon.api.port}", settings, timeout)
            tui_closed.set()
        else:
            sent = emulator.run()
        progress = daemon.wait_case(case_id, timeout)
        bar.close()
        if progress is not None:
            progress.outputs_done.wait(timeout)
        stored = len(daemon.store.tiles(case_id))
        row = daemon.store.get_case(case_id)
    finally:
        daemon.stop()
        for fd in (master, slave):
            try:
                os.close(fd)
            except OSError:
                pass
    if progress is None or progress.result is None:
        out.write(f"case {case_id} did not finish within {timeout:.0f} s\n")
        return DemoOutcome(case_id, None, None, sent.tiles_sent, stored, 1)
    r = progress.result
    out.write(format_verdict(r.to_dict(), case_id))
    if progress.outputs:
        folder = Path(next(iter(progress.outputs.values()))).parent
        out.write(f"outputs in {folder}: {', '.join(sorted(progress.outputs))}\n")
    out.write(f"case logged to {settings.db_path} (status {row['status']}, {stored}/{len(tiles)} tiles stored)\n")
    return DemoOutcome(case_id, r.verdict, r.score, sent.tiles_sent, stored, 0)


def _stream_under_tui(emulator: ScannerEmulator, url: str, settings: Settings, timeout: float):
    from appliance.tui.app import TriageApp

    done: dict = {}
    scanner = threading.Thread(target=lambda: done.setdefault("sent", emulator.run()), name="scanner", daemon=True)
    scanner.start()
    TriageApp(url, settings.token_path).run()
    scanner.join(timeout)
    if "sent" not in done:
        raise RuntimeError("the scanner emulator did not finish streaming the demo case")
    return done["sent"]


def format_verdict(result: dict, case_id: str) -> str:
    lines = [
        "",
        f"=== case {case_id}: {result['verdict'].upper()} ===",
        f"score {result['score']:.3f} ({rule_words(result['case_rule'], result['top_k'])}; threshold "
        f"{result['threshold']:.3f} ({whose_threshold(result)})); {len(result['patches'])} tissue patches scored from "
        f"{result['tiles']} tiles",
    ]
    if result["early_positive"]:
        lines.append(f"early positive call after {result['early_positive_after_tiles']} tiles")
    for reason in result["reasons"]:
        lines.append(f"cannot call: {reason['message']} [{reason['code']}]")
    for reason in result.get("warnings", []):
        lines.append(f"warning: {reason['message']} [{reason['code']}]")
    top = result.get("top_patches", [])[:5]
    if top:
        lines.append("tiles that drove the call: " + ", ".join(
            f"({p['x']},{p['y']}) p={p['probability']:.2f}" for p in top))
    m = result["model"]
    lines.append(f"model {m['name']} {m['version']} sha256 {m['sha256'][:16]}... on {m['backend']}")
    t = result["timings_ms"]
    lines.append("timings ms: " + json.dumps(t))
    lines.append(RESEARCH_USE_NOTICE)
    return "\n".join(lines) + "\n"
