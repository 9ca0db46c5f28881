"""The scanner's protocol session, pure: what to send next and what each answer from the host means (PROTOCOL.md 8).

No port, no threads and no clock: ScannerEmulator (emulator.py) writes the frames it returns,
in order, feeds it whatever the host sent with the time, and tells it when the cable went and
came back. The phases of a case (HELLO, CASE_BEGIN, the tiles, CASE_END), the negotiation with
the host's HELLO, heartbeats and the resume after a reconnect (8.8) are decided here and can be
tested by calling it directly (tests/firmware_bridge/test_bridge_scanner_session.py); which
frames are in flight and when each is due again is its SendWindow's business (window.py).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from enum import StrEnum

from firmware_bridge.codes import ENCODING_CAPABILITY, EVERY_CAPABILITY, Capability, Role
from firmware_bridge.errors import FrameError, LinkError, MessageDecodeError, NegotiationError, RemoteError
from firmware_bridge.frames import DELIMITER, MAX_PAYLOAD, PROTOCOL_VERSION, UNKNOWN_SEQ
from firmware_bridge.messages import (
    Ack, CaseBegin, CaseEnd, ErrorMessage, Heartbeat, Hello, Message, Nack, Tile, message_to_frame,
)
from firmware_bridge.pixels import TileEncoding
from firmware_bridge.scanjob import EmulatorResult
from firmware_bridge.window import HelloRetry, Pending, SendWindow, check_window

__all__ = ["HELLO_RETRY_INITIAL", "SCANNER_CAPABILITIES", "Phase", "ScannerSession", "ScannerSettings"]

log = logging.getLogger(__name__)

HELLO_RETRY_INITIAL = 0.05  # after a reconnect HELLO is resent this soon, doubling to ack_timeout
SCANNER_CAPABILITIES = EVERY_CAPABILITY


class Phase(StrEnum):
    """Where the case stands (ScannerSession.phase)."""

    HELLO = "hello"  # waiting for the host's HELLO on this connection
    BEGIN = "begin"  # CASE_BEGIN out until ACKed; after a reconnect it is the resume request
    TILES = "tiles"  # tiles go out as the window has room, those parked by a reconnect first
    END = "end"  # every tile ACKed or rejected: CASE_END out until ACKed
    DONE = "done"  # the case is delivered; only heartbeats and late answers are left


@dataclass(frozen=True)
class ScannerSettings:
    """The scanner's side of the protocol: what its HELLO announces, the tile encoding it needs the host to
    take, and its timers (PROTOCOL.md 8.5, 9). ScannerEmulator's keyword arguments of these names fill it in."""

    encoding: TileEncoding = TileEncoding.RAW  # also "raw", "zlib", "png", "jpeg"
    window: int = 4
    ack_timeout: float = 2.0
    max_retries: int = 5
    retry_delay: float = 0.05
    max_payload: int = MAX_PAYLOAD
    heartbeat_interval: float = 1.0  # 0 = no heartbeats of our own
    reconnect_timeout: float = 30.0

    def __post_init__(self) -> None:
        check_window(self.window, ack_timeout=self.ack_timeout, max_retries=self.max_retries)
        if self.heartbeat_interval < 0 or self.heartbeat_interval > 65.535:
            raise ValueError(f"heartbeat_interval={self.heartbeat_interval} must be 0 (off) to 65.535 s")
        object.__setattr__(self, "encoding", TileEncoding.parse(self.encoding))


