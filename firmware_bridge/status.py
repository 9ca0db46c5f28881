"""What the host reports about the link: its states, the events it emits and its counters."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

__all__ = ["NOISY_EVENTS", "LinkCounters", "LinkEvent", "LinkState", "LinkStatus"]

log = logging.getLogger(__name__)


class LinkState(StrEnum):
    """HostLink.state, for the daemon's status API."""

    CONNECTING = "connecting"  # the port is open; no scanner HELLO on it yet
    UP = "up"  # a scanner said HELLO and is not overdue on its heartbeats
    DOWN = "down"  # the scanner went silent past its heartbeat interval, or the port died for good
    RECONNECTING = "reconnecting"  # the port vanished; reopening the same path with backoff
    STOPPED = "stopped"  # not started yet, or stop() was called


class LinkEvent(StrEnum):
    """The kind passed to sink.link_event(kind, detail); state changes use the state's name."""

    UP = "up"  # a scanner HELLO arrived and was answered, or a silent scanner was heard again
    DOWN = "down"  # port lost, scanner silent, or the reader stopped ("stopped")
    CONNECTING = "connecting"  # the port was (re)opened; waiting for HELLO
    RECONNECTING = "reconnecting"  # reopening a vanished port with backoff
    RESUMED = "resumed"  # CASE_BEGIN of the open case after a new HELLO: the case continues
    CRC_ERROR = "crc-error"  # rate-limited: at most one per host.EVENT_INTERVAL, with a tally
    FRAME_ERROR = "frame-error"  # COBS, length or size damage; rate-limited
    VERSION_MISMATCH = "version-mismatch"
    MALFORMED = "malformed"  # frame intact, payload not a valid message
    CASE_CONFLICT = "case-conflict"  # CASE_BEGIN for the open case id with other fields
    BAD_TILE = "bad-tile"
    STORAGE_ERROR = "storage-error"  # the sink raised; NACKed STORAGE
    UNKNOWN_CASE = "unknown-case"
    RECONNECT_REQUESTED = "reconnect-requested"  # an operator asked for the port to be reopened
    DUPLICATE = "duplicate"  # a retransmission of something already stored; re-ACKed; rate-limited
    CASE_ABANDONED = "case-abandoned"  # a new case began before the open one ended
    CASE_INCOMPLETE = "case-incomplete"  # CASE_END tile_count differs from tiles stored
    REMOTE_ERROR = "remote-error"  # the scanner sent ERROR
    UNEXPECTED = "unexpected"  # a message the host never expects from a scanner


NOISY_EVENTS = frozenset({LinkEvent.CRC_ERROR, LinkEvent.FRAME_ERROR, LinkEvent.DUPLICATE})


@dataclass
class LinkCounters:
    """Running totals, written only by the reader thread (last_error: the latest problem, as text)."""

    frames_ok: int = 0  # frames that passed COBS, CRC, version and length checks
    frames_bad: int = 0  # every frame that did not (crc_errors + framing_errors)
    crc_errors: int = 0
    framing_errors: int = 0  # COBS, length, size and version failures
    malformed: int = 0
    acks_sent: int = 0
    nacks_sent: int = 0
    duplicates: int = 0
    bad_tiles: int = 0
    storage_errors: int = 0
    cases_refused: int = 0  # CASE_BEGINs the sink declined (CaseRefused): NACK REFUSED
    tiles_stored: int = 0
    tile_bytes: int = 0  # pixel bytes (width x height x 3) of the tiles handed to the sink
    bytes_received: int = 0
    hellos: int = 0
    heartbeats: int = 0  # HEARTBEATs received (each one answered)
    resumes: int = 0
    reconnects: int = 0  # successful reopens of a vanished port
    reconnect_attempts: int = 0
    last_error: str | None = None


class LinkStatus:
    """The host's state, counters and event stream, as the daemon's status API and the sink's link_event see them.

    Shared by the protocol session (the scanner's states and damage) and the port keeper
    (the port's states); `now` comes from the caller, who owns the clock.
    """

    def __init__(self, hook: Callable[[str, str], None] | None, *, event_interval: float) -> None:
        self.state = LinkState.STOPPED
        self.counters = LinkCounters()
        self.event_interval = event_interval
        self._hook = hook
        self._noisy: dict[LinkEvent, tuple[float, int]] = {}

    def set_state(self, state: LinkState, detail: str, now: float, *, always: bool = False) -> None:
        """Change state and report it as the event of the same name (unless unchanged and not `always`)."""
        if state == self.state and not always:
            return
        self.state = state
        self.emit(LinkEvent(state.value), detail, now)

    def problem(self, kind: LinkEvent, detail: str, now: float) -> None:
        """Record detail as last_error, then report it."""
        self.counters.last_error = f"{kind}: {detail}"
        self.emit(kind, detail, now)

    def emit(self, kind: LinkEvent, detail: str, now: float) -> None:
        """Report one event; the noisy kinds at most once per event_interval, with a tally of the rest."""
        if kind in NOISY_EVENTS:
            # A noisy line produces these by the thousand; the counters keep the exact
            # numbers, the event stream gets one per event_interval with a tally.
            last, suppressed = self._noisy.get(kind, (float("-inf"), 0))
            if now - last < self.event_interval:
                self._noisy[kind] = (last, suppressed + 1)
                return
            self._noisy[kind] = (now, 0)
            if suppressed:
                detail = f"{detail} (and {suppressed} more since the last report)"
        log.debug("link event %s: %s", kind, detail)
        if self._hook is not None:
            self._hook(str(kind), detail)
