"""Scanner firmware side of the link: HELLO, CASE_BEGIN, windowed TILEs with retransmission, CASE_END.

Given a PtyCable instead of a plain transport, the emulator also survives the cable being
pulled (by a DISCONNECT fault or by someone else): it waits for the cable, says HELLO
again, resumes the case with the same CASE_BEGIN and resends every tile not yet ACKed.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterable, Iterator, Sized
from typing import TYPE_CHECKING

from firmware_bridge.errors import (
    DeliveryError, FrameError, LinkError, MessageDecodeError, NegotiationError, RemoteError,
)
from firmware_bridge.faults import BitFlipFaults, Faults
from firmware_bridge.frames import DELIMITER, MAX_PAYLOAD, PROTOCOL_VERSION, UNKNOWN_SEQ
from firmware_bridge.messages import (
    ENCODING_CAPABILITY,
    EVERY_CAPABILITY,
    Ack,
    CaseBegin,
    CaseEnd,
    Capability,
    ErrorMessage,
    Heartbeat,
    Hello,
    Message,
    Nack,
    Role,
    message_to_frame,
)
from firmware_bridge.pixels import JPEG_QUALITY, TileEncoding, encode_pixels
from firmware_bridge.scanjob import (
    EmulatorResult,
    JpegTile,
    ProgressCallback,
    TileOnDemand,
    TileToSend,
    case_begin_from,
    expected_digest,
)
from firmware_bridge.scanner_port import Disconnected, Pluggable, ScannerPort
from firmware_bridge.transport import Transport
from firmware_bridge.window import CRC_GRACE_SHARE, HelloRetry, Pending, SendWindow

if TYPE_CHECKING:
    from firmware_bridge.sink import CaseInfo

__all__ = [
    "CRC_GRACE_SHARE",
    "BitFlipFaults",
    "DeliveryError",
    "EmulatorResult",
    "Faults",
    "JpegTile",
    "Pluggable",
    "ScannerEmulator",
    "TileOnDemand",
    "TileToSend",
]

log = logging.getLogger(__name__)

HELLO_RETRY_INITIAL = 0.05  # after a reconnect HELLO is resent this soon, doubling to ack_timeout
SCANNER_CAPABILITIES = EVERY_CAPABILITY


class ScannerEmulator:
    """Plays the scanner for one case over a transport or a PtyCable.

    Its ScannerPort's reader thread only reads and decodes; run() does every write, so the
    transport sees one reader and one writer, as serial.Serial allows. Which frames are in
    flight and when each is due again is the SendWindow's business.
    """

    def __init__(
        self,
        transport: Transport | Pluggable,
        case: CaseBegin | CaseInfo,
        tiles: Iterable[TileToSend | TileOnDemand],
        *,
        encoding: TileEncoding | str = "raw",
        window: int = 4,
        ack_timeout: float = 2.0,
        max_retries: int = 5,
        retry_delay: float = 0.05,
        progress: ProgressCallback | None = None,
        faults: Faults | None = None,
        max_payload: int = MAX_PAYLOAD,
        jpeg_quality: int = JPEG_QUALITY,
        heartbeat_interval: float = 1.0,
        linger: float = 0.0,
        replug_delay: float = 0.05,
        reconnect_timeout: float = 30.0,
        keep_digests: bool = False,
        pre_encode: bool = False,
    ) -> None:
        # First, so its checks of window, ack_timeout and max_retries come before the others.
        self._window = SendWindow(window, ack_timeout=ack_timeout, max_retries=max_retries, retry_delay=retry_delay)
        if heartbeat_interval < 0 or heartbeat_interval > 65.535:
            raise ValueError(f"heartbeat_interval={heartbeat_interval} must be 0 (off) to 65.535 s")
        self.case = case if isinstance(case, CaseBegin) else case_begin_from(case)
        self.tiles = tiles
        self.encoding = TileEncoding.parse(encoding)
        self.window = window
        self.ack_timeout = ack_timeout
        self.max_retries = max_retries
        self.retry_delay = retry_delay
        self.progress = progress
        self.faults = faults
        self.max_payload = max_payload
        self.jpeg_quality = jpeg_quality
        self.heartbeat_interval = heartbeat_interval
        self.linger = linger
        self.replug_delay = replug_delay
        self.reconnect_timeout = reconnect_timeout
        self.keep_digests = keep_digests
        self.pre_encode = pre_encode
        self.peer: Hello | None = None
        self._begin = self.case  # the CASE_BEGIN the hosts so far can read (_negotiate)
        self.result = EmulatorResult(case_id=self.case.case_id)
        self._total = len(tiles) if isinstance(tiles, Sized) else (self.case.expected_tiles or None)
        self._seq = 0
        self._port = ScannerPort(
            transport,
            faults=faults,
            max_payload=max_payload,
            replug_delay=replug_delay,
            reconnect_timeout=reconnect_timeout,
            on_frame_written=self._frame_written,
        )
        self._peer_max_payload = max_payload
        self._heartbeats = False
        self._started = False
        self._t0 = time.monotonic()
        # Case progress, kept across reconnects so the case resumes where it was.
        self._tile_iter: Iterator[tuple[TileToSend, bytes | None]] = iter(())
        self._next_index = 0
        self._exhausted = False
        self._hello_done = False
        self._begun = False  # CASE_BEGIN ACKed on the current connection
        self._ending = False  # CASE_END sent: every tile is ACKed or rejected
        self._case_done = False
        self._linger_until = 0.0

    # --- public ----------------------------------------------------------------------

    @property
    def transport(self) -> Transport:
        """The transport of the current plug-in (a new one after each replug of a cable)."""
        return self._port.transport

    def run(self) -> EmulatorResult:
        """Deliver the whole case once; raises LinkTimeoutError, DeliveryError, RemoteError, TransportError."""
        if self._started:
            raise LinkError("ScannerEmulator.run() delivers one case; create a new emulator for the next")
        self._started = True
        if getattr(self.transport, "timeout", 0) is None:
            # The reader thread polls its stop flag between reads; a read without a timeout
            # would keep it (and run()) waiting forever at the end.
            raise ValueError(f"{self.transport!r} has no read timeout; open it with a timeout")
        self._tile_iter = self._prepared_tiles()
        self._port.open()
        try:
            while True:
                try:
                    self._drive()
                    break
                except Disconnected as cut:
                    self._recover(cut)
        finally:
            self._port.close()
            # Everything is ACKed (or we are failing): a frame a REORDER still holds back
            # is a needless resend; it must not leak into the next case's link.
            self._port.discard_faults()
        return self.result

    # --- phases ----------------------------------------------------------------------

    def _drive(self) -> None:
        """Run (or resume, after a reconnect) whatever phase the case is in."""
        if not self._hello_done:
            self._handshake()
            self._hello_done = True
        if not self._case_done:
            if not self._ending:
                if not self._begun:
                    # After a reconnect the same CASE_BEGIN is the resume request (RESUME).
                    label = "CASE_BEGIN" if self._port.connections == 1 else "CASE_BEGIN (resume)"
                    self._deliver(self._begin, label)
                    self._begun = True
                self._stream_tiles()
                self._ending = True
            # Once CASE_END has gone out, a reconnect resends only CASE_END: every tile is
            # already ACKed, and the host may have ended the case and forgotten it as open.
            self._deliver(CaseEnd(self.case.case_id, self.result.tiles_sent), "CASE_END")
            self._case_done = True
            self._linger_until = time.monotonic() + self.linger
        while (remaining := self._linger_until - time.monotonic()) > 0:
            self._service(remaining)

    def _handshake(self) -> None:
        hello = Hello(
            version=PROTOCOL_VERSION,
            role=Role.SCANNER,
            window=self.window,
            max_payload=self.max_payload,
            capabilities=SCANNER_CAPABILITIES,
        )
        # The leading delimiter ends any garbage the host's reader is holding (echo, noise).
        wire = DELIMITER + message_to_frame(hello, self._next_seq())
        retry = HelloRetry(
            resuming=self._port.connections > 1,
            ack_timeout=self.ack_timeout,
            max_retries=self.max_retries,
            reconnect_timeout=self.reconnect_timeout,
            initial=HELLO_RETRY_INITIAL,
            now=time.monotonic(),
        )
        while True:
            wait = retry.next_wait(time.monotonic(), repr(self.transport))
            self._port.write(wire)
            deadline = time.monotonic() + wait
            while (remaining := deadline - time.monotonic()) > 0:
                item = self._port.next_item(remaining)
                if isinstance(item, Hello) and item.role == Role.HOST:
                    self._negotiate(item)
                    return
                if isinstance(item, ErrorMessage):
                    raise RemoteError(int(item.code), item.text)
                # Anything else before the host's HELLO (NACKs of line noise, our own echo
                # on a pty not yet in raw mode) carries no information for us.

    def _negotiate(self, host: Hello) -> None:
        self.peer = host
        needed = ENCODING_CAPABILITY[self.encoding]
        if needed and not host.capabilities & needed:
            raise NegotiationError(
                f"the host does not accept {self.encoding.name.lower()} tiles "
                f"(capabilities {host.capabilities!r}); use encoding='raw'"
            )
        self._window.size = min(self.window, host.window) if host.window else self.window
        self._peer_max_payload = min(self.max_payload, host.max_payload)
        self._heartbeats = bool(host.capabilities & Capability.HEARTBEAT) and self.heartbeat_interval > 0
        self._begin = self._begin_for(host)
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

    def _deliver(self, msg: Message, label: str) -> None:
        pending = self._submit(msg, label, -1)
        while pending.seq in self._window:
            self._service()

    def _prepared_tiles(self) -> Iterator[tuple[TileToSend, bytes | None]]:
        if not self.pre_encode:
            return ((tile, None) for tile in self.tiles)
        # Like a scanner whose hardware compresses ahead of the link: encode everything
        # first, so the link's speed is measured, not the codec's.
        return iter([(tile, self._encode(tile)) for tile in self.tiles])

    def _encode(self, tile: TileToSend | TileOnDemand | JpegTile) -> bytes:
        if isinstance(tile, JpegTile) and self.encoding == TileEncoding.JPEG:
            return tile.jpeg  # compressed by the scanner's hardware
        return encode_pixels(tile.pixels, self.encoding, quality=self.jpeg_quality)

    def _stream_tiles(self) -> None:
        while True:
            while self._window.has_room:
                parked = self._window.unpark()
                if parked is not None:
                    # A tile unACKed when the cable went: same frame, same seq.
                    self.result.retransmits += 1
                    self._transmit(parked)
                    continue
                if self._exhausted:
                    break
                item = next(self._tile_iter, None)
                if item is None:
                    self._exhausted = True
                    break
                self._submit_tile(*item)
            if self._exhausted and self._window.empty:
                return
            self._service()

    def _submit_tile(self, tile: TileToSend, payload: bytes | None) -> None:
        index = self._next_index
        self._next_index += 1
        payload = self._encode(tile) if payload is None else payload
        # self.encoding is read after _encode(): a subclass's _encode may choose it per tile.
        msg = tile.message(self.case.case_id, index, self.encoding, payload)
        if self.keep_digests:
            self.result.digests[index] = expected_digest(tile.pixels, payload, self.encoding)
        self.result.tiles_sent += 1
        self._report_progress()
        self._submit(msg, f"tile {index}", index)

    # --- answers and the window ---------------------------------------------------------

    def _submit(self, msg: Message, label: str, tile_index: int) -> Pending:
        seq = self._next_seq()
        wire = message_to_frame(msg, seq, max_payload=self._peer_max_payload)
        pending = self._window.add(seq, label, wire, self.case.case_id, tile_index)
        self._transmit(pending)
        return pending

    def _transmit(self, p: Pending) -> None:
        if self._window.sent(p, time.monotonic()):
            self.result.retransmits += 1
        self._port.write(p.wire)

    def _service(self, max_wait: float | None = None) -> None:
        """Wait for one answer, the nearest deadline or the next heartbeat, then handle them."""
        now = time.monotonic()
        nearest = self._window.nearest_deadline(default=now + self.ack_timeout)
        if max_wait is not None:
            nearest = min(nearest, now + max_wait)
        if self._heartbeats:
            nearest = min(nearest, self._port.last_write + self.heartbeat_interval)
        item = self._port.next_item(max(0.0, nearest - now))
        if isinstance(item, Ack):
            self._on_ack(item)
        elif isinstance(item, Nack):
            self._on_nack(item)
        elif isinstance(item, Heartbeat):
            self._on_heartbeat(item)
        elif isinstance(item, ErrorMessage):
            raise RemoteError(int(item.code), item.text)
        elif isinstance(item, (FrameError, MessageDecodeError)):
            self.result.corrupt_answers += 1
            log.debug("undecodable frame from the host: %s", item)
        # A host HELLO here is a late duplicate of the handshake; our own echoed frames are noise.
        if self._heartbeats and time.monotonic() - self._port.last_write >= self.heartbeat_interval:
            self._send_heartbeat()
        for p, timed_out in self._window.due(time.monotonic()):
            if timed_out:
                self.result.timeouts += 1
            self._transmit(p)

    def _on_ack(self, ack: Ack) -> None:
        p = self._window.on_ack(ack)
        if p is None:
            return
        if p.tile_index >= 0:
            self.result.acked.append(p.tile_index)
            self._report_progress()
        self._resend_overtaken(p)

    def _on_nack(self, nack: Nack) -> None:
        self.result.nacks_received += 1
        p = self._window.on_nack(nack, time.monotonic())
        if p is None:
            return
        if p.rejected:
            self.result.rejected[p.tile_index] = p.last_nack
            log.warning("host rejected %s: %s", p.label, p.last_nack)
        self._resend_overtaken(p)

    def _resend_overtaken(self, answered: Pending) -> None:
        for p in self._window.overtaken(answered):
            self._transmit(p)

    def _on_heartbeat(self, beat: Heartbeat) -> None:
        if beat.is_reply:
            self.result.heartbeat_replies += 1
            return
        reply = Heartbeat(reply_to=self._port.inbound_seq, uptime_ms=self._uptime_ms())
        self._port.write(message_to_frame(reply, self._next_seq()))

    def _send_heartbeat(self) -> None:
        beat = Heartbeat(
            reply_to=UNKNOWN_SEQ,
            uptime_ms=self._uptime_ms(),
            interval_ms=int(round(self.heartbeat_interval * 1000)),
        )
        self.result.heartbeats_sent += 1
        self._port.write(message_to_frame(beat, self._next_seq()))

    # --- unplug and replug -------------------------------------------------------------

    def _recover(self, cut: Disconnected) -> None:
        """The cable went: park unACKed tiles, get a plugged-in cable, start over at HELLO."""
        self.result.disconnects += 1
        # CASE_BEGIN / CASE_END / heartbeats in flight are simply sent again by _drive;
        # tiles keep their frames (and seqs) and go out again, in index order, first.
        self._window.park_tiles()
        self._hello_done = False
        self._begun = False
        self._port.reconnect(cut)
        self.result.reconnects += 1

    def _frame_written(self) -> None:
        self.result.frames_written += 1

    def _next_seq(self) -> int:
        seq = self._seq
        self._seq = (self._seq + 1) % UNKNOWN_SEQ
        return seq

    def _uptime_ms(self) -> int:
        return int((time.monotonic() - self._t0) * 1000) & 0xFFFFFFFF

    def _report_progress(self) -> None:
        if self.progress is not None:
            self.progress(self.result.tiles_sent, len(self.result.acked), self._total)

