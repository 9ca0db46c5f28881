"""The pipeline thread: one TriageSession per case, fed tile by tile through a queue, and what the daemon
knows about each case in flight (CaseProgress).

The queue holds at most MAX_TILES_IN_RAM tiles' pixels. Every tile is in the spool before it is queued (it
was ACKed), so when inference falls behind, later tiles are queued by their spool path and read back when
their turn comes: the backlog waits on disk, not in RAM, and the link's ACK path never blocks on it."""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from firmware_bridge.sink import CaseInfo

from appliance.errors import ApplianceError, StoreError
from appliance.model.engine import Engine
from appliance.pipeline import TriageResult, TriageSession
from appliance.pipeline.decision import ThresholdInForce
from appliance.service.heap import release_free_memory
from appliance.store.database import CaseStore
from appliance.terms import EventKind

log = logging.getLogger(__name__)

Notify = Callable[[str, dict], None]

LIVE_QC_EVERY = 8  # tiles between live QC checks (focus, exposure, and the stain once it has been judged)
# Tiles whose pixels may wait in the queue: 32 tiles of 450 px are ~19 MB. About 10 s of scanning at the
# rates measured here, so a queue that fills means inference is behind, not a hiccup.
MAX_TILES_IN_RAM = 32


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
    """What the daemon knows about the case in flight (read by the API and the demo's progress line).

    The link thread (tiles, CASE_END) and the housekeeping thread (abandoning a stale case) decide on the same
    fields; ``lock`` makes each decision and what it sets one step, so a CASE_END and a timeout arriving
    together give one outcome: ended (and called) or abandoned, never both. The pipeline thread writes only
    its own fields (processed tiles, score, result, failure)."""

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
    warnings: list[dict] = field(default_factory=list)  # live QC of the tiles so far, while the scan goes on
    ended: bool = False  # CASE_END received
    abandoned: str | None = None  # why, once abandoned
    failed: str | None = None  # why, once the case failed (its call could not be made or stored)
    outputs: dict[str, str] = field(default_factory=dict)
    rebuild_files: bool = False  # called before a power cut took its files: only they are made again
    outputs_done: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)