class ScannerSession:
    """The scanner end of the protocol for one case, across reconnects of its cable.

    Each method that may send returns the frames to write now, in order, as wire bytes; `now`
    is the caller's clock, the same clock as `started` (HEARTBEAT uptimes count from it). What
    ends the case is raised: RemoteError (the host sent ERROR), NegotiationError, and the
    window's DeliveryError and LinkTimeoutError. `result` counts everything but the writes.
    """

    def __init__(self, case: CaseBegin, settings: ScannerSettings | None = None, *, started: float = 0.0) -> None:
        self.case = case
        self.settings = settings = settings or ScannerSettings()
        self.result = EmulatorResult(case_id=case.case_id)
        self.window = SendWindow(
            settings.window,
            ack_timeout=settings.ack_timeout,
            max_retries=settings.max_retries,
            retry_delay=settings.retry_delay,
        )
        self.peer: Hello | None = None  # the host's latest HELLO
        self.heartbeats = False  # this connection's host takes HEARTBEAT and the settings want them
        self.next_index = 0  # the index the next new tile gets
        self._started = started
        self._seq = 0
        self._connected = False  # the host's HELLO came on this connection
        self._stage = Phase.BEGIN  # the case's phase once connected
        self._begin = case  # the CASE_BEGIN the hosts so far can read (_negotiate)
        self._peer_max_payload = settings.max_payload
        self._exhausted = False  # the caller has no more tiles
        self._control: Pending | None = None  # CASE_BEGIN or CASE_END in flight

    @property
    def phase(self) -> Phase:
        """HELLO until the host's HELLO came on this connection, then where the case stands."""
        return self._stage if self._connected else Phase.HELLO

    @property
    def resuming(self) -> bool:
        """The cable was plugged back in at least once: HELLO and CASE_BEGIN now resume the case (8.8)."""
        return self.result.reconnects > 0

    @property
    def wants_tile(self) -> bool:
        """The window has room for a new tile, no parked tile goes first, and the caller has not run out."""
        return (
            self.phase == Phase.TILES and not self._exhausted and not self.window.parked and self.window.has_room
        )

    # --- the connection ----------------------------------------------------------------

    def hello(self, now: float) -> tuple[bytes, HelloRetry]:
        """Start (again) at HELLO: its frame, sent as is each time, and when to resend it or give up."""
        settings = self.settings
        hello = Hello(
            version=PROTOCOL_VERSION,
            role=Role.SCANNER,
            window=settings.window,
            max_payload=settings.max_payload,
            capabilities=SCANNER_CAPABILITIES,
        )
        # The leading delimiter ends any garbage the host's reader is holding (echo, noise).
        wire = DELIMITER + message_to_frame(hello, self._next_seq())
        retry = HelloRetry(
            resuming=self.resuming,
            ack_timeout=settings.ack_timeout,
            max_retries=settings.max_retries,
            reconnect_timeout=settings.reconnect_timeout,
            initial=HELLO_RETRY_INITIAL,
            now=now,
        )
        return wire, retry

    def disconnected(self) -> None:
        """The cable went: park unACKed tiles and start over at HELLO; the case resumes where it was."""
        self.result.disconnects += 1
        # CASE_BEGIN / CASE_END in flight are simply sent again by next_frames(); tiles keep
        # their frames (and seqs) and go out again, in index order, before any new tile.
        self.window.park_tiles()
        self._control = None
        self._connected = False
        self.heartbeats = False
        if self._stage == Phase.TILES:
            self._stage = Phase.BEGIN  # the same CASE_BEGIN is the resume request (RESUME)

    def reconnected(self) -> None:
        """A cable is plugged in again: the next HELLO is a resume (HelloRetry's reconnect timing)."""
        self.result.reconnects += 1

    # --- the case ----------------------------------------------------------------------

    def next_frames(self, now: float) -> list[bytes]:
        """What the phase sends without waiting for an answer: CASE_BEGIN, tiles parked by a reconnect, CASE_END."""
        if self.phase == Phase.BEGIN and self._control is None:
            label = "CASE_BEGIN (resume)" if self.resuming else "CASE_BEGIN"
            return [self._submit_control(self._begin, label, now)]
        if self.phase == Phase.TILES:
            out = []
            while self.window.has_room and (parked := self.window.unpark()) is not None:
                # A tile unACKed when the cable went: same frame, same seq.
                self.result.retransmits += 1
                out.append(self._transmit(parked, now))
            if out or not (self._exhausted and self.window.empty):
                return out
            self._stage = Phase.END
        if self.phase == Phase.END and self._control is None:
            # Once CASE_END has gone out, a reconnect resends only CASE_END: every tile is
            # already ACKed, and the host may have ended the case and forgotten it as open.
            return [self._submit_control(CaseEnd(self.case.case_id, self.result.tiles_sent), "CASE_END", now)]
        return []

    def add_tile(self, tile: Tile, now: float, *, digest: str | None = None) -> bytes:
        """Put the next new tile in flight (while wants_tile; its index must be next_index) and return its frame.

        digest: what the host will keep of it, for EmulatorResult.digests, if the caller keeps them.
        """
        if not self.wants_tile:
            raise LinkError(f"no room for tile {tile.index} now (phase {self.phase}, {len(self.window)} in flight)")
        if tile.index != self.next_index or tile.case_id != self.case.case_id:
            raise ValueError(
                f"tile {tile.index} of case {tile.case_id!r} is not the next one: tile {self.next_index} "
                f"of {self.case.case_id!r}"
            )
        self.next_index += 1
        if digest is not None:
            self.result.digests[tile.index] = digest
        self.result.tiles_sent += 1
        return self._transmit(self._add(tile, f"tile {tile.index}", tile.index), now)

    def tiles_exhausted(self) -> None:
        """The caller has no more tiles: CASE_END follows once every tile in flight is ACKed or rejected."""
        self._exhausted = True

    # --- answers and timers ------------------------------------------------------------

    def deadline(self, now: float, last_write: float) -> float:
        """When the next thing is due without an answer: a retransmission, or a heartbeat on an idle line.

        last_write is the time of the caller's latest write to the port.
        """
        nearest = self.window.nearest_deadline(default=now + self.settings.ack_timeout)
        if self.heartbeats:
            nearest = min(nearest, last_write + self.settings.heartbeat_interval)
        return nearest

    def receive(self, item: object, now: float, seq: int = UNKNOWN_SEQ) -> list[bytes]:
        """Apply what the port read (a message, a FrameError or MessageDecodeError, or None); return frames to write.

        seq is the header seq of the frame that carried a message: a HEARTBEAT's reply names it.
        """
        if isinstance(item, ErrorMessage):
            raise RemoteError(int(item.code), item.text)
        if self.phase == Phase.HELLO:
            if isinstance(item, Hello) and item.role == Role.HOST:
                self._negotiate(item)
            # Anything else before the host's HELLO (NACKs of line noise, our own echo on a
            # pty not yet in raw mode) carries no information for us.
            return []
        if isinstance(item, Ack):
            return self._on_ack(item, now)
        if isinstance(item, Nack):
            return self._on_nack(item, now)
        if isinstance(item, Heartbeat):
            return self._on_heartbeat(item, seq, now)
        if isinstance(item, (FrameError, MessageDecodeError)):
            self.result.corrupt_answers += 1
            log.debug("undecodable frame from the host: %s", item)
        # A host HELLO here is a late duplicate of the handshake; our own echoed frames are noise.
        return []

    def tick(self, now: float, last_write: float) -> list[bytes]:
        """What is due at `now`: a heartbeat after heartbeat_interval of silence on our side, and every frame
        whose ACK is overdue or whose NACK asked for a resend. Raises for a frame out of retries."""
        out = []
        if self.heartbeats and now - last_write >= self.settings.heartbeat_interval:
            out.append(self._heartbeat(now))
        for p, timed_out in self.window.due(now):
            if timed_out:
                self.result.timeouts += 1
            out.append(self._transmit(p, now))
        return out

    # --- inside ------------------------------------------------------------------------

    def _negotiate(self, host: Hello) -> None:
        self.peer = host
        settings = self.settings
        needed = ENCODING_CAPABILITY[settings.encoding]
        if needed and not host.capabilities & needed:
            raise NegotiationError(
                f"the host does not accept {settings.encoding.name.lower()} tiles "
                f"(capabilities {host.capabilities!r}); use encoding='raw'"
            )
        self.window.size = min(settings.window, host.window) if host.window else settings.window
        self._peer_max_payload = min(settings.max_payload, host.max_payload)
        self.heartbeats = bool(host.capabilities & Capability.HEARTBEAT) and settings.heartbeat_interval > 0
        self._begin = self._begin_for(host)
        self._connected = True
        log.debug(
            "host HELLO: v%d (using v%d) window %d max payload %d",
            host.version, min(host.version, PROTOCOL_VERSION), host.window, host.max_payload,
        )

    def _begin_for(self, host: Hello) -> CaseBegin:
        """CASE_BEGIN without the accession for a host that cannot take one: the case is scanned all the same.

        Once left out, it stays out, also for a host met after a reconnect: a resumed CASE_BEGIN must match
        the case that host holds (8.8).
        """
        if not self._begin.accession or host.capabilities & Capability.ACCESSION:
            return self._begin
        log.warning(
            "the host cannot take accession numbers (its HELLO lacks capability ACCESSION): "
            "case %s is sent without its accession %r",
            self.case.case_id, self._begin.accession,
        )
        return dataclasses.replace(self._begin, accession="")

    def _on_ack(self, ack: Ack, now: float) -> list[bytes]:
        p = self.window.on_ack(ack)
        if p is None:
            return []
        if p.tile_index >= 0:
            self.result.acked.append(p.tile_index)
        elif p is self._control:
            self._control = None
            self._stage = Phase.TILES if self._stage == Phase.BEGIN else Phase.DONE
        return self._resend_overtaken(p, now)

    def _on_nack(self, nack: Nack, now: float) -> list[bytes]:
        self.result.nacks_received += 1
        p = self.window.on_nack(nack, now)
        if p is None:
            return []
        if p.rejected:
            self.result.rejected[p.tile_index] = p.last_nack
            log.warning("host rejected %s: %s", p.label, p.last_nack)
        return self._resend_overtaken(p, now)

    def _resend_overtaken(self, answered: Pending, now: float) -> list[bytes]:
        return [self._transmit(p, now) for p in self.window.overtaken(answered)]

    def _on_heartbeat(self, beat: Heartbeat, seq: int, now: float) -> list[bytes]:
        if beat.is_reply:
            self.result.heartbeat_replies += 1
            return []
        reply = Heartbeat(reply_to=seq, uptime_ms=self._uptime_ms(now))
        return [message_to_frame(reply, self._next_seq())]

    def _heartbeat(self, now: float) -> bytes:
        beat = Heartbeat(
            reply_to=UNKNOWN_SEQ,
            uptime_ms=self._uptime_ms(now),
            interval_ms=int(round(self.settings.heartbeat_interval * 1000)),
        )
        self.result.heartbeats_sent += 1
        return message_to_frame(beat, self._next_seq())

    def _submit_control(self, msg: CaseBegin | CaseEnd, label: str, now: float) -> bytes:
        self._control = self._add(msg, label, -1)
        return self._transmit(self._control, now)

    def _add(self, msg: Message, label: str, tile_index: int) -> Pending:
        seq = self._next_seq()
        wire = message_to_frame(msg, seq, max_payload=self._peer_max_payload)
        return self.window.add(seq, label, wire, self.case.case_id, tile_index)

    def _transmit(self, p: Pending, now: float) -> bytes:
        if self.window.sent(p, now):
            self.result.retransmits += 1
        return p.wire

    def _next_seq(self) -> int:
        seq = self._seq
        self._seq = (self._seq + 1) % UNKNOWN_SEQ
        return seq

    def _uptime_ms(self, now: float) -> int:
        return int((now - self._started) * 1000) & 0xFFFFFFFF
