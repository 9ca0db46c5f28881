"""Every custom message of the terminal UI, in one place: the daemon's live events (one class per kind, built
from GET /events by ``live_event``) and the UI's own (a status polled, the connection up or down)."""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields

from textual.message import Message

from appliance.status import DaemonStatus
from appliance.terms import EventKind
from appliance.tui.client import BadAnswer


class StatusUpdated(Message):
    """A fresh GET /status."""

    def __init__(self, status: DaemonStatus) -> None:
        super().__init__()
        self.status = status


class ConnectionChanged(Message):
    """The daemon became reachable, or stopped being reachable (with why)."""

    def __init__(self, up: bool, detail: str = "") -> None:
        super().__init__()
        self.up = up
        self.detail = detail


# -- the daemon's live events ---------------------------------------------------------------------------------
class LiveEvent(Message, bubble=False):
    """One event from the daemon's live stream. The app posts one to itself and one to each screen in its
    stack, and whoever cares handles it; bubbling would bring each screen's copy back to the app."""

    def __init_subclass__(cls, **kwargs) -> None:
        kwargs.setdefault("bubble", False)  # Message.__init_subclass__ would make every subclass bubble again
        super().__init_subclass__(**kwargs)


def wire_name(name: str):
    """A field sent under another name: one that means something else here (a kind, a Message, a count)."""
    return field(metadata={"wire": name})


@dataclass
class DaemonReady(LiveEvent):
    """The daemon loaded its model, opened the scanner link and is taking cases."""

    port: str
    model: dict  # name, version, sha256, backend


@dataclass
class DaemonNotReady(LiveEvent):
    """The daemon started without its model (it failed its checks): no case can come in."""

    reason: str


@dataclass
class ApiOpened(LiveEvent):
    """The status API is serving at ``url``."""

    url: str


@dataclass
class LinkEventReported(LiveEvent):
    """Something the scanner link reported (up, down, crc-error, ...), or an operator's reconnect."""

    what: str = wire_name("kind")
    detail: str


@dataclass
class NewCaseRefused(LiveEvent):
    """The scanner's new case was turned away (the data disk is nearly full)."""

    case_id: str
    reason: str


@dataclass
class ScanStarted(LiveEvent):
    """The scanner began sending a case."""

    case_id: str
    tiles_expected: int | None


@dataclass
class TileArrived(LiveEvent):
    """A tile of the case is in the spool."""

    case_id: str
    received: int
    expected: int | None


@dataclass
class ScanEnded(LiveEvent):
    """The scanner sent the case's last tile: the call follows."""

    case_id: str
    tile_count: int


@dataclass
class ScanResumed(LiveEvent):
    """An open case rebuilt from the spool after a restart."""

    case_id: str
    tiles_received: int = wire_name("tiles")
    ended: bool


@dataclass
class CalledEarly(LiveEvent):
    """The case is already suspicious, before its last tile: the call is final."""

    case_id: str
    score: float
    after_tiles: int = wire_name("tiles")


@dataclass
class VerdictGiven(LiveEvent):
    """The case's call (suspicious, benign-appearing or cannot-call) is made and stored."""

    case_id: str
    verdict: str
    score: float
    early_positive_after_tiles: int | None
    warnings: list[dict]  # QC found after an early call: {code, message}


@dataclass
class QcWarningFound(LiveEvent):
    """QC found a problem after the call was made: the call stands, and this says what to check."""

    case_id: str
    code: str
    text: str = wire_name("message")


@dataclass
class FilesWritten(LiveEvent):
    """The case's files (heatmap, top tiles, ...) are written, after its call."""

    case_id: str
    files: list[str]
    rebuilt: bool = False  # sent only when they were made again (after a power cut took them)


@dataclass
class ErrorReported(LiveEvent):
    """Something went wrong with a case that goes on (a bad tile, its files not written)."""

    case_id: str
    text: str = wire_name("message")


@dataclass
class TriageFailed(LiveEvent):
    """No call could be made or stored for the case."""

    case_id: str
    text: str = wire_name("message")


@dataclass
class ScanAbandoned(LiveEvent):
    """The scanner went silent mid-case for longer than the case timeout."""

    case_id: str
    reason: str


@dataclass
class DriftUpdated(LiveEvent):
    """The drift watch found recent cases outside the reference range, or back inside it."""

    drifted: list[str]
    reference: str | None
    warning: str


@dataclass
class EventsLost(LiveEvent):
    """This UI fell behind the stream and the daemon dropped events for it here (the status poll catches up)."""


@dataclass
class UnknownEvent(LiveEvent):
    """A kind this UI does not know (a newer daemon's): logged and skipped, never fatal."""

    kind: str
    data: dict


LIVE_EVENTS: dict[str, type[LiveEvent]] = {
    EventKind.READY: DaemonReady,
    EventKind.NOT_READY: DaemonNotReady,
    EventKind.API: ApiOpened,
    EventKind.LINK: LinkEventReported,
    EventKind.REFUSED: NewCaseRefused,
    EventKind.CASE_STARTED: ScanStarted,
    EventKind.TILE: TileArrived,
    EventKind.CASE_ENDED: ScanEnded,
    EventKind.RESUMED: ScanResumed,
    EventKind.EARLY_POSITIVE: CalledEarly,
    EventKind.FINISHED: VerdictGiven,
    EventKind.QC_WARNING: QcWarningFound,
    EventKind.OUTPUTS: FilesWritten,
    EventKind.ERROR: ErrorReported,
    EventKind.FAILED: TriageFailed,
    EventKind.ABANDONED: ScanAbandoned,
    EventKind.DRIFT: DriftUpdated,
    EventKind.DROPPED: EventsLost,
}


def live_event(kind: str, data: dict) -> LiveEvent:
    """The message for one event of GET /events: its kind's class with the fields read from its JSON (others
    ignored), or an UnknownEvent. A known kind without a field it always carries is a BadAnswer."""
    message_class = LIVE_EVENTS.get(kind)
    if message_class is None:
        return UnknownEvent(kind, data)
    values, missing = {}, []
    for f in fields(message_class):
        name = f.metadata.get("wire", f.name)
        if name in data:
            values[f.name] = data[name]
        elif f.default is MISSING:
            missing.append(name)
    if missing:
        raise BadAnswer(f"the event stream sent a {kind!r} event without {', '.join(missing)}")
    return message_class(**values)
