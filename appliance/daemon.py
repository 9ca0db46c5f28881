"""The daemon: link -> spool -> pipeline -> store, with the status API alongside.

Threads: the link's reader thread spools each tile durably (then the link ACKs it) and hands it to
the pipeline thread through a queue, so inference never holds up the serial link. The store's writer
thread is the only one that writes SQLite; uvicorn serves the API from its own thread.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import queue
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from firmware_bridge.errors import LinkError
from firmware_bridge.host import CaseInfo, CaseRefused, HostLink, TileReceived

from .api.app import ApiServer, create_app
from .config import Settings
from .engine import Engine, load_engine
from .events import EventHub
from .errors import ApplianceError, ManifestError, ModelIntegrityError
from .pipeline import TriageResult, TriageSession
from .spool import TileSpool
from .store import CaseStore

log = logging.getLogger("appliance.daemon")

Notify = Callable[[str, dict], None]


LIVE_QC_EVERY = 8  # tiles between live QC checks (focus and exposure; the stain is judged at the end)
# Finished cases the receiver keeps in memory (wait_case, the latest call in /status); older ones are in the
# store only. Without a bound every case's result (its ~1,000 patch scores) stayed in memory for good.
FINISHED_CASES_KEPT = 16


def eta_seconds(progress: "CaseProgress", now: float) -> float | None:
    """Seconds until every expected tile is processed, at the rate seen so far in this case; None when the
    scanner did not say how many tiles to expect or nothing is processed yet."""
    if progress.result is not None:
        return 0.0
    if not progress.tiles_expected or progress.tiles_processed <= 0:
        return None
    rate = progress.tiles_processed / max(now - progress.started, 1e-3)
    return round(max(progress.tiles_expected - progress.tiles_processed, 0) / rate, 1)


@dataclass
class CaseProgress:
    """What the daemon knows about the case in flight (read by the API and the demo's progress line)."""

    case_id: str
    specimen_id: str
    tiles_expected: int | None
    info: CaseInfo | None = None
    tiles_received: int = 0
    tiles_processed: int = 0
    score: float = 0.0
    early_positive: bool = False
    result: TriageResult | None = None
    last_activity: float = field(default_factory=time.monotonic)  # CASE_BEGIN or the latest tile
    started: float = field(default_factory=time.monotonic)
    warnings: list[dict] = field(default_factory=list)  # live QC (focus, exposure) while the scan goes on
    ended: bool = False  # CASE_END received
    abandoned: str | None = None  # why, once abandoned
    outputs: dict[str, str] = field(default_factory=dict)
    outputs_done: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)


