"""Scanner firmware side of the link: HELLO, CASE_BEGIN, windowed TILEs with retransmission, CASE_END.

Given a PtyCable instead of a plain transport, the emulator also survives the cable being
pulled (by a DISCONNECT fault or by someone else): it waits for the cable, says HELLO
again, resumes the case with the same CASE_BEGIN and resends every tile not yet ACKed.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sized
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Protocol

import numpy as np

from firmware_bridge.errors import (
    DeliveryError,
    FrameError,
    LinkError,
    LinkLostError,
    LinkTimeoutError,
    MessageDecodeError,
    NegotiationError,
    RemoteError,
    TransportError,
)
from firmware_bridge.faults import BitFlipFaults, FaultKind, Faults
from firmware_bridge.frames import DELIMITER, MAX_PAYLOAD, PROTOCOL_VERSION, UNKNOWN_SEQ, FrameReader
from firmware_bridge.messages import (
    ENCODING_CAPABILITY,
    RETRYABLE_NACKS,
    Ack,
    CaseBegin,
    CaseEnd,
    Capability,
    ErrorMessage,
    Heartbeat,
    Hello,
    Message,
    Nack,
    NackReason,
    Role,
    Tile,
    message_from_frame,
    message_to_frame,
)
from firmware_bridge.pixels import JPEG_QUALITY, TileEncoding, decode_pixels, encode_pixels
from firmware_bridge.transport import Transport, read_some, write_all

if TYPE_CHECKING:
    from firmware_bridge.sink import CaseInfo

__all__ = ["BitFlipFaults", "EmulatorResult", "Faults", "Pluggable", "ScannerEmulator", "TileToSend"]

log = logging.getLogger(__name__)

READER_JOIN_TIMEOUT = 5.0  # seconds; reads time out far sooner, this only guards a stuck driver
HELLO_RETRY_INITIAL = 0.05  # after a reconnect HELLO is resent this soon, doubling to ack_timeout
CRC_GRACE_SHARE = 0.25  # after an unknown-seq NACK, frames in flight wait this share of ack_timeout
REORDER_HOLD = 0.005  # a REORDER fault holds a frame back at most this long if nothing follows it
SCANNER_CAPABILITIES = Capability.ZLIB | Capability.PNG | Capability.JPEG | Capability.HEARTBEAT | Capability.RESUME

ProgressCallback = Callable[[int, int, int | None], None]  # (sent, acked, total or None)


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
    retransmits: int = 0  # includes tiles resent after a reconnect
    timeouts: int = 0  # retransmissions because ack_timeout (or the CRC grace) ran out
    acked: list[int] = field(default_factory=list)  # tile indices in the order their ACKs came
    rejected: dict[int, str] = field(default_factory=dict)  # index -> non-retryable NACK
    nacks_received: int = 0
    corrupt_answers: int = 0  # frames from the host that failed to decode
    disconnects: int = 0  # times the cable was pulled under the case (faults or otherwise)
    reconnects: int = 0  # times the emulator plugged back in, said HELLO and resumed
    heartbeats_sent: int = 0
    heartbeat_replies: int = 0
    # index -> sha256 of the pixels the host should decode: of the tile itself for lossless
    # encodings, of what this end decodes from its own payload for jpeg. keep_digests=True.
    digests: dict[int, str] = field(default_factory=dict)


class Pluggable(Protocol):
    """A cable the emulator can pull and plug back in (PtyCable)."""

    generation: int

    @property
    def scanner(self) -> Transport: ...

    def unplug(self) -> None: ...

    def replug(self) -> Transport: ...

    def wait_plugged(self, timeout: float | None = None, *, newer_than: int = 0) -> Transport | None: ...


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


class _Disconnected(Exception):
    """The cable went away under a write or read; run() reconnects and resumes."""

    def __init__(self, reason: str, *, injected: bool = False) -> None:
        super().__init__(reason)
        self.injected = injected


class ScannerEmulator:
    """Plays the scanner for one case over a transport or a PtyCable.

    The emulator's reader thread only reads and decodes; run() does every write, so the
    transport sees one reader and one writer, as serial.Serial allows.
    """

    def __init__(
        self,
        transport: Transport | Pluggable,
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
        jpeg_quality: int = JPEG_QUALITY,
        heartbeat_interval: float = 1.0,
        linger: float = 0.0,
        replug_delay: float = 0.05,
        reconnect_timeout: float = 30.0,
        keep_digests: bool = False,
        pre_encode: bool = False,
    ) -> None:
        if window < 1:
            raise ValueError(f"window={window} must be at least 1")
        if max_retries < 0 or ack_timeout <= 0:
            raise ValueError("max_retries must be >= 0 and ack_timeout > 0")
        if heartbeat_interval < 0 or heartbeat_interval > 65.535:
            raise ValueError(f"heartbeat_interval={heartbeat_interval} must be 0 (off) to 65.535 s")
        self._cable: Pluggable | None = transport if _is_pluggable(transport) else None
        self.transport: Transport = self._cable.scanner if self._cable is not None else transport
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
        self.jpeg_quality = jpeg_quality
        self.heartbeat_interval = heartbeat_interval
        self.linger = linger
        self.replug_delay = replug_delay
        self.reconnect_timeout = reconnect_timeout
        self.keep_digests = keep_digests
        self.pre_encode = pre_encode
        self.peer: Hello | None = None
        self.result = EmulatorResult(case_id=self.case.case_id)
        self._total = len(tiles) if isinstance(tiles, Sized) else (self.case.expected_tiles or None)
        self._seq = 0
        self._order = itertools.count()
        self._in_flight: dict[int, _Pending] = {}
        self._parked: deque[_Pending] = deque()  # unACKed tiles waiting for the link to come back
        self._window = window
        self._peer_max_payload = max_payload
        self._heartbeats = False
        self._started = False
        self._t0 = time.monotonic()
        self._last_write = self._t0
        self._held_at = 0.0
        self._inbound_seq = 0  # header seq of the host frame _get() returned last
        # Connection state: the reader thread of the current plug-in and its inbox.
        self._inbox: queue.Queue[object] = queue.Queue()
        self._reader_stop = threading.Event()
        self._reader: threading.Thread | None = None
        self._connections = 0
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
        self._open_connection()
        try:
            while True:
                try:
                    self._drive()
                    break
                except _Disconnected as cut:
                    self._recover(cut)
        finally:
            self._close_reader()
            if self.faults is not None:
                # Everything is ACKed (or we are failing): a frame a REORDER still holds
                # back is a needless resend; it must not leak into the next case's link.
                self.faults.discard()
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
                    label = "CASE_BEGIN" if self._connections == 1 else "CASE_BEGIN (resume)"
                    self._deliver(self.case, label)
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
        resuming = self._connections > 1
        # First contact: fixed ack_timeout spacing, max_retries + 1 tries. After a replug
        # the host is reopening the device with its own backoff, so start fast and keep
        # trying for reconnect_timeout.
        interval = min(HELLO_RETRY_INITIAL, self.ack_timeout) if resuming else self.ack_timeout
        give_up = time.monotonic() + self.reconnect_timeout
        attempts = 0
        while True:
            if resuming and time.monotonic() >= give_up:
                raise LinkTimeoutError(
                    f"the host did not answer HELLO within {self.reconnect_timeout} s after the "
                    f"cable was plugged back in ({attempts} attempts) on {self.transport!r}"
                )
            if not resuming and attempts > self.max_retries:
                raise LinkTimeoutError(
                    f"the host did not answer HELLO after {attempts} attempts "
                    f"{self.ack_timeout} s apart on {self.transport!r}: is the daemon running on the other end?"
                )
            self._write(wire)
            attempts += 1
            deadline = time.monotonic() + interval
            while (remaining := deadline - time.monotonic()) > 0:
                item = self._next_item(remaining)
                if isinstance(item, Hello) and item.role == Role.HOST:
                    self._negotiate(item)
                    return
                if isinstance(item, ErrorMessage):
                    raise RemoteError(int(item.code), item.text)
                # Anything else before the host's HELLO (NACKs of line noise, our own echo
                # on a pty not yet in raw mode) carries no information for us.
            if resuming:
                interval = min(interval * 2, self.ack_timeout)

    def _negotiate(self, host: Hello) -> None:
        self.peer = host
        needed = ENCODING_CAPABILITY[self.encoding]
        if needed and not host.capabilities & needed:
            raise NegotiationError(
                f"the host does not accept {self.encoding.name.lower()} tiles "
                f"(capabilities {host.capabilities!r}); use encoding='raw'"
            )
        self._window = min(self.window, host.window) if host.window else self.window
        self._peer_max_payload = min(self.max_payload, host.max_payload)
        self._heartbeats = bool(host.capabilities & Capability.HEARTBEAT) and self.heartbeat_interval > 0
        log.debug(
            "host HELLO: v%d (using v%d) window %d max payload %d",
            host.version, min(host.version, PROTOCOL_VERSION), host.window, host.max_payload,
        )

    def _deliver(self, msg: Message, label: str) -> None:
        pending = self._submit(msg, label, -1)
        while pending.seq in self._in_flight:
            self._service()

    def _prepared_tiles(self) -> Iterator[tuple[TileToSend, bytes | None]]:
        if not self.pre_encode:
            return ((tile, None) for tile in self.tiles)
        # Like a scanner whose hardware compresses ahead of the link: encode everything
        # first, so the link's speed is measured, not the codec's.
        return iter([(tile, self._encode(tile)) for tile in self.tiles])

    def _encode(self, tile: TileToSend) -> bytes:
        return encode_pixels(tile.pixels, self.encoding, quality=self.jpeg_quality)

    def _stream_tiles(self) -> None:
        while True:
            while len(self._in_flight) < self._window:
                if self._parked:
                    # Tiles that were unACKed when the cable went: same frame, same seq.
                    p = self._parked.popleft()
                    self._in_flight[p.seq] = p
                    self.result.retransmits += 1
                    self._transmit(p)
                    continue
                if self._exhausted:
                    break
                item = next(self._tile_iter, None)
                if item is None:
                    self._exhausted = True
                    break
                self._submit_tile(*item)
            if self._exhausted and not self._in_flight and not self._parked:
                return
            self._service()

    def _submit_tile(self, tile: TileToSend, payload: bytes | None) -> None:
        index = self._next_index
        self._next_index += 1
        payload = self._encode(tile) if payload is None else payload
        msg = Tile(
            case_id=self.case.case_id,
            index=index,
            x=tile.x,
            y=tile.y,
            w=int(tile.pixels.shape[1]),
            h=int(tile.pixels.shape[0]),
            encoding=self.encoding,
            payload=payload,
        )
        if self.keep_digests:
            self.result.digests[index] = _expected_digest(tile.pixels, payload, self.encoding)
        self.result.tiles_sent += 1
        self._report_progress()
        self._submit(msg, f"tile {index}", index)

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

    def _service(self, max_wait: float | None = None) -> None:
        """Wait for one answer, the nearest deadline or the next heartbeat, then handle them."""
        now = time.monotonic()
        nearest = min((p.deadline for p in self._in_flight.values()), default=now + self.ack_timeout)
        if max_wait is not None:
            nearest = min(nearest, now + max_wait)
        if self._heartbeats:
            nearest = min(nearest, self._last_write + self.heartbeat_interval)
        item = self._next_item(max(0.0, nearest - now))
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
        if self._heartbeats and time.monotonic() - self._last_write >= self.heartbeat_interval:
            self._send_heartbeat()
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
            # Unknown seq: the host read a damaged frame, one of those now in flight. The
            # ordering rule finds it as soon as a later frame is answered; if none is (it
            # was the last one sent), waiting the full ack_timeout would stall the case,
            # so every frame sent before this NACK gets a short grace instead.
            grace = time.monotonic() + self.ack_timeout * CRC_GRACE_SHARE
            for q in self._in_flight.values():
                if not q.retry_scheduled:
                    q.deadline = min(q.deadline, grace)
            return
        p.last_nack = f"{nack.reason.name}: {nack.detail}"
        if nack.reason in RETRYABLE_NACKS:
            if p.attempts > self.max_retries:
                raise DeliveryError(f"the host refused {p.label} {p.attempts} times; last: {p.last_nack}")
            p.retry_scheduled = True
            p.deadline = time.monotonic() + (0.0 if nack.reason == NackReason.CRC else self.retry_delay)
        elif p.tile_index >= 0 and nack.reason not in (NackReason.UNKNOWN_CASE, NackReason.REFUSED):
            # One undeliverable tile should not lose the rest of the case; the host sees the
            # gap in CASE_END's tile_count and the result lists it.
            del self._in_flight[p.seq]
            self.result.rejected[p.tile_index] = p.last_nack
            log.warning("host rejected %s: %s", p.label, p.last_nack)
        else:
            raise DeliveryError(f"the host refused {p.label}: {p.last_nack}")
        self._resend_overtaken(p)

    def _on_heartbeat(self, beat: Heartbeat) -> None:
        if beat.is_reply:
            self.result.heartbeat_replies += 1
            return
        reply = Heartbeat(reply_to=self._inbound_seq, uptime_ms=self._uptime_ms())
        self._write(message_to_frame(reply, self._next_seq()))

    def _send_heartbeat(self) -> None:
        beat = Heartbeat(
            reply_to=UNKNOWN_SEQ,
            uptime_ms=self._uptime_ms(),
            interval_ms=int(round(self.heartbeat_interval * 1000)),
        )
        self.result.heartbeats_sent += 1
        self._write(message_to_frame(beat, self._next_seq()))

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
            if not p.retry_scheduled:
                self.result.timeouts += 1
            self._transmit(p)

    # --- connections: the reader thread, unplug and replug -----------------------------

    def _open_connection(self) -> None:
        self._connections += 1
        self._inbox = queue.Queue()
        self._reader_stop = threading.Event()
        self._reader = threading.Thread(
            target=self._read_loop,
            args=(self.transport, self._inbox, self._reader_stop),
            name="scanner-emulator-reader",
            daemon=True,
        )
        self._reader.start()

    def _close_reader(self) -> None:
        self._reader_stop.set()
        reader, self._reader = self._reader, None
        if reader is None:
            return
        reader.join(READER_JOIN_TIMEOUT)
        if reader.is_alive():
            log.warning("emulator reader thread still blocked in read() on %r", self.transport)

    def _recover(self, cut: _Disconnected) -> None:
        """The cable went: park unACKed tiles, get a plugged-in cable, start over at HELLO."""
        assert self._cable is not None  # _Disconnected is only raised with a cable
        self.result.disconnects += 1
        old = self.transport
        old_generation = getattr(old, "generation", self._cable.generation)
        self._close_reader()
        if self.faults is not None:
            self.faults.discard()
        # CASE_BEGIN / CASE_END / heartbeats in flight are simply sent again by _drive;
        # tiles keep their frames (and seqs) and go out again, in index order, first.
        tiles = [p for p in self._in_flight.values() if p.tile_index >= 0]
        for p in tiles:
            p.attempts = 0
            p.retry_scheduled = False
        self._parked = deque(sorted([*tiles, *self._parked], key=lambda p: p.tile_index))
        self._in_flight.clear()
        self._hello_done = False
        self._begun = False
        if cut.injected:
            log.debug("fault: pulling the cable for %.3f s", self.replug_delay)
            self._cable.unplug()
            time.sleep(self.replug_delay)
            end = self._cable.replug()
        else:
            if self._cable.plugged and self._cable.generation == old_generation:
                raise TransportError(f"the link failed but the cable is still plugged in: {cut}") from cut
            end = self._cable.wait_plugged(self.reconnect_timeout, newer_than=old_generation)
            if end is None:
                raise LinkLostError(
                    f"the cable {self._cable!r} was not plugged back in within {self.reconnect_timeout} s "
                    f"after: {cut}"
                ) from cut
        old.close()  # its reader has stopped; the cable retired it already
        self.transport = end
        self.result.reconnects += 1
        self._open_connection()

    # --- I/O ------------------------------------------------------------------------

    def _write(self, wire: bytes) -> None:
        if self.faults is None:
            self._raw_write(wire)
            self.result.frames_written += 1
            return
        injection = self.faults.apply(wire, can_disconnect=self._cable is not None)
        if injection.kind == FaultKind.REORDER:
            self._held_at = time.monotonic()
        if injection.data:
            self._raw_write(injection.data)
        self.result.frames_written += 1
        if injection.disconnect:
            raise _Disconnected("fault injection pulled the cable", injected=True)

    def _raw_write(self, data: bytes) -> None:
        try:
            write_all(self.transport, data)
        except TransportError as exc:
            if self._cable is None:
                raise
            raise _Disconnected(str(exc)) from exc
        self._last_write = time.monotonic()

    def _next_item(self, timeout: float) -> object:
        if self.faults is not None and self.faults.holding:
            # A REORDER holds a frame until the next write goes out ahead of it; if nothing
            # is written soon, release it so the fault delays the frame, never strands it.
            hold_left = self._held_at + REORDER_HOLD - time.monotonic()
            if hold_left > 0:
                item = self._get(min(timeout, hold_left))
                if item is not None or timeout <= hold_left:
                    return item
                timeout -= hold_left
            if self.faults.holding:
                self._raw_write(self.faults.release())
        return self._get(timeout)

    def _get(self, timeout: float) -> object:
        try:
            item = self._inbox.get(timeout=max(0.0, timeout))
        except queue.Empty:
            return None
        if isinstance(item, _ReaderFailed):
            if self._cable is not None and isinstance(item.error, TransportError):
                raise _Disconnected(str(item.error)) from item.error
            raise item.error
        if isinstance(item, tuple):
            self._inbound_seq, item = item
        return item

    def _read_loop(self, transport: Transport, inbox: queue.Queue[object], stop: threading.Event) -> None:
        reader = FrameReader(max_payload=self.max_payload)
        try:
            while not stop.is_set():
                data = read_some(transport)
                if not data:
                    continue
                for item in reader.feed(data):
                    if isinstance(item, FrameError):
                        inbox.put(item)
                        continue
                    try:
                        inbox.put((item.seq, message_from_frame(item)))
                    except MessageDecodeError as exc:
                        inbox.put(exc)
        except Exception as exc:  # noqa: BLE001 - handed to run(), which re-raises it
            if not stop.is_set():
                inbox.put(_ReaderFailed(exc))

    def _next_seq(self) -> int:
        seq = self._seq
        self._seq = (self._seq + 1) % UNKNOWN_SEQ
        return seq

    def _uptime_ms(self) -> int:
        return int((time.monotonic() - self._t0) * 1000) & 0xFFFFFFFF

    def _report_progress(self) -> None:
        if self.progress is not None:
            self.progress(self.result.tiles_sent, len(self.result.acked), self._total)


def _is_pluggable(obj: object) -> bool:
    # Looked up on the type: the cable's `scanner` property raises while it is unplugged,
    # so an isinstance check against the Protocol would call it.
    return all(callable(getattr(type(obj), name, None)) for name in ("unplug", "replug", "wait_plugged"))


def _expected_digest(pixels: np.ndarray, payload: bytes, encoding: TileEncoding) -> str:
    """sha256 of the pixels the host will decode from payload (lossy jpeg: decode it here too)."""
    if encoding == TileEncoding.JPEG:
        h, w = pixels.shape[:2]
        return hashlib.sha256(decode_pixels(payload, encoding, w, h)).hexdigest()
    return hashlib.sha256(np.ascontiguousarray(pixels)).hexdigest()


def _case_begin_from(case: object) -> CaseBegin:
    """Build the wire CASE_BEGIN from anything with its fields (host.CaseInfo, typically)."""
    return CaseBegin(**{f.name: getattr(case, f.name) for f in fields(CaseBegin)})
