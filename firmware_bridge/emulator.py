"""Scanner firmware side of the link: HELLO, CASE_BEGIN, windowed TILEs with retransmission, CASE_END."""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable, Sized
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING

import numpy as np

from firmware_bridge.errors import (
    DeliveryError,
    FrameError,
    LinkError,
    LinkTimeoutError,
    MessageDecodeError,
    NegotiationError,
    RemoteError,
)
from firmware_bridge.faults import BitFlipFaults, Faults
from firmware_bridge.frames import DELIMITER, MAX_PAYLOAD, PROTOCOL_VERSION, UNKNOWN_SEQ, FrameReader
from firmware_bridge.messages import (
    RETRYABLE_NACKS,
    Ack,
    CaseBegin,
    CaseEnd,
    Capability,
    ErrorMessage,
    Hello,
    Message,
    Nack,
    NackReason,
    Role,
    Tile,
    message_from_frame,
    message_to_frame,
)
from firmware_bridge.pixels import TileEncoding, encode_pixels
from firmware_bridge.transport import Transport, read_some, write_all

if TYPE_CHECKING:
    from firmware_bridge.host import CaseInfo

__all__ = ["BitFlipFaults", "EmulatorResult", "Faults", "ScannerEmulator", "TileToSend"]

log = logging.getLogger(__name__)

READER_JOIN_TIMEOUT = 5.0  # seconds; reads time out far sooner, this only guards a stuck driver

ProgressCallback = Callable[[int, int, int | None], None]  # (sent, acked, total or None)

_ENCODING_CAPABILITY = {
    TileEncoding.RAW: Capability.NONE,
    TileEncoding.ZLIB: Capability.ZLIB,
    TileEncoding.PNG: Capability.PNG,
}


@dataclass(frozen=True)
class TileToSend:
    """One tile as the scanner produced it: top-left position and uint8 HxWx3 pixels."""

    x: int
    y: int
    pixels: np.ndarray = field(repr=False)


@dataclass
class EmulatorResult:
    """What one run() did."""

    case_id: str
    tiles_sent: int = 0  # distinct tiles put on the wire
    frames_written: int = 0  # every write, first transmissions and retransmissions
    retransmits: int = 0
    acked: list[int] = field(default_factory=list)  # tile indices in the order their ACKs came
    rejected: dict[int, str] = field(default_factory=dict)  # index -> non-retryable NACK
    nacks_received: int = 0
    corrupt_answers: int = 0  # frames from the host that failed to decode


@dataclass
class _Pending:
    """A frame on the wire awaiting its ACK."""

    seq: int
    label: str
    wire: bytes
    case_id: str
    tile_index: int = -1
    attempts: int = 0
    first_order: int = -1  # transmission counter value of the first and the latest write
    last_order: int = -1
    deadline: float = 0.0
    retry_scheduled: bool = False  # NACKed; resend at deadline instead of timing out
    last_nack: str = ""


@dataclass(frozen=True)
class _ReaderFailed:
    error: BaseException