class PipelineWorker:
    """Runs one TriageSession per case on its own thread, fed tile by tile through a queue."""

    def __init__(self, engine: Engine, store: CaseStore, batch_size: int, notify: Notify, cases_dir: Path,
                 thresholds: Callable[[], ThresholdInForce] | None = None):
        """``thresholds()`` gives the thresholds in force, asked at each case's start (a site point accepted
        meanwhile applies from the next case on, never to one in flight)."""
        self.engine = engine
        self.thresholds = thresholds or (lambda: ThresholdInForce.of_model(engine.manifest.decision))
        self.store = store
        self.cases_dir = Path(cases_dir)
        self.batch_size = batch_size
        self.notify = notify
        self._queue: queue.Queue = queue.Queue()
        self._ram_lock = threading.Lock()
        self.tiles_in_ram = 0  # queued tiles that carry their pixels (at most MAX_TILES_IN_RAM)
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

    def tile(self, progress: CaseProgress, x: int, y: int, pixels: np.ndarray | None, spooled: Path) -> None:
        """Queue a spooled tile: with its pixels while few tiles wait, else by its spool path (never blocks)."""
        with self._ram_lock:
            keep = pixels is not None and self.tiles_in_ram < MAX_TILES_IN_RAM
            self.tiles_in_ram += keep
        self._queue.put(("tile", progress, x, y, pixels if keep else None, spooled))

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
                        thresholds=self.thresholds(),
                    )
                elif kind == "tile":
                    pixels = self._pixels(item[4], item[5])
                    session = self._sessions.get(progress.case_id)
                    if session is None:  # abandoned while this tile was in flight; it stays in the spool
                        continue
                    session.add_tile(item[2], item[3], pixels)
                    progress.tiles_processed = session.tiles
                    progress.score = session.score
                    if session.tiles % LIVE_QC_EVERY == 0:
                        progress.warnings = [{"code": r.code, "message": r.message}
                                             for r in session.qc.reasons()]
                elif kind == "end":
                    self._finish(progress)
                elif kind == "abandon":
                    session = self._sessions.pop(progress.case_id, None)
                    if session is not None:
                        session.close()
                    self.store.case_abandoned(progress.case_id, progress.abandoned or "abandoned")
                    progress.done.set()
                    progress.outputs_done.set()
                    self.notify(EventKind.ABANDONED, {"case_id": progress.case_id, "reason": progress.abandoned})
            except ApplianceError as exc:
                # A bad tile is reported and the case goes on; nothing acknowledged is dropped silently.
                self.notify(EventKind.ERROR, {"case_id": progress.case_id, "message": str(exc)})
            except Exception as exc:
                log.exception("pipeline failed on case %s", progress.case_id)
                failed = self._sessions.pop(progress.case_id, None)
                if failed is not None:
                    failed.close()
                self._failed(progress, f"{type(exc).__name__}: {exc}")

    def _failed(self, progress: CaseProgress, message: str) -> None:
        """The case failed: said at once (its progress, the event, the log) and stored when the store can."""
        log.error("case %s failed: %s", progress.case_id, message)
        progress.failed = message
        try:
            self.store.case_failed(progress.case_id, message)
        except StoreError:
            log.exception("the failure of case %s could not be stored either", progress.case_id)
        progress.done.set()
        progress.outputs_done.set()
        self.notify(EventKind.FAILED, {"case_id": progress.case_id, "message": message})

    def _pixels(self, pixels: np.ndarray | None, spooled: Path) -> np.ndarray:
        """A queued tile's pixels: as queued, or read back from the spool."""
        if pixels is not None:
            with self._ram_lock:
                self.tiles_in_ram -= 1
            return pixels
        try:
            return np.load(spooled, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise StoreError(f"a spooled tile could not be read back from {spooled}: {exc}") from None

    def _session_event(self, progress: CaseProgress, kind: str, data: dict) -> None:
        if kind == EventKind.EARLY_POSITIVE:
            progress.early_positive = True
            self.notify(EventKind.EARLY_POSITIVE, {"case_id": progress.case_id, **data})

    def _finish(self, progress: CaseProgress) -> None:
        # the case is already "processing": the receiver committed that on CASE_END, before the ACK
        session = self._sessions.pop(progress.case_id)
        written: tuple[str, dict] | None = None
        try:
            result = session.finish()
            if progress.rebuild_files:
                # called before a power cut took its files: the same tiles again give the stored call, and
                # only the files are written (a different call, as after a new site threshold, writes nothing)
                stored = self.store.get_case(progress.case_id)
                if (stored["verdict"], stored["score"]) != (str(result.verdict), result.score):
                    written = (EventKind.ERROR, {"case_id": progress.case_id, "message": (
                        f"the case's files were lost and not made again: its tiles now give {result.verdict} "
                        f"{result.score:.4f}, not the stored {stored['verdict']} {stored['score']:.4f}")})
                    return
            else:
                # the verdict is final and stored first; the files follow (a failure there does not lose the call)
                try:
                    self.store.case_finished(progress.case_id, result)
                except StoreError as exc:
                    self._failed(progress, f"the call was made but could not be stored, so it was not given: "
                                           f"{exc}; the case's tiles are kept in the spool")
                    return
            progress.result = result
            progress.score = result.score
            progress.warnings = [asdict(w) for w in result.warnings]  # the call's own, not the live ones
            progress.done.set()
            if not progress.rebuild_files:
                self.notify(EventKind.FINISHED, {
                    "case_id": progress.case_id, "verdict": result.verdict, "score": result.score,
                    "early_positive_after_tiles": result.early_positive_after_tiles,
                    "warnings": [asdict(w) for w in result.warnings]})
                for w in result.warnings:  # QC found after the early call: in the case's log, never dropped
                    self.notify(EventKind.QC_WARNING, {"case_id": progress.case_id, "code": w.code,
                                                       "message": w.message})
            try:
                summary = dict(result.to_dict(), input=f"scanner case {progress.case_id}", skipped_inputs=[])
                progress.outputs = session.write_outputs(self.cases_dir / progress.case_id, progress.case_id, summary)
                written = (EventKind.OUTPUTS, {"case_id": progress.case_id, "files": sorted(progress.outputs),
                                               **({"rebuilt": True} if progress.rebuild_files else {})})
            except (OSError, ValueError) as exc:
                log.exception("could not write the outputs of case %s", progress.case_id)
                written = (EventKind.ERROR, {"case_id": progress.case_id, "message": f"outputs not written: {exc}"})
        finally:
            session.close()
            release_free_memory()
            # told last: whoever waits for a case's files finds the pipeline done with the case
            if written is not None:
                self.notify(*written)
            progress.done.set()
            progress.outputs_done.set()