def release_free_memory() -> None:
    """Hand the heap pages a finished case freed back to the OS (glibc's malloc_trim; a no-op elsewhere).

    A case allocates tens of MB of short-lived buffers (mosaic, heatmap, output pyramids) on the pipeline
    thread; glibc keeps freed pages in its arenas and raises its mmap threshold after the first large free,
    so without a trim the daemon's RSS steps up by a case's working set at a random case and stays there."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim():
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


class PipelineWorker:
    """Runs one TriageSession per case on its own thread, fed tile by tile through a queue."""

    def __init__(self, engine: Engine, store: CaseStore, batch_size: int, notify: Notify, cases_dir: Path):
        self.engine = engine
        self.store = store
        self.cases_dir = Path(cases_dir)
        self.batch_size = batch_size
        self.notify = notify
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="pipeline", daemon=True)
        self._sessions: dict[str, TriageSession] = {}
        self.beat = time.monotonic()  # last time the loop was between items (idle or done with one)
        self.hang = threading.Event()  # fault injection: the loop blocks forever once this is set

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=0.1 if self.hang.is_set() else 60)

    def begin(self, progress: CaseProgress) -> None:
        self._queue.put(("begin", progress))

    def tile(self, progress: CaseProgress, x: int, y: int, pixels: np.ndarray) -> None:
        self._queue.put(("tile", progress, x, y, pixels))

    def end(self, progress: CaseProgress) -> None:
        self._queue.put(("end", progress))

    def abandon(self, progress: CaseProgress) -> None:
        self._queue.put(("abandon", progress))

    def alive(self, stall_after: float) -> tuple[bool, str]:
        """(healthy, why not): the thread runs and has not spent longer than stall_after on one item."""
        if not self._thread.is_alive():
            return False, "pipeline thread has stopped"
        busy = time.monotonic() - self.beat
        if busy > stall_after:
            return False, f"pipeline has made no progress for {busy:.0f} s"
        return True, ""

    def _next(self):
        while True:
            if self.hang.is_set():
                threading.Event().wait()  # injected fault: hang like a stuck model would; beat goes stale
            self.beat = time.monotonic()
            try:
                return self._queue.get(timeout=0.5)
            except queue.Empty:
                continue

    def _run(self) -> None:
        while (item := self._next()) is not None:
            kind, progress = item[0], item[1]
            try:
                if kind == "begin":
                    info = progress.info
                    self._sessions[progress.case_id] = TriageSession(
                        self.engine,
                        batch_size=self.batch_size,
                        on_event=lambda k, d, p=progress: self._session_event(p, k, d),
                        scanner_mpp=info.microns_per_pixel if info else None,
                        width=info.image_width if info else None,
                        height=info.image_height if info else None,
                        workdir=self.cases_dir / progress.case_id / ".work",
                    )
                elif kind == "tile":
                    session = self._sessions.get(progress.case_id)
                    if session is None:  # abandoned while this tile was in flight; it stays in the spool
                        continue
                    session.add_tile(item[2], item[3], item[4])
                    progress.tiles_processed = session.tiles
                    progress.score = session.score
                    if session.tiles % LIVE_QC_EVERY == 0:
                        progress.warnings = [{"code": r.code, "message": r.message}
                                             for r in session.qc.reasons(None)]
                elif kind == "end":
                    self._finish(progress)
                elif kind == "abandon":
                    session = self._sessions.pop(progress.case_id, None)
                    if session is not None:
                        session.close()
                    self.store.case_abandoned(progress.case_id, progress.abandoned or "abandoned")
                    progress.done.set()
                    progress.outputs_done.set()
                    self.notify("abandoned", {"case_id": progress.case_id, "reason": progress.abandoned})
            except ApplianceError as exc:
                # A bad tile is reported and the case goes on; nothing acknowledged is dropped silently.
                self.notify("error", {"case_id": progress.case_id, "message": str(exc)})
            except Exception as exc:
                log.exception("pipeline failed on case %s", progress.case_id)
                self.store.case_failed(progress.case_id, f"{type(exc).__name__}: {exc}")
                failed = self._sessions.pop(progress.case_id, None)
                if failed is not None:
                    failed.close()
                progress.done.set()
                self.notify("failed", {"case_id": progress.case_id, "message": str(exc)})

    def _session_event(self, progress: CaseProgress, kind: str, data: dict) -> None:
        if kind == "early-positive":
            progress.early_positive = True
            self.notify("early-positive", {"case_id": progress.case_id, **data})

    def _finish(self, progress: CaseProgress) -> None:
        session = self._sessions.pop(progress.case_id)
        self.store.case_processing(progress.case_id)
        try:
            result = session.finish()
            summary = result.to_dict()
            summary["input"] = f"scanner case {progress.case_id}"
            summary["skipped_inputs"] = []
            # the verdict is final and stored first; the files follow (a failure there does not lose the call)
            self.store.case_finished(progress.case_id, summary)
            progress.result = result
            progress.score = result.score
            progress.done.set()
            self.notify("finished", {"case_id": progress.case_id, "verdict": result.verdict, "score": result.score})
            try:
                progress.outputs = session.write_outputs(self.cases_dir / progress.case_id, progress.case_id, summary)
                self.notify("outputs", {"case_id": progress.case_id, "files": sorted(progress.outputs)})
            except (OSError, ValueError) as exc:
                log.exception("could not write the outputs of case %s", progress.case_id)
                self.notify("error", {"case_id": progress.case_id, "message": f"outputs not written: {exc}"})
        finally:
            session.close()
            release_free_memory()
            progress.outputs_done.set()


class CaseReceiver:
    """The link's TileSink: a tile is spooled and logged before this returns, and only then ACKed."""

    def __init__(self, spool: TileSpool, store: CaseStore, pipeline: PipelineWorker, model: dict, notify: Notify,
                 storage: "StorageGuard"):
        self.storage = storage
        self.spool = spool
        self.store = store
        self.pipeline = pipeline
        self.model = model
        self.notify = notify
        self.cases: dict[str, CaseProgress] = {}
        self.current: CaseProgress | None = None
        self.reopened: list[tuple[CaseInfo, list[int]]] = []  # open cases rebuilt after a restart
        self.ended_recovered: list[tuple[str, int]] = []  # ended cases finished after a restart

    def case_began(self, info: CaseInfo) -> None:
        known = self.cases.get(info.case_id)
        if known is not None and not known.done.is_set() and not known.abandoned:
            return  # rebuilt after a restart and resumed by the scanner: keep what is stored and replayed
        refusal = self.storage.refusal()
        if refusal:
            self.notify("refused", {"case_id": info.case_id, "reason": refusal})
            raise CaseRefused(refusal)
        expected = info.expected_tiles or None
        self.spool.begin_case(info.case_id, _info_dict(info))
        self.store.case_started(info.case_id, specimen_id=info.specimen_id, source="scanner",
                                tiles_expected=expected, model=self.model)
        progress = CaseProgress(info.case_id, info.specimen_id, expected, info)
        self.cases.pop(info.case_id, None)  # the same case scanned again is a new case: it goes last
        self.cases[info.case_id] = progress
        self.current = progress
        self._forget_finished()
        self.pipeline.begin(progress)
        self.notify("case-started", {"case_id": info.case_id, "tiles_expected": expected})

    def _forget_finished(self) -> None:
        """Drop all but the latest FINISHED_CASES_KEPT finished cases from memory (oldest first)."""
        finished = [case_id for case_id, p in self.cases.items()
                    if p.done.is_set() and (p.outputs_done.is_set() or p.result is None) and p is not self.current]
        for case_id in finished[:max(0, len(finished) - FINISHED_CASES_KEPT)]:
            del self.cases[case_id]

    def tile_received(self, tile: TileReceived) -> None:
        progress = self.cases[tile.case_id]
        if progress.abandoned:
            raise CaseRefused(f"case {tile.case_id} was abandoned: {progress.abandoned}")
        progress.last_activity = time.monotonic()
        h, w = tile.pixels.shape[:2]
        sha = self.spool.store_tile(tile.case_id, tile.index, tile.x, tile.y, tile.pixels)
        self.store.tile_stored(tile.case_id, tile.index, tile.x, tile.y, w, h, sha)
        progress.tiles_received += 1
        self.pipeline.tile(progress, tile.x, tile.y, tile.pixels)
        self.notify("tile", {"case_id": tile.case_id, "received": progress.tiles_received,
                             "expected": progress.tiles_expected})

    def case_ended(self, case_id: str, tile_count: int) -> None:
        progress = self.cases[case_id]
        if progress.abandoned:
            raise CaseRefused(f"case {case_id} was abandoned: {progress.abandoned}")
        # Committed before this returns (and so before the ACK): a crash after the ACK must still find the
        # case ended, or the restarted daemon would wait for a CASE_END the scanner will never resend.
        self.store.case_processing(case_id)
        progress.ended = True
        self.pipeline.end(progress)
        self.notify("case-ended", {"case_id": case_id, "tile_count": tile_count})

    def recover(self) -> list[str]:
        """After a crash: rebuild every case the last run left open from the spool (what was ACKed) and replay
        its tiles into the pipeline in index order; a case whose CASE_END was received is finished now, with
        the same tiles, so the same verdict and score. Others stay open (and are abandoned if the scanner
        does not come back within case_timeout_s)."""
        resumed = []
        for row in self.store.open_cases():
            case_id = row["id"]
            try:
                info = CaseInfo(**self.spool.case_info(case_id))
            except (OSError, ValueError, TypeError) as exc:
                self.store.case_failed(case_id, f"could not resume after a restart: {exc}")
                continue
            ended = row["status"] == "processing" or any(
                e["kind"] == "case-ended" for e in self.store.events(case_id))
            progress = CaseProgress(case_id, info.specimen_id, info.expected_tiles or None, info)
            self.cases[case_id] = progress
            self.current = progress
            self.pipeline.begin(progress)
            logged = {r["idx"] for r in self.store.tiles(case_id)}
            for idx, x, y, path in self.spool.stored_tiles(case_id):
                pixels = np.load(path, allow_pickle=False)
                if idx not in logged:  # spooled, then killed before its row was committed (and before the ACK)
                    self.store.tile_stored(case_id, idx, x, y, pixels.shape[1], pixels.shape[0],
                                           hashlib.sha256(np.ascontiguousarray(pixels).tobytes()).hexdigest())
                self.pipeline.tile(progress, x, y, pixels)
                progress.tiles_received += 1
            self.notify("resumed", {"case_id": case_id, "tiles": progress.tiles_received, "ended": ended})
            if ended:
                progress.ended = True
                self.pipeline.end(progress)
                self.ended_recovered.append((case_id, progress.tiles_received))
            else:
                self.reopened.append((info, [i for i, _x, _y, _p in self.spool.stored_tiles(case_id)]))
            resumed.append(case_id)
        return resumed

    def abandon_stale(self, timeout: float) -> list[str]:
        """Mark cases with no tile and no CASE_END for ``timeout`` seconds abandoned; returns their ids."""
        now, out = time.monotonic(), []
        for progress in list(self.cases.values()):
            if progress.ended or progress.abandoned or progress.done.is_set():
                continue
            idle = now - progress.last_activity
            if idle > timeout:
                progress.abandoned = (f"no tile and no CASE_END for {idle:.0f} s (limit {timeout:.0f} s) after "
                                      f"{progress.tiles_received} tiles")
                self.pipeline.abandon(progress)
                out.append(progress.case_id)
        return out

    def link_event(self, kind: str, detail: str) -> None:
        self.notify("link", {"kind": kind, "detail": detail})