class ScannerEmulator:
    """Plays the scanner for one case over a transport.

    The emulator's reader thread only reads and decodes; run() does every write, so the
    transport sees one reader and one writer, as serial.Serial allows.
    """

    def __init__(
        self,
        transport: Transport,
        case: CaseBegin | CaseInfo,
        tiles: Iterable[TileToSend],
        *,
        encoding: TileEncoding | str = "raw",
        window: int = 4,
        ack_timeout: float = 2.0,
        max_retries: int = 5,
        retry_delay: float = 0.05,
        progress: ProgressCallback | None = None,
        faults: Faults | None = None,
        max_payload: int = MAX_PAYLOAD,
    ) -> None:
        if window < 1:
            raise ValueError(f"window={window} must be at least 1")
        if max_retries < 0 or ack_timeout <= 0:
            raise ValueError("max_retries must be >= 0 and ack_timeout > 0")
        self.transport = transport
        self.case = case if isinstance(case, CaseBegin) else _case_begin_from(case)
        self.tiles = tiles
        self.encoding = TileEncoding.parse(encoding)
        self.window = window
        self.ack_timeout = ack_timeout
        self.max_retries = max_retries
        self.retry_delay = retry_delay
        self.progress = progress
        self.faults = faults
        self.max_payload = max_payload
        self.peer: Hello | None = None
        self.result = EmulatorResult(case_id=self.case.case_id)
        self._total = len(tiles) if isinstance(tiles, Sized) else (self.case.expected_tiles or None)
        self._seq = 0
        self._order = itertools.count()
        self._in_flight: dict[int, _Pending] = {}
        self._inbox: queue.Queue[object] = queue.Queue()
        self._stop = threading.Event()
        self._window = window
        self._peer_max_payload = max_payload
        self._started = False

    # --- public ----------------------------------------------------------------------

    def run(self) -> EmulatorResult:
        """Deliver the whole case once; raises LinkTimeoutError, DeliveryError, RemoteError, TransportError."""
        if self._started:
            raise LinkError("ScannerEmulator.run() delivers one case; create a new emulator for the next")
        self._started = True
        if getattr(self.transport, "timeout", 0) is None:
            # The reader thread polls its stop flag between reads; a read without a timeout
            # would keep it (and run()) waiting forever at the end.
            raise ValueError(f"{self.transport!r} has no read timeout; open it with a timeout")
        reader = threading.Thread(target=self._read_loop, name="scanner-emulator-reader", daemon=True)
        reader.start()
        try:
            self._handshake()
            self._deliver(self.case, "CASE_BEGIN")
            self._stream_tiles()
            self._deliver(CaseEnd(self.case.case_id, self.result.tiles_sent), "CASE_END")
        finally:
            self._stop.set()
            reader.join(READER_JOIN_TIMEOUT)
            if reader.is_alive():
                log.warning("emulator reader thread still blocked in read() on %r", self.transport)
        return self.result

    # --- phases ----------------------------------------------------------------------

    def _handshake(self) -> None:
        hello = Hello(
            version=PROTOCOL_VERSION,
            role=Role.SCANNER,
            window=self.window,
            max_payload=self.max_payload,
            capabilities=Capability.ZLIB | Capability.PNG,
        )
        # The leading delimiter ends any garbage the host's reader is holding (echo, noise).
        wire = DELIMITER + message_to_frame(hello, self._next_seq())
        for _attempt in range(self.max_retries + 1):
            self._write(wire)
            deadline = time.monotonic() + self.ack_timeout
            while (remaining := deadline - time.monotonic()) > 0:
                item = self._next_item(remaining)
                if isinstance(item, Hello) and item.role == Role.HOST:
                    self._negotiate(item)
                    return
                if isinstance(item, ErrorMessage):
                    raise RemoteError(int(item.code), item.text)
                # Anything else before the host's HELLO (NACKs of line noise, our own echo
                # on a pty not yet in raw mode) carries no information for us.
        raise LinkTimeoutError(
            f"the host did not answer HELLO after {self.max_retries + 1} attempts "
            f"{self.ack_timeout} s apart on {self.transport!r}: is the daemon running on the other end?"
        )

    def _negotiate(self, host: Hello) -> None:
        self.peer = host
        needed = _ENCODING_CAPABILITY[self.encoding]
        if needed and not host.capabilities & needed:
            raise NegotiationError(
                f"the host does not accept {self.encoding.name.lower()} tiles "
                f"(capabilities {host.capabilities!r}); use encoding='raw'"
            )
        self._window = min(self.window, host.window) if host.window else self.window
        self._peer_max_payload = min(self.max_payload, host.max_payload)
        log.debug("host HELLO: v%d window %d max payload %d", host.version, host.window, host.max_payload)

    def _deliver(self, msg: Message, label: str) -> None:
        pending = self._submit(msg, label, -1)
        while pending.seq in self._in_flight:
            self._service()

    def _stream_tiles(self) -> None:
        tiles = iter(self.tiles)
        exhausted = False
        index = 0
        while True:
            while not exhausted and len(self._in_flight) < self._window:
                tile = next(tiles, None)
                if tile is None:
                    exhausted = True
                    break
                msg = Tile(
                    case_id=self.case.case_id,
                    index=index,
                    x=tile.x,
                    y=tile.y,
                    w=int(tile.pixels.shape[1]),
                    h=int(tile.pixels.shape[0]),
                    encoding=self.encoding,
                    payload=encode_pixels(tile.pixels, self.encoding),
                )
                self._submit(msg, f"tile {index}", index)
                self.result.tiles_sent += 1
                index += 1
                self._report_progress()
            if exhausted and not self._in_flight:
                return
            self._service()

    # --- the retransmission engine ----------------------------------------------------

    def _submit(self, msg: Message, label: str, tile_index: int) -> _Pending:
        seq = self._next_seq()
        pending = _Pending(
            seq=seq,
            label=label,
            wire=message_to_frame(msg, seq, max_payload=self._peer_max_payload),
            case_id=self.case.case_id,
            tile_index=tile_index,
        )
        self._in_flight[seq] = pending
        self._transmit(pending)
        return pending

    def _transmit(self, p: _Pending) -> None:
        if p.attempts:
            self.result.retransmits += 1
        p.attempts += 1
        p.last_order = next(self._order)
        if p.first_order < 0:
            p.first_order = p.last_order
        p.retry_scheduled = False
        p.deadline = time.monotonic() + self.ack_timeout
        self._write(p.wire)

    def _service(self) -> None:
        """Wait for one answer or the nearest deadline, then handle both."""
        now = time.monotonic()
        nearest = min((p.deadline for p in self._in_flight.values()), default=now + self.ack_timeout)
        item = self._next_item(max(0.0, nearest - now))
        if isinstance(item, Ack):
            self._on_ack(item)
        elif isinstance(item, Nack):
            self._on_nack(item)
        elif isinstance(item, ErrorMessage):
            raise RemoteError(int(item.code), item.text)
        elif isinstance(item, (FrameError, MessageDecodeError)):
            self.result.corrupt_answers += 1
            log.debug("undecodable frame from the host: %s", item)
        # A host HELLO here is a late duplicate of the handshake; our own echoed frames are noise.
        self._check_deadlines()

    def _on_ack(self, ack: Ack) -> None:
        p = self._in_flight.get(ack.acked_seq)
        if p is None or ack.case_id != p.case_id or ack.tile_index != p.tile_index:
            log.debug("stray ACK %s ignored", ack)
            return
        del self._in_flight[p.seq]
        if p.tile_index >= 0:
            self.result.acked.append(p.tile_index)
            self._report_progress()
        self._resend_overtaken(p)

    def _on_nack(self, nack: Nack) -> None:
        self.result.nacks_received += 1
        p = self._in_flight.get(nack.seq)
        if p is None:
            # Unknown seq: the host read a damaged frame. The ordering rule below or the
            # timeout finds which frame it was; guessing here would only add duplicates.
            return
        p.last_nack = f"{nack.reason.name}: {nack.detail}"
        if nack.reason in RETRYABLE_NACKS:
            if p.attempts > self.max_retries:
                raise DeliveryError(f"the host refused {p.label} {p.attempts} times; last: {p.last_nack}")
            p.retry_scheduled = True
            p.deadline = time.monotonic() + (0.0 if nack.reason == NackReason.CRC else self.retry_delay)
        elif p.tile_index >= 0 and nack.reason != NackReason.UNKNOWN_CASE:
            # One undeliverable tile should not lose the rest of the case; the host sees the
            # gap in CASE_END's tile_count and the result lists it.
            del self._in_flight[p.seq]
            self.result.rejected[p.tile_index] = p.last_nack
            log.warning("host rejected %s: %s", p.label, p.last_nack)
        else:
            raise DeliveryError(f"the host refused {p.label}: {p.last_nack}")
        self._resend_overtaken(p)

    def _resend_overtaken(self, answered: _Pending) -> None:
        """Resend frames whose answer should have come before this one but did not.

        The host handles frames strictly in arrival order and the line is FIFO both ways,
        so any frame last written before `answered` was first written is lost (or its
        answer was), and waiting for its timeout would only stall the window.
        """
        for p in list(self._in_flight.values()):
            if p is answered or p.retry_scheduled or p.last_order >= answered.first_order:
                continue
            if p.attempts > self.max_retries:
                continue  # leave it to _check_deadlines to report
            self._transmit(p)

    def _check_deadlines(self) -> None:
        now = time.monotonic()
        for p in list(self._in_flight.values()):
            if p.deadline > now:
                continue
            if p.attempts > self.max_retries:
                if p.retry_scheduled:
                    raise DeliveryError(f"the host refused {p.label} {p.attempts} times; last: {p.last_nack}")
                raise LinkTimeoutError(
                    f"no answer for {p.label} (seq {p.seq}) after {p.attempts} transmissions, "
                    f"{self.ack_timeout} s each"
                )
            self._transmit(p)

    # --- I/O ------------------------------------------------------------------------

    def _write(self, wire: bytes) -> None:
        data = self.faults.mutate(wire) if self.faults is not None else wire
        write_all(self.transport, data)
        self.result.frames_written += 1

    def _next_item(self, timeout: float) -> object:
        try:
            item = self._inbox.get(timeout=timeout)
        except queue.Empty:
            return None
        if isinstance(item, _ReaderFailed):
            raise item.error
        return item

    def _read_loop(self) -> None:
        reader = FrameReader(max_payload=self.max_payload)
        try:
            while not self._stop.is_set():
                data = read_some(self.transport)
                if not data:
                    continue
                for item in reader.feed(data):
                    if isinstance(item, FrameError):
                        self._inbox.put(item)
                        continue
                    try:
                        self._inbox.put(message_from_frame(item))
                    except MessageDecodeError as exc:
                        self._inbox.put(exc)
        except Exception as exc:  # noqa: BLE001 - handed to run(), which re-raises it
            if not self._stop.is_set():
                self._inbox.put(_ReaderFailed(exc))

    def _next_seq(self) -> int:
        seq = self._seq
        self._seq = (self._seq + 1) % UNKNOWN_SEQ
        return seq

    def _report_progress(self) -> None:
        if self.progress is not None:
            self.progress(self.result.tiles_sent, len(self.result.acked), self._total)


def _case_begin_from(case: object) -> CaseBegin:
    """Build the wire CASE_BEGIN from anything with its fields (host.CaseInfo, typically)."""
    return CaseBegin(**{f.name: getattr(case, f.name) for f in fields(CaseBegin)})
