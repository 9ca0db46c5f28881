"""The case book: the one owner of what the daemon knows about its cases in flight (CaseProgress).

Three threads change a case: the link's (a case begins, a tile is received, the case ends), the pipeline's
(tiles processed, an early positive, the call, its files, a failure) and housekeeping's (a silent case is
abandoned); the API and systemd's STATUS= read it. Every change is a named transition of the book, made under
its one lock, so a CASE_END and a timeout arriving together give one outcome (ended, or abandoned, never
both), and a reader never sees half a change. Nothing outside this module sets a CaseProgress field."""

from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

from firmware_bridge.sink import CaseInfo, CaseRefused

from appliance.pipeline import TriageResult

# Finished cases the book keeps in memory (wait_case, the latest call in /status); older ones are in the store
# only. Without a bound every case's result (its ~1,000 patch scores) stayed in memory for good.
FINISHED_CASES_KEPT = 16


@dataclass
class CaseProgress:
    """What the daemon knows about one case in flight. Read it freely; change it only through the CaseBook."""

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
    warnings: list[dict] = field(default_factory=list)  # live QC of the tiles so far, then the call's own
    ended: bool = False  # CASE_END received
    abandoned: str | None = None  # why, once abandoned
    failed: str | None = None  # why, once the case failed (its call could not be made or stored)
    outputs: dict[str, str] = field(default_factory=dict)
    rebuild_files: bool = False  # called before a power cut took its files: only they are made again
    done: threading.Event = field(default_factory=threading.Event)  # called, failed or abandoned
    outputs_done: threading.Event = field(default_factory=threading.Event)  # and the pipeline is done with it

    @classmethod
    def of(cls, info: CaseInfo, **fields) -> "CaseProgress":
        return cls(info.case_id, info.specimen_id, info.expected_tiles or None, info, **fields)

    @property
    def finished(self) -> bool:
        """The pipeline is done with the case (its call, files, failure or abandonment are in)."""
        return self.done.is_set() and (self.outputs_done.is_set() or self.result is None)


def eta_seconds(progress: CaseProgress, now: float) -> float | None:
    """Seconds until every expected tile is processed, at the rate seen so far in this case; None when the
    scanner did not say how many tiles to expect or nothing is processed yet."""
    if progress.result is not None:
        return 0.0
    if not progress.tiles_expected or progress.tiles_processed <= 0:
        return None
    rate = progress.tiles_processed / max(now - progress.started, 1e-3)
    return round(max(progress.tiles_expected - progress.tiles_processed, 0) / rate, 1)


class CaseBook:
    def __init__(self, kept: int = FINISHED_CASES_KEPT):
        self.kept = kept
        self._lock = threading.RLock()
        self._cases: dict[str, CaseProgress] = {}
        self._current: CaseProgress | None = None

    # -- reads -------------------------------------------------------------------------------------------
    def get(self, case_id: str) -> CaseProgress | None:
        with self._lock:
            return self._cases.get(case_id)

    def __getitem__(self, case_id: str) -> CaseProgress:
        with self._lock:
            return self._cases[case_id]

    @property
    def current(self) -> CaseProgress | None:
        """The case the scanner sent last (the one /status and STATUS= describe)."""
        return self._current

    def in_flight(self, case_id: str) -> bool:
        """The case is known and still going (rebuilt after a restart and resumed by the scanner, say)."""
        with self._lock:
            p = self._cases.get(case_id)
            return p is not None and not p.done.is_set() and not p.abandoned

    def wait(self, case_id: str, timeout: float) -> CaseProgress | None:
        """Wait until the case is done (called, failed or abandoned), or the timeout passes."""
        deadline = time.monotonic() + timeout
        while (progress := self.get(case_id)) is None:
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.05)
        return progress if progress.done.wait(max(0.0, deadline - time.monotonic())) else None

    # -- the link's transitions --------------------------------------------------------------------------
    def opened(self, progress: CaseProgress, *, current: bool = True) -> CaseProgress:
        """A case begins (or is rebuilt after a restart): the same case id again is a new case, and goes last."""
        with self._lock:
            self._cases.pop(progress.case_id, None)
            self._cases[progress.case_id] = progress
            if current:
                self._current = progress
            self._forget_finished()
        return progress

    def arriving(self, case_id: str) -> CaseProgress:
        """A tile of the case is arriving: refused if the case was abandoned, else alive from now on (never
        abandoned in between)."""
        with self._lock:
            progress = self._cases[case_id]
            if progress.abandoned:
                raise CaseRefused(f"case {case_id} was abandoned: {progress.abandoned}")
            progress.last_activity = time.monotonic()
            return progress

    def received(self, progress: CaseProgress) -> int:
        """One more of the case's tiles is stored; returns how many are."""
        with self._lock:
            progress.tiles_received += 1
            return progress.tiles_received

    def ended(self, case_id: str, commit: Callable[[], None]) -> CaseProgress:
        """CASE_END: ``commit`` records it durably, and the case is ended, in one step; refused if the case was
        abandoned first (a timeout waits for this commit, and the other way round)."""
        with self._lock:
            progress = self._cases[case_id]
            if progress.abandoned:
                raise CaseRefused(f"case {case_id} was abandoned: {progress.abandoned}")
            commit()
            progress.ended = True
            return progress

    def abandon_stale(self, timeout: float, now: float) -> list[CaseProgress]:
        """Every case with no tile and no CASE_END for ``timeout`` seconds is abandoned; returns them."""
        out = []
        with self._lock:
            for progress in self._cases.values():
                if progress.ended or progress.abandoned or progress.done.is_set():
                    continue
                idle = now - progress.last_activity
                if idle > timeout:
                    progress.abandoned = (f"no tile and no CASE_END for {idle:.0f} s (limit {timeout:.0f} s) "
                                          f"after {progress.tiles_received} tiles")
                    out.append(progress)
        return out

    # -- the pipeline's transitions ----------------------------------------------------------------------
    def processed(self, progress: CaseProgress, tiles: int, score: float, warnings: list[dict] | None = None) -> None:
        """The pipeline has processed ``tiles`` of the case; ``warnings``: the live QC, when it was checked."""
        with self._lock:
            progress.tiles_processed, progress.score = tiles, score
            if warnings is not None:
                progress.warnings = warnings

    def early_positive(self, progress: CaseProgress) -> None:
        with self._lock:
            progress.early_positive = True

    def finished(self, progress: CaseProgress, result: TriageResult) -> None:
        """The call is made (and stored): the case is done; its files may follow."""
        with self._lock:
            progress.result, progress.score = result, result.score
            progress.warnings = [asdict(w) for w in result.warnings]  # the call's own, not the live ones
            progress.done.set()

    def outputs_written(self, progress: CaseProgress, outputs: dict[str, str]) -> None:
        with self._lock:
            progress.outputs = outputs

    def failed(self, progress: CaseProgress, message: str) -> None:
        """The case failed (its call could not be made or stored); ``released`` follows once that is said."""
        with self._lock:
            progress.failed = message

    def released(self, progress: CaseProgress) -> None:
        """The pipeline is done with the case (called and its files written or not, failed, or abandoned)."""
        with self._lock:
            progress.done.set()
            progress.outputs_done.set()

    def _forget_finished(self) -> None:
        """Drop all but the latest ``kept`` finished cases from memory (oldest first)."""
        finished = [case_id for case_id, p in self._cases.items() if p.finished and p is not self._current]
        for case_id in finished[:max(0, len(finished) - self.kept)]:
            del self._cases[case_id]