class StorageGuard:
    """Free space on the data disk: below ``min_free_mb`` new cases are refused (cases already in are kept).

    ``also``: folders that may sit on a disk of their own (the spool, mounted apart); the fullest one counts."""

    def __init__(self, path: Path, min_free_mb: int, *also: Path):
        self.path = Path(path)
        self.also = [Path(p) for p in also]
        self.min_free = min_free_mb * 1_000_000

    def _fullest(self) -> tuple[Path, int] | None:
        """(folder, free bytes) of the folder with the least free space, or None if the data folder is unreadable."""
        try:
            out = (self.path, shutil.disk_usage(self.path).free)
        except OSError:
            return None
        for p in self.also:
            try:
                free = shutil.disk_usage(p).free
            except OSError:
                continue  # not made yet: it is on the data disk
            if free < out[1]:
                out = (p, free)
        return out

    def free_bytes(self) -> int | None:
        fullest = self._fullest()
        return None if fullest is None else fullest[1]

    def refusal(self) -> str | None:
        """Why a new case cannot be taken now, or None."""
        fullest = self._fullest()
        if fullest is None:
            return f"the data folder {self.path} is not readable"
        where, free = fullest
        if free < self.min_free:
            return (f"not enough free disk space for a new case: {free / 1e6:.0f} MB free in {where}, at least "
                    f"{self.min_free / 1e6:.0f} MB needed; existing cases are kept. Free space or move old cases.")
        return None

    def status(self) -> dict:
        refusal = self.refusal()
        return {"free_bytes": self.free_bytes(), "min_free_bytes": self.min_free,
                "accepting_cases": refusal is None, "reason": refusal}


