"""The host's protocol session, pure: bytes or frames in; answers to write and sink calls out (PROTOCOL.md 8).

No threads, no port and no clock: HostLink's reader thread (host.py) feeds it what the port
read, with the time, writes the answers it returns, and tells it when the port comes and
goes. Everything the protocol promises about the host, above all "ACK means durable"
(8.2) and "duplicates are idempotent" (8.6), is decided here, the cases by its HostCases
(cases.py) and the answers' frames by its Replies (answers.py), and can be tested by
calling it directly (tests/firmware_bridge/test_bridge_session.py).
"""

from __future__ import annotations

from collections.abc import Iterable

from firmware_bridge.answers import Answer, Replies
from firmware_bridge.cases import HostCases, OpenCase
from firmware_bridge.codes import EVERY_CAPABILITY, Capability, ErrorCode, NackReason, Role
from firmware_bridge.errors import CrcError, FrameError, FrameTooLargeError, MessageDecodeError, UnknownVersionError
from firmware_bridge.frames import DELIMITER, MAX_PAYLOAD, PROTOCOL_VERSION, UNKNOWN_SEQ, Frame, FrameReader
from firmware_bridge.messages import CaseBegin, CaseEnd, ErrorMessage, Heartbeat, Hello, Tile, message_from_frame
from firmware_bridge.sink import CaseInfo, LinkEventSink, TileSink
from firmware_bridge.status import LinkEvent, LinkState, LinkStatus

# Answer is what handle() returns (answers.py).
__all__ = ["EVENT_INTERVAL", "HOST_CAPABILITIES", "SILENCE_FACTOR", "Answer", "HostSession"]

HOST_CAPABILITIES = EVERY_CAPABILITY
SILENCE_FACTOR = 3.0  # a scanner is "down" after this many of its heartbeat intervals without a frame
EVENT_INTERVAL = 1.0  # seconds between two reports of the same noisy event (crc-error, duplicate)


