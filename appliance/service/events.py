"""The daemon's live events: one frozen dataclass per kind, and the hub that fans them out to subscribers
(the API's Server-Sent Events stream) without ever blocking the daemon. Each subscriber has a bounded queue,
and a subscriber that falls behind loses its oldest events (its stream says so, with a Dropped) rather than
holding the link or the pipeline up. The events become JSON only at the API's edge (``Event.data``)."""

from __future__ import annotations

import itertools
import queue
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, ClassVar

from appliance.terms import EventKind


@dataclass(frozen=True)
class Event:
    kind: ClassVar[EventKind]

    def data(self) -> dict:
        """As the SSE stream, the events table and the logs carry it."""
        return asdict(self)


Notify = Callable[[Event], None]


# -- the daemon --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Ready(Event):
    kind = EventKind.READY
    port: str
    model: dict  # ModelRef.to_dict()


@dataclass(frozen=True)
class NotReady(Event):
    kind = EventKind.NOT_READY
    reason: str


@dataclass(frozen=True)
class ApiStarted(Event):
    kind = EventKind.API
    url: str


@dataclass(frozen=True)
class LinkReported(Event):
    """Something the scanner link reported (firmware_bridge.status.LinkEvent), or an operator's reconnect."""

    kind = EventKind.LINK
    link: str  # the LinkEvent's name ("kind" on the wire)
    detail: str

    def data(self) -> dict:
        return {"kind": self.link, "detail": self.detail}


@dataclass(frozen=True)
class DriftChanged(Event):
    kind = EventKind.DRIFT
    drifted: list
    reference: str | None
    warning: str


@dataclass(frozen=True)
class Dropped(Event):
    """Said to a subscriber that fell behind in place of the events it lost."""

    kind = EventKind.DROPPED


# -- a case ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Refused(Event):
    kind = EventKind.REFUSED
    case_id: str
    reason: str


@dataclass(frozen=True)
class CaseStarted(Event):
    kind = EventKind.CASE_STARTED
    case_id: str
    tiles_expected: int | None


@dataclass(frozen=True)
class TileStored(Event):
    kind = EventKind.TILE
    case_id: str
    received: int
    expected: int | None


@dataclass(frozen=True)
class CaseEnded(Event):
    kind = EventKind.CASE_ENDED
    case_id: str
    tile_count: int


@dataclass(frozen=True)
class Resumed(Event):
    kind = EventKind.RESUMED
    case_id: str
    tiles: int
    ended: bool


@dataclass(frozen=True)
class EarlyPositive(Event):
    kind = EventKind.EARLY_POSITIVE
    case_id: str
    score: float
    tiles: int


@dataclass(frozen=True)
class CaseFinished(Event):
    kind = EventKind.FINISHED
    case_id: str
    verdict: str
    score: float
    early_positive_after_tiles: int | None
    warnings: list = field(default_factory=list)  # [{code, message}]


@dataclass(frozen=True)
class QcWarning(Event):
    kind = EventKind.QC_WARNING
    case_id: str
    code: str
    message: str


@dataclass(frozen=True)
class OutputsWritten(Event):
    kind = EventKind.OUTPUTS
    case_id: str
    files: list
    rebuilt: bool = False  # made again after a power cut took them

    def data(self) -> dict:
        out = {"case_id": self.case_id, "files": list(self.files)}
        return out | {"rebuilt": True} if self.rebuilt else out


@dataclass(frozen=True)
class CaseError(Event):
    """Something went wrong with a case that goes on (a bad tile, outputs not written)."""

    kind = EventKind.ERROR
    case_id: str
    message: str


@dataclass(frozen=True)
class CaseFailed(Event):
    kind = EventKind.FAILED
    case_id: str
    message: str


@dataclass(frozen=True)
class CaseAbandoned(Event):
    kind = EventKind.ABANDONED
    case_id: str
    reason: str


# -- the hub -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Published:
    """An event as a subscriber receives it: numbered and timed."""

    id: int
    at: float
    event: Event


class EventHub:
    def __init__(self, backlog: int = 1000):
        self.backlog = backlog
        self._subs: list[queue.Queue[Published]] = []
        self._lock = threading.Lock()
        self._ids = itertools.count(1)

    def publish(self, event: Event) -> None:
        published = Published(next(self._ids), time.time(), event)
        with self._lock:
            subs = list(self._subs)
        for q in subs:
            try:
                q.put_nowait(published)
            except queue.Full:
                try:
                    q.get_nowait()  # drop the oldest for this slow subscriber
                    q.put_nowait(Published(published.id, published.at, Dropped()))
                except (queue.Empty, queue.Full):
                    pass

    def subscribe(self) -> queue.Queue[Published]:
        q: queue.Queue[Published] = queue.Queue(maxsize=self.backlog)
        with self._lock:
            self._subs.append(q)
        return q

    def unsubscribe(self, q: queue.Queue) -> None:
        with self._lock:
            if q in self._subs:
                self._subs.remove(q)