def _info_dict(info: CaseInfo) -> dict:
    return {k: getattr(info, k) for k in info.__dataclass_fields__}


class Daemon:
    """Owns the engine, store, spool, pipeline, serial link and API for one process."""

    def __init__(self, settings: Settings, *, port: str | None = None, notify: Notify | None = None,
                 serve_api: bool = True):
        self.settings = settings
        self.port = port or settings.serial_port
        self._user_notify = notify or (lambda kind, data: log.info("%s %s", kind, data))
        self.events = EventHub()  # live events for GET /events
        self.storage = StorageGuard(settings.data_dir, settings.min_free_mb, settings.spool_dir)
        self.serve_api = serve_api
        self.engine: Engine | None = None
        self.store: CaseStore | None = None
        self.link: HostLink | None = None
        self.api: ApiServer | None = None
        self.receiver: CaseReceiver | None = None
        self.pipeline: PipelineWorker | None = None
        # Why the daemon cannot take cases at all (the model failed its checks), or None. Set at start: the
        # daemon then runs degraded, serving its status and this reason but never opening the scanner link.
        self.problem: str | None = None

    # Lifecycle events kept in the store's events table (per-tile progress is not: it is in the tiles table).
    RECORDED = frozenset({"case-started", "case-ended", "early-positive", "finished", "outputs", "error", "failed",
                          "refused", "abandoned", "resumed", "link", "ready"})

    def notify(self, kind: str, data: dict) -> None:
        """Record lifecycle events in SQLite, then pass every event on (demo progress, logs)."""
        self.events.publish(kind, data)
        if kind in self.RECORDED and self.store is not None:
            try:
                self.store.event(kind, case_id=data.get("case_id"), detail=data)
            except Exception:  # noqa: BLE001 - the history must never stop the daemon
                log.exception("could not record event %s", kind)
        self._user_notify(kind, data)

    def start(self) -> None:
        """Load the model, open the store, serve the API and open the link; on any failure undo it all.

        A model that fails its checks (manifest, missing file, sha256 mismatch) is not a failure to start: a
        restart would not repair the file. The daemon starts degraded instead (``problem`` says why): the
        store and the API run, so GET /ready and /status name the file and what is wrong with it, but the
        scanner link stays closed and no case can come in."""
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> None:
        s = self.settings
        try:
            self.engine = load_engine(s.model_dir, s.engine)
        except (ManifestError, ModelIntegrityError) as exc:
            self.problem = " ".join(f"the model failed its checks: {exc}".split())  # one line, for STATUS=
            log.error("NOT READY, the scanner link stays closed: %s", self.problem)
        self.store = CaseStore(s.db_path)
        if self.problem:
            self._start_degraded()
            return
        self.store.model_seen(self.engine.description)
        spool = TileSpool(s.spool_dir)
        self.pipeline = PipelineWorker(self.engine, self.store, s.batch_size, self.notify, s.cases_dir)
        self.pipeline.start()
        self.receiver = CaseReceiver(spool, self.store, self.pipeline, self.engine.description, self.notify,
                                     self.storage)
        if self.serve_api:
            self.api = ApiServer(create_app(s, self.store, self.status, self.not_ready, self.engine.latency,
                                            self.events, self.reconnect_link), s.api_host, s.api_port)
            self.api.start()
            self.notify("api", {"url": f"http://{s.api_host}:{self.api.port}"})
        self.receiver.recover()
        self._housekeeping_stop = threading.Event()
        self._housekeeping = threading.Thread(target=self._housekeep, name="housekeeping", daemon=True)
        self._housekeeping.start()
        # wait_for_port: a daemon started before the scanner is plugged in waits for it instead of failing.
        self.link = HostLink(self.port, self.receiver, wait_for_port=True)
        if self.receiver.reopened:  # the host holds one open case: the latest the scanner was sending
            self.link.restore_case(*self.receiver.reopened[-1])
        for case_id, tiles in self.receiver.ended_recovered:  # their CASE_END may come again: re-ACK it
            self.link.restore_ended(case_id, tiles)
        self.link.start()
        self.notify("ready", {"port": self.port, "model": self.engine.description})

    def _start_degraded(self) -> None:
        """Store and API only: the status and the reason are served; no pipeline, no link, no new case."""
        s = self.settings
        self.store.event("not-ready", detail={"reason": self.problem})
        self.events.publish("not-ready", {"reason": self.problem})
        if self.serve_api:
            self.api = ApiServer(create_app(s, self.store, self.status, self.not_ready, None, self.events,
                                            self.reconnect_link), s.api_host, s.api_port)
            self.api.start()
            self.notify("api", {"url": f"http://{s.api_host}:{self.api.port}"})

    def reconnect_link(self, why: str) -> str:
        """An operator's reconnect (POST /link/reconnect): reopen the scanner port now; returns the link state."""
        if self.link is None:
            raise LinkError(f"the scanner link is not open: {self.problem}" if self.problem
                            else "the scanner link is not started yet")
        log.warning("reconnecting the scanner link: %s", why)
        self.link.request_reconnect(why)
        self.notify("link", {"kind": "reconnect-requested", "detail": why})
        return self.link.state

    def status(self) -> dict:
        """The live status the API serves: link, case in flight, model, disk."""
        from . import __version__

        out: dict = {"version": __version__}
        if self.problem:
            out["problem"] = self.problem
        if self.link is not None:
            snap = self.link.snapshot()
            out["link"] = {
                "state": snap.get("state", "unknown"),
                "port": self.port,
                "counters": {k: v for k, v in snap.items() if isinstance(v, (int, float)) and not isinstance(v, bool)},
                "last_error": snap.get("last_error"),
            }
        current = self.receiver.current if self.receiver else None
        if current is not None:
            out["case"] = {
                "case_id": current.case_id,
                "specimen_id": current.specimen_id,
                "tiles_expected": current.tiles_expected,
                "tiles_received": current.tiles_received,
                "tiles_processed": current.tiles_processed,
                "score": current.score,
                "early_positive": current.early_positive,
                "verdict": current.result.verdict if current.result else None,
                "eta_s": eta_seconds(current, time.monotonic()),
                "warnings": list(current.warnings),
            }
        if self.engine is not None:
            out["model"] = self.engine.description
        storage = self.storage.status()
        out["disk_free_bytes"] = storage["free_bytes"]
        out["storage"] = storage
        return out

    def _housekeep(self) -> None:
        """Once a second: abandon cases the scanner left open. Every retention_interval_s: retention."""
        from . import retention

        tick = min(1.0, self.settings.case_timeout_s / 4)
        next_retention = time.monotonic()
        while not self._housekeeping_stop.wait(tick):
            try:
                self.receiver.abandon_stale(self.settings.case_timeout_s)
                if time.monotonic() >= next_retention:
                    next_retention = time.monotonic() + self.settings.retention_interval_s
                    for p in retention.apply(self.store, self.settings):
                        log.info("retention removed the files of case %s (%s, %d bytes)", p.case_id, p.reason,
                                 p.bytes)
            except Exception:  # noqa: BLE001 - housekeeping must never take the daemon down
                log.exception("housekeeping failed")

    def not_ready(self) -> list[str]:
        """Why the daemon is not ready for a scanner yet (empty when it is): for GET /ready."""
        if self.problem:
            return [self.problem]
        reasons = []
        if self.engine is None:
            reasons.append("the model is not loaded")
        if self.link is None or self.link.state in ("reconnecting", "stopped"):
            reasons.append(f"the scanner port {self.port} is not open")
        ok, why = self.health() if self.link is not None and self.pipeline is not None else (True, "")
        if not ok:
            reasons.append(why)
        return reasons

    def health(self) -> tuple[bool, str]:
        """(healthy, why not): the link reader and the pipeline are alive and making progress. A daemon started
        degraded (``problem``) is healthy as long as it runs: it does what it can, serve its status."""
        if self.problem:
            return True, ""
        if self.link is None or not self.link.running:
            return False, "scanner link reader is not running"
        if self.pipeline is None:
            return False, "no pipeline"
        return self.pipeline.alive(self.settings.pipeline_stall_s)

    def status_line(self) -> str:
        """One line for systemd's STATUS=: link state and the case in flight, or NOT READY and why."""
        if self.problem:
            return f"NOT READY: {self.problem}"
        link = self.link.state if self.link else "down"
        c = self.receiver.current if self.receiver else None
        if c is None:
            return f"link {link}; no case yet"
        state = c.result.verdict if c.result else ("early positive" if c.early_positive else "running")
        return (f"link {link}; case {c.case_id}: {c.tiles_received}/{c.tiles_expected or '?'} tiles received, "
                f"{c.tiles_processed} processed, score {c.score:.3f}, {state}")

    def wait_case(self, case_id: str, timeout: float) -> CaseProgress | None:
        """Wait until the pipeline has finished ``case_id`` (or the timeout passes)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            progress = self.receiver.cases.get(case_id) if self.receiver else None
            if progress is not None:
                progress.done.wait(max(0.0, deadline - time.monotonic()))
                return progress if progress.done.is_set() else None
            time.sleep(0.05)
        return None

    def stop(self) -> None:
        if getattr(self, "_housekeeping", None) is not None:
            self._housekeeping_stop.set()
            self._housekeeping.join(timeout=5)
        if self.link:
            self.link.stop()
        if self.pipeline:
            self.pipeline.stop()
        if self.api:
            self.api.stop()
        if self.store:
            self.store.close()


def serve(daemon: Daemon, notifier, stop: threading.Event, tick: float = 0.5) -> None:
    """The service loop of `appliance run`: READY=1 once started, then WATCHDOG=1 every half WATCHDOG_USEC
    only while ``daemon.health()`` holds, and STATUS= when it changes, until ``stop`` is set.

    A daemon started degraded (``daemon.problem``) is READY=1 at once with STATUS=NOT READY: <why>: the
    process is up and serving its status, and a restart by systemd would not repair a tampered model."""
    while daemon.problem is None and daemon.link.state in ("reconnecting", "stopped"):  # READY=1 once the port is open
        notifier.status(f"model loaded; waiting for the scanner port {daemon.port}")
        if stop.wait(tick):
            notifier.stopping()
            return
    notifier.ready(daemon.status_line())
    interval = notifier.watchdog_interval
    next_beat = time.monotonic()
    healthy = True
    while not stop.wait(min(tick, interval) if interval else tick):
        notifier.status(daemon.status_line())
        if interval is None or time.monotonic() < next_beat:
            continue
        ok, why = daemon.health()
        if ok:
            notifier.watchdog()
            next_beat = time.monotonic() + interval
        elif healthy:
            log.error("not healthy, withholding the systemd watchdog: %s", why)
        healthy = ok
    notifier.stopping()