class HostSession:
    """The host end of the protocol for one scanner, across reconnects of its port.

    sink gets case_began / tile_received / case_ended (and link_event, if it has one);
    each must be durable when it returns, and only then does the session ACK. A sink that
    raises gets the frame NACKed (STORAGE, or REFUSED for CaseRefused), so the scanner
    retransmits or stops; `cases` (cases.HostCases) keeps that bookkeeping. `started` is
    the caller's clock reading at start: HEARTBEAT uptimes count from it, and every `now`
    passed in must come from the same clock.
    """

    def __init__(
        self,
        sink: TileSink | None,
        *,
        max_payload: int = MAX_PAYLOAD,
        window: int = 16,
        hash_tiles: bool = True,
        capabilities: Capability = HOST_CAPABILITIES,
        event_interval: float = EVENT_INTERVAL,
        started: float = 0.0,
    ) -> None:
        self.sink = sink
        self.max_payload = max_payload
        self.window = window
        self.capabilities = Capability(capabilities)
        hook = sink.link_event if isinstance(sink, LinkEventSink) else None
        self.status = LinkStatus(hook, event_interval=event_interval)  # the port keeper reports through it too
        self.counters = self.status.counters
        self.peer: Hello | None = None
        self.last_heard: float | None = None  # time of the last intact frame
        self.peer_interval: float | None = None  # seconds, from the scanner's HEARTBEAT
        self._started = started
        self._reader = FrameReader(max_payload=max_payload)
        self._replies = Replies(self.counters)
        self.cases = HostCases(sink, self.status, self._replies, hash_tiles=hash_tiles)
        # The answer being built by handle(), and the time of the frame it answers.
        self._now = started
        self._case_ended: str | None = None
        self._scanner_hello = False

    @property
    def hash_tiles(self) -> bool:
        """Whether each tile's sha256 goes to the sink with it (TileReceived.sha256)."""
        return self.cases.hash_tiles

    @property
    def case(self) -> OpenCase | None:
        """The open case, between its CASE_BEGIN and CASE_END; None when there is none."""
        return self.cases.open

    # --- state a previous host process left behind ------------------------------------------

    def restore_case(self, info: CaseInfo, stored: Iterable[int]) -> None:
        """Re-open a case a previous host process left open, with the tile indices it had stored and ACKed."""
        self.cases.restore(info, stored)

    def restore_ended(self, case_id: str, tile_count: int) -> None:
        """Remember a case a previous host process ended, so a resent CASE_END is re-ACKed, not refused."""
        self.cases.ended.add(case_id, tile_count)

    # --- input -----------------------------------------------------------------------------

    def split(self, data: bytes) -> list[Frame | FrameError]:
        """Count data as received and cut it into frames and damaged chunks (a half frame waits for more)."""
        self.counters.bytes_received += len(data)
        return self._reader.feed(data)

    def receive(self, data: bytes, now: float) -> list[Answer]:
        """split() and handle() every piece. The port keeper instead writes each answer before the next
        frame is handled, so an ACK never waits for the storage of a later tile."""
        return [self.handle(item, now) for item in self.split(data)]

    def new_connection(self) -> None:
        """The port was reopened: a half frame from the old connection must not swallow the first new one."""
        self._reader = FrameReader(max_payload=self.max_payload)

    def port_lost(self) -> None:
        # Silence is now the port's story, not the scanner's: no "down" for missed heartbeats.
        self.peer_interval = None

    def handle(self, item: Frame | FrameError, now: float) -> Answer:
        """Answer one frame or damaged chunk: exactly one ACK, NACK or ERROR (HELLO and HEARTBEAT get theirs)."""
        self._now, self._case_ended, self._scanner_hello = now, None, False
        if isinstance(item, FrameError):
            self._on_frame_error(item)
        else:
            self._on_frame(item)
        return self._replies.take(case_ended=self._case_ended, scanner_hello=self._scanner_hello)

    def check_silence(self, now: float) -> None:
        """Mark the scanner down once nothing intact came for SILENCE_FACTOR of its heartbeat intervals."""
        if self.peer_interval is None:
            return
        heard, limit = self.last_heard, SILENCE_FACTOR * self.peer_interval
        if self.status.state == LinkState.UP and heard is not None and now - heard > limit:
            self.status.set_state(
                LinkState.DOWN,
                f"no frame from the scanner for {now - heard:.1f} s "
                f"(it sends a heartbeat every {self.peer_interval:g} s when idle)",
                now,
            )

    def describe(self) -> dict[str, object]:
        """The scanner's HELLO as negotiated and the open case, as plain JSON-able values (HostLink.snapshot)."""
        peer, case = self.peer, self.case
        return {
            "peer": None if peer is None else {
                "version": peer.version,
                "negotiated_version": min(peer.version, PROTOCOL_VERSION),
                "window": peer.window,
                "max_payload": peer.max_payload,
                "capabilities": [c.name.lower() for c in Capability if c in peer.capabilities],
                "heartbeat_interval_s": self.peer_interval,
            },
            "case": None if case is None else {
                "case_id": case.begin.case_id,
                "tiles_stored": len(case.stored),
                "expected_tiles": case.begin.expected_tiles,
            },
        }

    # --- frames ------------------------------------------------------------------------

    def _on_frame(self, frame: Frame) -> None:
        self.counters.frames_ok += 1
        self.last_heard = self._now
        try:
            msg = message_from_frame(frame)
        except MessageDecodeError as exc:
            self.counters.malformed += 1
            self._problem(LinkEvent.MALFORMED, str(exc))
            self._replies.nack(frame.seq, NackReason.MALFORMED, str(exc))
            return
        if not isinstance(msg, Hello):
            if self.status.state == LinkState.DOWN:
                self.status.set_state(LinkState.UP, "the silent scanner was heard again", self._now)
            elif self.status.state == LinkState.CONNECTING and self.peer is not None:
                # a reopened port (the host's side of a reconnect): the same scanner session goes on
                self.status.set_state(LinkState.UP, "the scanner was heard again on the reopened port", self._now)
        if isinstance(msg, Tile):
            self.cases.on_tile(frame.seq, msg, self._now)
        elif isinstance(msg, Heartbeat):
            self._on_heartbeat(frame.seq, msg)
        elif isinstance(msg, Hello):
            self._on_hello(msg)
        elif isinstance(msg, CaseBegin):
            self.cases.on_case_begin(frame.seq, msg, self._now)
        elif isinstance(msg, CaseEnd):
            if self.cases.on_case_end(frame.seq, msg, self._now):
                self._case_ended = msg.case_id
        elif isinstance(msg, ErrorMessage):
            self._problem(LinkEvent.REMOTE_ERROR, f"{msg.code.name}: {msg.text}")
        else:
            # ACK/NACK flow host -> scanner only; one arriving here is a confused peer.
            self._emit(LinkEvent.UNEXPECTED, f"{type(msg).__name__} from the scanner ignored")

    def _on_frame_error(self, err: FrameError) -> None:
        self.counters.frames_bad += 1
        if isinstance(err, CrcError):
            self.counters.crc_errors += 1
            self._problem(LinkEvent.CRC_ERROR, str(err))
            self._replies.nack(UNKNOWN_SEQ, NackReason.CRC, str(err))
            return
        self.counters.framing_errors += 1
        if isinstance(err, UnknownVersionError):
            self._problem(LinkEvent.VERSION_MISMATCH, str(err))
            self._error(ErrorCode.UNSUPPORTED_VERSION, str(err))
        elif isinstance(err, FrameTooLargeError):
            self._problem(LinkEvent.FRAME_ERROR, str(err))
            self._replies.nack(UNKNOWN_SEQ, NackReason.TOO_LARGE, str(err))
        else:
            # COBS and length damage are transit damage just like a CRC mismatch.
            self._problem(LinkEvent.FRAME_ERROR, str(err))
            self._replies.nack(UNKNOWN_SEQ, NackReason.CRC, str(err))

    def _on_hello(self, msg: Hello) -> None:
        if msg.role != Role.SCANNER:
            self._emit(LinkEvent.UNEXPECTED, f"HELLO with role {msg.role.name}")
            self._error(ErrorCode.PROTOCOL, f"HELLO with role {msg.role.name}; expected SCANNER")
            return
        self.peer = msg
        self.counters.hellos += 1
        self._scanner_hello = True
        self.cases.hello()
        self.peer_interval = None  # until this connection's first HEARTBEAT says otherwise
        reply = Hello(
            version=PROTOCOL_VERSION,
            role=Role.HOST,
            window=self.window,
            max_payload=self.max_payload,
            capabilities=self.capabilities,
        )
        self.status.set_state(
            LinkState.UP,
            f"scanner speaks v{msg.version} (using v{min(msg.version, PROTOCOL_VERSION)}), "
            f"window {msg.window}, max payload {msg.max_payload}",
            self._now,
            always=True,
        )
        # A leading delimiter flushes whatever half-frame the scanner's reader holds.
        self._replies.send(reply, prefix=DELIMITER)

    def _on_heartbeat(self, seq: int, msg: Heartbeat) -> None:
        self.counters.heartbeats += 1
        if msg.interval_ms:
            self.peer_interval = msg.interval_ms / 1000.0
        if not msg.is_reply:
            uptime_ms = int((self._now - self._started) * 1000) & 0xFFFFFFFF
            self._replies.send(Heartbeat(reply_to=seq, uptime_ms=uptime_ms, interval_ms=0))

    # --- answers -----------------------------------------------------------------------

    def _error(self, code: ErrorCode, text: str) -> None:
        peer_max_payload = self.peer.max_payload if self.peer is not None else self.max_payload
        self._replies.error(code, text, peer_max_payload=peer_max_payload)

    # --- events: reported before the answer is written, so whoever sees the answer sees the event too ---

    def _emit(self, kind: LinkEvent, detail: str) -> None:
        self.status.emit(kind, detail, self._now)

    def _problem(self, kind: LinkEvent, detail: str) -> None:
        self.status.problem(kind, detail, self._now)
