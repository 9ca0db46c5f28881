"""The host's protocol session, pure: bytes or frames in; answers to write and sink calls out (PROTOCOL.md 8).

No threads, no port and no clock: HostLink's reader thread (host.py) feeds it what the port
read, with the time, writes the answers it returns, and tells it when the port comes and
goes. Everything the protocol promises about the host, above all "ACK means durable"
(8.2) and "duplicates are idempotent" (8.6), is decided here and can be tested by calling
it directly (tests/firmware_bridge/test_bridge_session.py).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields

from firmware_bridge.cases import EndedCases, OpenCase, check_tile_fits, differences
from firmware_bridge.codec import STR16_MAX
from firmware_bridge.errors import (
    CrcError, FrameError, FrameTooLargeError, MessageDecodeError, TileDecodeError, UnknownVersionError,
)
from firmware_bridge.frames import DELIMITER, MAX_PAYLOAD, PROTOCOL_VERSION, UNKNOWN_SEQ, Frame, FrameReader
from firmware_bridge.messages import (
    EVERY_CAPABILITY, Ack, CaseBegin, CaseEnd, Capability, ErrorCode, ErrorMessage, Heartbeat, Hello, Message, Nack,
    NackReason, Role, Tile, clip_text, decode_tile_pixels, message_from_frame, message_to_frame,
)
from firmware_bridge.pixels import CHANNELS, TileEncoding, check_jpeg
from firmware_bridge.sink import CaseInfo, CaseRefused, LinkEventSink, TileReceived, TileSink
from firmware_bridge.status import LinkEvent, LinkState, LinkStatus

__all__ = ["EVENT_INTERVAL", "HOST_CAPABILITIES", "SILENCE_FACTOR", "Answer", "HostSession"]

log = logging.getLogger(__name__)

HOST_CAPABILITIES = EVERY_CAPABILITY
SILENCE_FACTOR = 3.0  # a scanner is "down" after this many of its heartbeat intervals without a frame
EVENT_INTERVAL = 1.0  # seconds between two reports of the same noisy event (crc-error, duplicate)


@dataclass(frozen=True)
class Answer:
    """What the session made of one frame (or damaged chunk), for the port keeper to carry out in order:
    write `wire`, then, if a case ended, tell whoever waits for it."""

    messages: tuple[Message, ...] = ()  # the answers, as written in wire
    wire: bytes = b""
    case_ended: str | None = None  # case_id whose CASE_END this frame was (first time only)
    scanner_hello: bool = False  # a scanner HELLO was answered: the port demonstrably works


class HostSession:
    """The host end of the protocol for one scanner, across reconnects of its port.

    sink gets case_began / tile_received / case_ended (and link_event, if it has one);
    each must be durable when it returns, and only then does the session ACK. A sink that
    raises gets the frame NACKed (STORAGE, or REFUSED for CaseRefused), so the scanner
    retransmits or stops. `started` is the caller's clock reading at start: HEARTBEAT
    uptimes count from it, and every `now` passed in must come from the same clock.
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
        self.hash_tiles = hash_tiles
        self.capabilities = Capability(capabilities)
        hook = sink.link_event if isinstance(sink, LinkEventSink) else None
        self.status = LinkStatus(hook, event_interval=event_interval)  # the port keeper reports through it too
        self.counters = self.status.counters
        self.peer: Hello | None = None
        self.case: OpenCase | None = None
        self.last_heard: float | None = None  # time of the last intact frame
        self.peer_interval: float | None = None  # seconds, from the scanner's HEARTBEAT
        self._started = started
        self._reader = FrameReader(max_payload=max_payload)
        self._seq = 0
        self._hello_since_begin = False  # a CASE_BEGIN for the open case is now a resume
        self._ended = EndedCases()
        # The answer being built by handle(), and the time of the frame it answers.
        self._now = started
        self._replies: list[tuple[Message, bytes]] = []
        self._case_ended: str | None = None
        self._scanner_hello = False

    # --- state a previous host process left behind ------------------------------------------

    def restore_case(self, info: CaseInfo, stored: Iterable[int]) -> None:
        """Re-open a case a previous host process left open, with the tile indices it had stored and ACKed."""
        begin = CaseBegin(**{f.name: getattr(info, f.name) for f in fields(CaseBegin)})
        self.case = OpenCase(begin=begin, stored=set(stored))
        self._hello_since_begin = True

    def restore_ended(self, case_id: str, tile_count: int) -> None:
        """Remember a case a previous host process ended, so a resent CASE_END is re-ACKed, not refused."""
        self._ended.add(case_id, tile_count)

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
        self._now, self._replies, self._case_ended, self._scanner_hello = now, [], None, False
        if isinstance(item, FrameError):
            self._on_frame_error(item)
        else:
            self._on_frame(item)
        return Answer(
            messages=tuple(msg for msg, _ in self._replies),
            wire=b"".join(wire for _, wire in self._replies),
            case_ended=self._case_ended,
            scanner_hello=self._scanner_hello,
        )

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

    # --- frames ------------------------------------------------------------------------

    def _on_frame(self, frame: Frame) -> None:
        self.counters.frames_ok += 1
        self.last_heard = self._now
        try:
            msg = message_from_frame(frame)
        except MessageDecodeError as exc:
            self.counters.malformed += 1
            self._problem(LinkEvent.MALFORMED, str(exc))
            self._nack(frame.seq, NackReason.MALFORMED, str(exc))
            return
        if not isinstance(msg, Hello):
            if self.status.state == LinkState.DOWN:
                self.status.set_state(LinkState.UP, "the silent scanner was heard again", self._now)
            elif self.status.state == LinkState.CONNECTING and self.peer is not None:
                # a reopened port (the host's side of a reconnect): the same scanner session goes on
                self.status.set_state(LinkState.UP, "the scanner was heard again on the reopened port", self._now)
        if isinstance(msg, Tile):
            self._on_tile(frame.seq, msg)
        elif isinstance(msg, Heartbeat):
            self._on_heartbeat(frame.seq, msg)
        elif isinstance(msg, Hello):
            self._on_hello(msg)
        elif isinstance(msg, CaseBegin):
            self._on_case_begin(frame.seq, msg)
        elif isinstance(msg, CaseEnd):
            self._on_case_end(frame.seq, msg)
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
            self._nack(UNKNOWN_SEQ, NackReason.CRC, str(err))
            return
        self.counters.framing_errors += 1
        if isinstance(err, UnknownVersionError):
            self._problem(LinkEvent.VERSION_MISMATCH, str(err))
            self._error(ErrorCode.UNSUPPORTED_VERSION, str(err))
        elif isinstance(err, FrameTooLargeError):
            self._problem(LinkEvent.FRAME_ERROR, str(err))
            self._nack(UNKNOWN_SEQ, NackReason.TOO_LARGE, str(err))
        else:
            # COBS and length damage are transit damage just like a CRC mismatch.
            self._problem(LinkEvent.FRAME_ERROR, str(err))
            self._nack(UNKNOWN_SEQ, NackReason.CRC, str(err))

    def _on_hello(self, msg: Hello) -> None:
        if msg.role != Role.SCANNER:
            self._emit(LinkEvent.UNEXPECTED, f"HELLO with role {msg.role.name}")
            self._error(ErrorCode.PROTOCOL, f"HELLO with role {msg.role.name}; expected SCANNER")
            return
        self.peer = msg
        self.counters.hellos += 1
        self._scanner_hello = True
        self._hello_since_begin = True
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
        self._send(reply, prefix=DELIMITER)

    def _on_heartbeat(self, seq: int, msg: Heartbeat) -> None:
        self.counters.heartbeats += 1
        if msg.interval_ms:
            self.peer_interval = msg.interval_ms / 1000.0
        if not msg.is_reply:
            uptime_ms = int((self._now - self._started) * 1000) & 0xFFFFFFFF
            self._send(Heartbeat(reply_to=seq, uptime_ms=uptime_ms, interval_ms=0))

    def _on_case_begin(self, seq: int, msg: CaseBegin) -> None:
        case = self.case
        if case is not None and case.begin.case_id == msg.case_id:
            if case.begin != msg:
                self._refuse_case(seq, msg.case_id, differences(case.begin, msg))
            elif self._hello_since_begin:
                # Same case, same fields, new connection: the scanner resumes after a
                # reconnect. Keep what is stored; the sink already knows the case.
                self._hello_since_begin = False
                self.counters.resumes += 1
                stored = len(case.stored)
                self._emit(LinkEvent.RESUMED, f"case {msg.case_id} resumed with {stored} tiles already stored")
                self._ack(seq, msg.case_id, -1)
            else:
                self._duplicate(seq, msg.case_id, -1, f"CASE_BEGIN {msg.case_id}")
            return
        if msg.channels != CHANNELS:
            self.counters.malformed += 1
            detail = f"case {msg.case_id}: {msg.channels} channels; v1 carries 3 (RGB)"
            self._problem(LinkEvent.MALFORMED, detail)
            self._nack(seq, NackReason.MALFORMED, detail)
            return
        info = CaseInfo.from_message(msg)
        if not self._call_sink(seq, f"case {msg.case_id} begin", self.sink.case_began, info):
            return
        if case is not None:
            self._emit(LinkEvent.CASE_ABANDONED, f"case {case.begin.case_id} never ended; {msg.case_id} began")
        self._ended.forget(msg.case_id)
        self.case = OpenCase(begin=msg)
        self._hello_since_begin = False
        self._ack(seq, msg.case_id, -1)

    def _on_tile(self, seq: int, tile: Tile) -> None:
        case = self.case
        if case is None or case.begin.case_id != tile.case_id:
            detail = f"tile {tile.index}: case {tile.case_id} is not open (send CASE_BEGIN first)"
            self._problem(LinkEvent.UNKNOWN_CASE, detail)
            self._nack(seq, NackReason.UNKNOWN_CASE, detail)
            return
        if tile.index in case.stored:
            self._duplicate(seq, tile.case_id, tile.index, f"tile {tile.index} of {tile.case_id}")
            return
        jpeg = tile.encoding == TileEncoding.JPEG
        try:
            check_tile_fits(case.begin, tile)
            if jpeg:
                check_jpeg(tile.payload, tile.w, tile.h, label=f"tile {tile.index}")
                pixels = None
            else:
                pixels = decode_tile_pixels(tile)
        except TileDecodeError as exc:
            self.counters.bad_tiles += 1
            self._problem(LinkEvent.BAD_TILE, f"case {tile.case_id}: {exc}")
            self._nack(seq, NackReason.BAD_TILE, str(exc))
            return
        payload = bytes(tile.payload) if jpeg else None
        digest = None
        if self.hash_tiles:
            # hashlib reads the (C-contiguous) array's buffer directly: no tobytes() copy.
            digest = hashlib.sha256(payload if jpeg else pixels).hexdigest()
        received = TileReceived(
            tile.case_id, tile.index, tile.x, tile.y, tile.w, tile.h, decoded=pixels, jpeg=payload, sha256=digest,
            encoding=tile.encoding.name.lower(), payload_size=len(tile.payload),
        )
        if not self._call_sink(seq, f"tile {tile.index} of {tile.case_id}", self.sink.tile_received, received):
            return
        case.stored.add(tile.index)
        self.counters.tiles_stored += 1
        self.counters.tile_bytes += tile.w * tile.h * CHANNELS
        self._ack(seq, tile.case_id, tile.index)

    def _on_case_end(self, seq: int, msg: CaseEnd) -> None:
        if msg.case_id in self._ended:
            self._duplicate(seq, msg.case_id, -1, f"CASE_END {msg.case_id}")
            return
        case = self.case
        if case is None or case.begin.case_id != msg.case_id:
            detail = f"CASE_END for {msg.case_id}, which is not open"
            self._problem(LinkEvent.UNKNOWN_CASE, detail)
            self._nack(seq, NackReason.UNKNOWN_CASE, detail)
            return
        if len(case.stored) != msg.tile_count:
            self._emit(
                LinkEvent.CASE_INCOMPLETE,
                f"case {msg.case_id}: scanner reports {msg.tile_count} tiles, {len(case.stored)} stored",
            )
        if not self._call_sink(seq, f"case {msg.case_id} end", self.sink.case_ended, msg.case_id, msg.tile_count):
            return
        self.case = None
        self._ended.add(msg.case_id, msg.tile_count)
        self._ack(seq, msg.case_id, -1)
        self._case_ended = msg.case_id

    # --- answers -----------------------------------------------------------------------

    def _call_sink(self, seq: int, what: str, method: Callable[..., None], *args: object) -> bool:
        """Run one sink call; if it raises, NACK STORAGE so the scanner retransmits, or NACK REFUSED if the
        sink raised CaseRefused (the scanner stops the case)."""
        try:
            method(*args)
        except CaseRefused as exc:
            self.counters.cases_refused += 1
            detail = f"{what}: {exc}"
            log.warning("sink refused, NACKing REFUSED: %s", detail)
            self._problem(LinkEvent.STORAGE_ERROR, detail)
            self._nack(seq, NackReason.REFUSED, detail)
            return False
        except Exception as exc:  # noqa: BLE001 - the sink contract: any failure means "not stored"
            self.counters.storage_errors += 1
            detail = f"{what}: {type(exc).__name__}: {exc}"
            log.warning("sink failed, NACKing STORAGE: %s", detail, exc_info=exc)
            self._problem(LinkEvent.STORAGE_ERROR, detail)
            self._nack(seq, NackReason.STORAGE, detail)
            return False
        return True

    def _refuse_case(self, seq: int, case_id: str, differences: str) -> None:
        self.counters.malformed += 1
        detail = (
            f"case {case_id} is already open with different fields ({differences}); "
            "end it with CASE_END or use a new case_id"
        )
        self._problem(LinkEvent.CASE_CONFLICT, detail)
        self._nack(seq, NackReason.MALFORMED, detail)

    def _duplicate(self, seq: int, case_id: str, index: int, what: str) -> None:
        self.counters.duplicates += 1
        self._emit(LinkEvent.DUPLICATE, f"{what} already stored; ACKed again")
        self._ack(seq, case_id, index)

    def _ack(self, seq: int, case_id: str, index: int) -> None:
        self.counters.acks_sent += 1
        self._send(Ack(acked_seq=seq, case_id=case_id, tile_index=index))

    def _nack(self, seq: int, reason: NackReason, detail: str) -> None:
        self.counters.nacks_sent += 1
        self._send(Nack(seq=seq, reason=reason, detail=clip_text(detail)))

    def _error(self, code: ErrorCode, text: str) -> None:
        # A small scanner may announce a max_payload of a few hundred bytes; never send it
        # a frame it has to drop.
        room = (self.peer.max_payload if self.peer is not None else self.max_payload) - ErrorMessage.LAYOUT.size - 2
        self._send(ErrorMessage(code, clip_text(text, max(0, min(STR16_MAX, room)))))

    def _send(self, msg: Message, *, prefix: bytes = b"") -> None:
        seq = self._seq
        self._seq = (self._seq + 1) % UNKNOWN_SEQ  # never emit the reserved value
        self._replies.append((msg, prefix + message_to_frame(msg, seq)))

    # --- events: reported before the answer is written, so whoever sees the answer sees the event too ---

    def _emit(self, kind: LinkEvent, detail: str) -> None:
        self.status.emit(kind, detail, self._now)

    def _problem(self, kind: LinkEvent, detail: str) -> None:
        self.status.problem(kind, detail, self._now)
