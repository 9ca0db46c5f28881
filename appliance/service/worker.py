"""The pipeline thread: one TriageSession per case, fed tile by tile through a queue of typed items (Begin,
Tile, End, Abandon); what it learns of a case goes into the case book (service/cases.py).

The queue holds at most MAX_TILES_IN_RAM tiles' pixels. Every tile is in the spool before it is queued (it
was ACKed), so when inference falls behind, later tiles are queued by their spool path and read back when
their turn comes: the backlog waits on disk, not in RAM, and the link's ACK path never blocks on it."""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from appliance.errors import ApplianceError, StoreError
from appliance.model.engine import Engine
from appliance.pipeline import TriageSession
from appliance.pipeline.decision import ThresholdInForce
from appliance.pipeline.scanpyramid import ScanGrid, ScanTile, scan_grid
from appliance.service.cases import CaseBook, CaseProgress
from appliance.service.events import (CaseAbandoned, CaseError, CaseFailed, CaseFinished, EarlyPositive, Event,
                                      Notify, OutputsWritten, QcWarning)
from appliance.service.heap import release_free_memory
from appliance.store.database import CaseStore
from appliance.store.spool import read_tile

log = logging.getLogger(__name__)

LIVE_QC_EVERY = 8  # tiles between live QC checks (focus, exposure, and the stain once it has been judged)
# Tiles whose pixels may wait in the queue: 32 tiles of 450 px are ~19 MB, and enough scanning that a queue
# that fills means inference is behind, not a hiccup (how many seconds of scanning 32 tiles are:
# docs/performance.md, "Why the code is shaped so").
MAX_TILES_IN_RAM = 32


# -- what the queue carries ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Begin:
    progress: CaseProgress


@dataclass(frozen=True)
class Tile:
    progress: CaseProgress
    x: int
    y: int
    data: np.ndarray | bytes | None  # decoded pixels or JPEG bytes; None: read back from ``spooled`` in its turn
    spooled: Path


@dataclass(frozen=True)
class End:
    progress: CaseProgress


@dataclass(frozen=True)
class Abandon:
    progress: CaseProgress


