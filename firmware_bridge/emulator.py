"""Scanner firmware side of the link, the port keeper: HELLO, CASE_BEGIN, windowed TILEs with retransmission, CASE_END.

What to send and what the host's answers mean is decided by scanner_session.ScannerSession;
this module reads, writes, waits and pulls the tiles. Given a PtyCable instead of a plain
transport, the emulator also survives the cable being pulled (by a DISCONNECT fault or by
someone else): it waits for the cable, says HELLO again, resumes the case with the same
CASE_BEGIN and resends every tile not yet ACKed.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sized
from typing import TYPE_CHECKING

from firmware_bridge.codes import ENCODING_CAPABILITY
from firmware_bridge.errors import DeliveryError, LinkError
from firmware_bridge.faults import BitFlipFaults, Faults
from firmware_bridge.frames import MAX_PAYLOAD
from firmware_bridge.messages import CaseBegin, Hello
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
from firmware_bridge.scanner_session import (
    HELLO_RETRY_INITIAL, SCANNER_CAPABILITIES, Phase, ScannerSession, ScannerSettings,
)
from firmware_bridge.transport import Transport
from firmware_bridge.window import CRC_GRACE_SHARE

if TYPE_CHECKING:
    from firmware_bridge.sink import CaseInfo

# The protocol constants are the session's and the window's; PROTOCOL.md (8.5, 12) documents them as the scanner's.
__all__ = [
    "CRC_GRACE_SHARE",
    "ENCODING_CAPABILITY",
    "HELLO_RETRY_INITIAL",
    "SCANNER_CAPABILITIES",
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


class ScannerEmulator:
    """Plays the scanner for one case over a transport or a PtyCable.

    Its ScannerPort's reader thread only reads and decodes; run() does every write, so the
    transport sees one reader and one writer, as serial.Serial allows. The protocol settings
    (encoding, window, ack_timeout, max_retries, retry_delay, max_payload, heartbeat_interval,
    reconnect_timeout) become the session's ScannerSettings: emulator.settings.window.
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
        self.settings = ScannerSettings(
            encoding=encoding,
            window=window,
            ack_timeout=ack_timeout,
            max_retries=max_retries,
            retry_delay=retry_delay,
            max_payload=max_payload,
            heartbeat_interval=heartbeat_interval,
            reconnect_timeout=reconnect_timeout,
        )
        self.case = case if isinstance(case, CaseBegin) else case_begin_from(case)
        self.session = ScannerSession(self.case, self.settings, started=time.monotonic())
        self.result: EmulatorResult = self.session.result
        self.tiles = tiles
        self.encoding = self.settings.encoding  # a subclass's _encode may change it per tile
        self.progress = progress
        self.faults = faults
        self.jpeg_quality = jpeg_quality
        self.linger = linger
        self.keep_digests = keep_digests
        self.pre_encode = pre_encode
        self._total = len(tiles) if isinstance(tiles, Sized) else (self.case.expected_tiles or None)
        self._port = ScannerPort(
            transport,
            faults=faults,
            max_payload=max_payload,
            replug_delay=replug_delay,
            reconnect_timeout=reconnect_timeout,
            on_frame_written=self._frame_written,
        )
        self._started = False
        self._tile_iter: Iterator[tuple[TileToSend, bytes | None]] = iter(())  # kept across reconnects
        self._linger_until: float | None = None  # set when the case is done

    # --- public ----------------------------------------------------------------------

    @property
    def transport(self) -> Transport:
        """The transport of the current plug-in (a new one after each replug of a cable)."""
        return self._port.transport

    @property
    def peer(self) -> Hello | None:
        """The host's latest HELLO, or None before the first."""
        return self.session.peer

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

    # --- the loop ----------------------------------------------------------------------

    def _drive(self) -> None:
        """Run (or resume, after a reconnect) whatever phase the case is in, then linger."""
        session = self.session
        if session.phase == Phase.HELLO:
            self._handshake()
        while session.phase != Phase.DONE:
            self._write(session.next_frames(time.monotonic()))
            if session.wants_tile:
                self._next_tile()
            else:
                self._service()
        if self._linger_until is None:
            self._linger_until = time.monotonic() + self.linger
        while (remaining := self._linger_until - time.monotonic()) > 0:
            self._service(remaining)

    def _handshake(self) -> None:
        """Say HELLO until the host's HELLO comes (the session negotiates), resending it as HelloRetry says."""
        wire, retry = self.session.hello(time.monotonic())
        while True:
            wait = retry.next_wait(time.monotonic(), repr(self.transport))
            self._port.write(wire)
            deadline = time.monotonic() + wait
            while (remaining := deadline - time.monotonic()) > 0:
                item = self._port.next_item(remaining)
                self._write(self.session.receive(item, time.monotonic(), self._port.inbound_seq))
                if self.session.phase != Phase.HELLO:
                    return

    def _service(self, max_wait: float | None = None) -> None:
        """Wait for one answer, the nearest deadline or the next heartbeat, and write what the session makes of it."""
        session = self.session
        now = time.monotonic()
        wait = session.deadline(now, self._port.last_write) - now
        if max_wait is not None:
            wait = min(wait, max_wait)
        item = self._port.next_item(max(0.0, wait))
        acked = len(self.result.acked)
        self._write(session.receive(item, time.monotonic(), self._port.inbound_seq))
        if len(self.result.acked) != acked:
            self._report_progress()
        self._write(session.tick(time.monotonic(), self._port.last_write))

    def _write(self, frames: list[bytes]) -> None:
        for wire in frames:
            self._port.write(wire)

    # --- tiles -------------------------------------------------------------------------

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

    def _next_tile(self) -> None:
        """Take the next tile from the source, encode it and send it; or tell the session there are no more."""
        item = next(self._tile_iter, None)
        if item is None:
            self.session.tiles_exhausted()
            return
        tile, payload = item
        payload = self._encode(tile) if payload is None else payload
        # self.encoding is read after _encode(): a subclass's _encode may choose it per tile.
        msg = tile.message(self.case.case_id, self.session.next_index, self.encoding, payload)
        digest = expected_digest(tile.pixels, payload, self.encoding) if self.keep_digests else None
        wire = self.session.add_tile(msg, time.monotonic(), digest=digest)
        self._report_progress()
        self._port.write(wire)

    def _report_progress(self) -> None:
        if self.progress is not None:
            self.progress(self.result.tiles_sent, len(self.result.acked), self._total)

    # --- unplug and replug -------------------------------------------------------------

    def _recover(self, cut: Disconnected) -> None:
        """The cable went: the session parks unACKed tiles; get a plugged-in cable and start over at HELLO."""
        self.session.disconnected()
        self._port.reconnect(cut)
        self.session.reconnected()

    def _frame_written(self) -> None:
        self.result.frames_written += 1