class PipelineWorker:
    """Runs one TriageSession per case on its own thread, fed tile by tile through a queue."""

    def __init__(self, engine: Engine, store: CaseStore, batch_size: int, notify: Notify, cases_dir: Path,
                 thresholds: Callable[[], ThresholdInForce] | None = None, book: CaseBook | None = None):
        """``thresholds()`` gives the thresholds in force, asked at each case's start (a site point accepted
        meanwhile applies from the next case on, never to one in flight). ``book``: the daemon's case book
        (one of its own when run alone)."""
        self.engine = engine
        self.thresholds = thresholds or (lambda: ThresholdInForce.of_model(engine.manifest.decision))
        self.store = store
        self.cases_dir = Path(cases_dir)
        self.batch_size = batch_size
        self.notify = notify
        self.book = book if book is not None else CaseBook()
        self._queue: queue.Queue[Begin | Tile | End | Abandon | None] = queue.Queue()
        self._ram_lock = threading.Lock()
        self.tiles_in_ram = 0  # queued tiles that carry their pixels (at most MAX_TILES_IN_RAM)
        self._thread = threading.Thread(target=self._run, name="pipeline", daemon=True)
        self._sessions: dict[str, TriageSession] = {}
        self._scans: dict[str, list[ScanTile]] = {}  # each case's spooled tiles: its full-resolution pyramid
        self.beat = time.monotonic()  # last time the loop was between items (idle or done with one)
        self.hang = threading.Event()  # fault injection: the loop blocks forever once this is set

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=0.1 if self.hang.is_set() else 60)

    def begin(self, progress: CaseProgress) -> None:
        self._queue.put(Begin(progress))

    def tile(self, progress: CaseProgress, x: int, y: int, data: np.ndarray | bytes | None, spooled: Path) -> None:
        """Queue a spooled tile: with its pixels (or JPEG bytes) while few tiles wait, else by its spool path
        (never blocks)."""
        with self._ram_lock:
            keep = data is not None and self.tiles_in_ram < MAX_TILES_IN_RAM
            self.tiles_in_ram += keep
        self._queue.put(Tile(progress, x, y, data if keep else None, spooled))

    def end(self, progress: CaseProgress) -> None:
        self._queue.put(End(progress))

    def abandon(self, progress: CaseProgress) -> None:
        self._queue.put(Abandon(progress))

    def alive(self, stall_after: float) -> tuple[bool, str]:
        """(healthy, why not): the thread runs and has not spent longer than stall_after on one item."""
        if not self._thread.is_alive():
            return False, "pipeline thread has stopped"
        busy = time.monotonic() - self.beat
        if busy > stall_after:
            return False, f"pipeline has made no progress for {busy:.0f} s"
        return True, ""

    def _next(self) -> Begin | Tile | End | Abandon | None:
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
            progress = item.progress
            try:
                match item:
                    case Begin():
                        self._begin(progress)
                    case Tile():
                        self._tile(item)
                    case End():
                        self._finish(progress)
                    case Abandon():
                        self._abandon(progress)
            except ApplianceError as exc:
                # A bad tile is reported and the case goes on; nothing acknowledged is dropped silently.
                self.notify(CaseError(progress.case_id, str(exc)))
            except Exception as exc:
                log.exception("pipeline failed on case %s", progress.case_id)
                self._scans.pop(progress.case_id, None)
                failed = self._sessions.pop(progress.case_id, None)
                if failed is not None:
                    failed.close()
                self._failed(progress, f"{type(exc).__name__}: {exc}")

    def _begin(self, progress: CaseProgress) -> None:
        info = progress.info
        self._sessions[progress.case_id] = TriageSession(
            self.engine,
            batch_size=self.batch_size,
            on_early_positive=lambda score, tiles, p=progress: self._early_positive(p, score, tiles),
            scanner_mpp=info.microns_per_pixel if info else None,
            width=info.image_width if info else None,
            height=info.image_height if info else None,
            workdir=self.cases_dir / progress.case_id / ".work",
            thresholds=self.thresholds(),
        )

    def _tile(self, tile: Tile) -> None:
        data = self._data(tile.data, tile.spooled)
        session = self._sessions.get(tile.progress.case_id)
        if session is None:  # abandoned while this tile was in flight; it stays in the spool
            return
        if isinstance(data, bytes):
            session.add_jpeg(tile.x, tile.y, data)
        else:
            session.add_tile(tile.x, tile.y, data)
        self._scans.setdefault(tile.progress.case_id, []).append(ScanTile(tile.x, tile.y, tile.spooled))
        live_qc = None
        if session.tiles % LIVE_QC_EVERY == 0:
            live_qc = [{"code": r.code, "message": r.message} for r in session.qc.reasons()]
        self.book.processed(tile.progress, session.tiles, session.score, live_qc)

    def _abandon(self, progress: CaseProgress) -> None:
        self._scans.pop(progress.case_id, None)
        session = self._sessions.pop(progress.case_id, None)
        if session is not None:
            session.close()
        self.store.case_abandoned(progress.case_id, progress.abandoned or "abandoned")
        self.notify(CaseAbandoned(progress.case_id, progress.abandoned or ""))
        self.book.released(progress)

    def _failed(self, progress: CaseProgress, message: str) -> None:
        """The case failed: said at once (its progress, the event, the log) and stored when the store can."""
        log.error("case %s failed: %s", progress.case_id, message)
        self.book.failed(progress, message)
        try:
            self.store.case_failed(progress.case_id, message)
        except StoreError:
            log.exception("the failure of case %s could not be stored either", progress.case_id)
        self.notify(CaseFailed(progress.case_id, message))
        self.book.released(progress)  # last: whoever waits for the case finds it said and stored

    def _data(self, data: np.ndarray | bytes | None, spooled: Path) -> np.ndarray | bytes:
        """A queued tile's pixels or JPEG bytes: as queued, or read back from the spool."""
        if data is not None:
            with self._ram_lock:
                self.tiles_in_ram -= 1
            return data
        return read_tile(spooled)

    def _scan_grid(self, progress: CaseProgress) -> ScanGrid | None:
        """The case's spooled tiles on the scanner's grid (its pyramid at full resolution), or None (logged)."""
        tiles, info = self._scans.pop(progress.case_id, []), progress.info
        if info is None:
            return None
        grid = scan_grid(tiles, info.image_width, info.image_height, info.tile_width, info.tile_height,
                         info.overlap, info.microns_per_pixel, read_tile)
        if isinstance(grid, str):
            log.info("case %s: its pyramid is at the model's resolution: %s", progress.case_id, grid)
            return None
        return grid

    def _early_positive(self, progress: CaseProgress, score: float, tiles: int) -> None:
        self.book.early_positive(progress)
        self.notify(EarlyPositive(progress.case_id, round(score, 6), tiles))

    def _finish(self, progress: CaseProgress) -> None:
        # the case is already "processing": the receiver committed that on CASE_END, before the ACK
        session = self._sessions.pop(progress.case_id)
        scan = self._scan_grid(progress)
        last: Event | None = None  # told last: whoever waits for a case's files finds the pipeline done with it
        try:
            result = session.finish()
            if progress.rebuild_files:
                # called before a power cut took its files: the same tiles again give the stored call, and
                # only the files are written (a different call, as after a new site threshold, writes nothing)
                stored = self.store.get_case(progress.case_id)
                if (stored["verdict"], stored["score"]) != (str(result.verdict), result.score):
                    last = CaseError(progress.case_id, (
                        f"the case's files were lost and not made again: its tiles now give {result.verdict} "
                        f"{result.score:.4f}, not the stored {stored['verdict']} {stored['score']:.4f}"))
                    return
            else:
                # the verdict is final and stored first; the files follow (a failure there does not lose the call)
                try:
                    self.store.case_finished(progress.case_id, result)
                except StoreError as exc:
                    self._failed(progress, f"the call was made but could not be stored, so it was not given: "
                                           f"{exc}; the case's tiles are kept in the spool")
                    return
            self.book.finished(progress, result)
            if not progress.rebuild_files:
                warnings = [asdict(w) for w in result.warnings]
                self.notify(CaseFinished(progress.case_id, str(result.verdict), result.score,
                                         result.early_positive_after_tiles, warnings))
                for w in result.warnings:  # QC found after the early call: in the case's log, never dropped
                    self.notify(QcWarning(progress.case_id, w.code, w.message))
            try:
                accession = progress.info.accession if progress.info is not None else ""
                summary = result.summary(f"scanner case {progress.case_id}", accession=accession)
                outputs = session.write_outputs(self.cases_dir / progress.case_id, progress.case_id, summary,
                                                scan=scan)
                self.book.outputs_written(progress, outputs)
                last = OutputsWritten(progress.case_id, [str(f) for f in sorted(outputs)],
                                      rebuilt=progress.rebuild_files)
            except (OSError, ValueError) as exc:
                log.exception("could not write the outputs of case %s", progress.case_id)
                last = CaseError(progress.case_id, f"outputs not written: {exc}")
        finally:
            session.close()
            release_free_memory()
            if last is not None:
                self.notify(last)
            self.book.released(progress)
