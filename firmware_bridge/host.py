"""Daemon side of the link: a reader thread owns the port, hands tiles to a sink, ACKs once stored."""

from __future__ import annotations

import hashlib
import logging
import queue
import threading
from collections import OrderedDict
from dataclasses import dataclass, field, fields
from enum import StrEnum
from typing import Callable, Protocol, runtime_checkable

import numpy as np

from firmware_bridge.errors import (
    CrcError,
    FrameError,
    FrameTooLargeError,
    LinkError,
    LinkLostError,
    MessageDecodeError,
    TileDecodeError,
    TransportError,
    UnknownVersionError,
)
from firmware_bridge.frames import DELIMITER, MAX_PAYLOAD, PROTOCOL_VERSION, UNKNOWN_SEQ, Frame, FrameReader
from firmware_bridge.messages import (
    STR16_MAX,
    Ack,
    CaseBegin,
    CaseEnd,
    Capability,
    ErrorCode,
    ErrorMessage,
    Hello,
    Message,
    Nack,
    NackReason,
    Role,
    Tile,
    clip_text,
    decode_tile_pixels,
    message_from_frame,
    message_to_frame,
)
from firmware_bridge.pixels import CHANNELS
from firmware_bridge.transport import Transport, open_port, read_some, write_all

log = logging.getLogger(__name__)

ENDED_CASES_REMEMBERED = 16  # enough to re-ACK a retransmitted CASE_END; older ones cannot recur


@dataclass(frozen=True)
class CaseInfo:
    """What the sink learns when a case begins (the CASE_BEGIN fields)."""

    case_id: str
    specimen_id: str
    modality: str
    microns_per_pixel: float
    tile_width: int
    tile_height: int
    channels: int = CHANNELS
    dtype: str = "uint8"
    expected_tiles: int = 0
    image_width: int = 0
    image_height: int = 0
    overlap: int = 0

    @classmethod
    def from_message(cls, msg: CaseBegin) -> CaseInfo:
        return cls(**{f.name: getattr(msg, f.name) for f in fields(cls)})


@dataclass(frozen=True)
class TileReceived:
    """One decoded tile handed to the sink; pixels are read-only uint8 (h, w, 3)."""

    case_id: str
    index: int
    x: int
    y: int
    pixels: np.ndarray = field(repr=False)
    sha256: str | None = None  # hex digest of pixels.tobytes(), when the link computes it

    @property
    def width(self) -> int:
        return int(self.pixels.shape[1])

    @property
    def height(self) -> int:
        return int(self.pixels.shape[0])


class TileSink(Protocol):
    """Where received cases go (the spool, in the daemon).

    Each method returns only once its effect is durable; the host ACKs after it returns.
    If one raises, the host NACKs with STORAGE and the scanner retransmits, so the method
    may be called again with the same data. All calls come from the link's reader thread.
    A sink may also define link_event(kind, detail) (see LinkEventSink) to hear about the link.
    """

    def case_began(self, info: CaseInfo) -> None: ...

    def tile_received(self, tile: TileReceived) -> None: ...

    def case_ended(self, case_id: str, tile_count: int) -> None: ...


@runtime_checkable
class LinkEventSink(Protocol):
    """Optional sink method: called from the reader thread with a LinkEvent and a readable detail."""

    def link_event(self, kind: str, detail: str) -> None: ...


class LinkEvent(StrEnum):
    UP = "up"  # a scanner HELLO arrived and was answered
    DOWN = "down"  # the reader stopped: detail is the error, or "stopped"
    CRC_ERROR = "crc_error"
    FRAME_ERROR = "frame_error"  # COBS, length or size damage
    VERSION_MISMATCH = "version_mismatch"
    MALFORMED = "malformed"  # frame intact, payload not a valid message
    BAD_TILE = "bad_tile"
    STORAGE_ERROR = "storage_error"  # the sink raised; NACKed STORAGE
    UNKNOWN_CASE = "unknown_case"
    DUPLICATE = "duplicate"  # a retransmission of something already stored; re-ACKed
    CASE_ABANDONED = "case_abandoned"  # a new case began before the open one ended
    CASE_INCOMPLETE = "case_incomplete"  # CASE_END tile_count differs from tiles stored
    REMOTE_ERROR = "remote_error"  # the scanner sent ERROR
    UNEXPECTED = "unexpected"  # a message the host never expects from a scanner


@dataclass
class LinkCounters:
    """Running totals, written only by the reader thread."""

    frames_ok: int = 0  # frames that passed COBS, CRC, version and length checks
    crc_errors: int = 0
    framing_errors: int = 0  # COBS, length, size and version failures
    malformed: int = 0
    acks_sent: int = 0
    nacks_sent: int = 0
    duplicates: int = 0
    bad_tiles: int = 0
    storage_errors: int = 0
    tiles_stored: int = 0


@dataclass
class _OpenCase:
    begin: CaseBegin
    stored: set[int] = field(default_factory=set)


_LINK_DOWN = object()  # queue sentinel for wait_case_end


class HostLink:
    """The protocol session on the daemon side. One reader thread does all port I/O.

    port is an open transport (serial.Serial, FdTransport) or a device path / pyserial URL,
    which start() opens with open_port. Either way the link owns it and stop() closes it.
    Use as a context manager or call start() / stop(). Errors from the port end the
    thread; they reach on_connection_lost(exc), sink.link_event("down", ...), the error
    attribute, and make wait_case_end raise LinkLostError.
    """

    def __init__(
        self,
        port: Transport | str,
        sink: TileSink,
        *,
        read_timeout: float = 0.1,
        max_payload: int = MAX_PAYLOAD,
        window: int = 16,
        hash_tiles: bool = True,
        on_connection_lost: Callable[[BaseException | None], None] | None = None,
    ) -> None:
        self.port_name = port if isinstance(port, str) else repr(port)
        self.port: Transport | None = None if isinstance(port, str) else port
        self.sink = sink
        self.read_timeout = read_timeout
        self.max_payload = max_payload
        self.window = window
        self.hash_tiles = hash_tiles
        self.on_connection_lost = on_connection_lost
        self.counters = LinkCounters()
        self.peer: Hello | None = None
        self.error: BaseException | None = None
        self._event_hook = sink.link_event if isinstance(sink, LinkEventSink) else None
        self._reader = FrameReader(max_payload=max_payload)
        self._seq = 0
        self._case: _OpenCase | None = None
        self._ended: OrderedDict[str, int] = OrderedDict()
        self._case_ends: queue.Queue[object] = queue.Queue()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- lifecycle -------------------------------------------------------------------

    def start(self) -> HostLink:
        """Open the port if given by name, then start the reader thread; raises TransportError."""
        if self._thread is not None:
            raise LinkError("HostLink.start() called twice")
        if self.port is None:
            self.port = open_port(self.port_name, timeout=self.read_timeout)
        elif hasattr(self.port, "timeout"):
            # The reader polls the stop flag between reads, so a read must not block forever.
            self.port.timeout = self.read_timeout
        self._thread = threading.Thread(target=self._run, name="firmware-bridge-host", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the reader, close the port, wait for the thread. Safe to call twice."""
        self._stop.set()
        cancel = getattr(self.port, "cancel_read", None)
        if callable(cancel):
            try:
                cancel()
            except (OSError, ValueError):
                pass  # port already closed by the reader: nothing left to wake
        if self._thread is None:
            if self.port is not None:
                self.port.close()  # never started: nobody else will close it
            return
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise LinkError(f"host reader thread did not stop within {timeout} s")

    def __enter__(self) -> HostLink:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def wait_case_end(self, timeout: float | None = None) -> str | None:
        """Return the case_id of the next case that ended, or None on timeout / clean stop.

        Raises LinkLostError if the link died before another case ended.
        """
        try:
            item = self._case_ends.get(timeout=timeout)
        except queue.Empty:
            return None
        if item is _LINK_DOWN:
            self._case_ends.put(item)  # later callers must see it too
            if self.error is not None:
                raise LinkLostError(f"link lost before the case ended: {self.error}") from self.error
            return None
        return str(item)

    # --- reader thread ---------------------------------------------------------------

    def _run(self) -> None:
        error: BaseException | None = None
        try:
            while not self._stop.is_set():
                try:
                    data = read_some(self.port)
                except TransportError:
                    if self._stop.is_set():
                        break  # cancel_read/close during stop() can surface as a read error
                    raise
                if data:
                    for item in self._reader.feed(data):
                        self._handle(item)
        except Exception as exc:  # noqa: BLE001 - not swallowed: reported below, stored, re-raised by wait_case_end
            error = exc
            log.error("scanner link reader stopped: %s", exc, exc_info=exc)
        finally:
            error = self._close_port(error)
            self.error = error
            self._case_ends.put(_LINK_DOWN)
            self._emit_on_shutdown(LinkEvent.DOWN, str(error) if error else "stopped")
            if self.on_connection_lost is not None:
                self.on_connection_lost(error)

    def _close_port(self, error: BaseException | None) -> BaseException | None:
        try:
            self.port.close()
        except (OSError, TransportError) as exc:
            log.warning("closing the scanner port failed: %s", exc)
            return error or TransportError(f"closing the port failed: {exc}")
        return error

    def _handle(self, item: Frame | FrameError) -> None:
        if isinstance(item, FrameError):
            self._on_frame_error(item)
            return
        self.counters.frames_ok += 1
        try:
            msg = message_from_frame(item)
        except MessageDecodeError as exc:
            self.counters.malformed += 1
            self._emit(LinkEvent.MALFORMED, str(exc))
            self._nack(item.seq, NackReason.MALFORMED, str(exc))
            return
        self._dispatch(item.seq, msg)

    def _on_frame_error(self, err: FrameError) -> None:
        if isinstance(err, CrcError):
            self.counters.crc_errors += 1
            self._emit(LinkEvent.CRC_ERROR, str(err))
            self._nack(UNKNOWN_SEQ, NackReason.CRC, str(err))
            return
        self.counters.framing_errors += 1
        if isinstance(err, UnknownVersionError):
            self._emit(LinkEvent.VERSION_MISMATCH, str(err))
            self._send(ErrorMessage(ErrorCode.UNSUPPORTED_VERSION, clip_text(str(err), STR16_MAX)))
        elif isinstance(err, FrameTooLargeError):
            self._emit(LinkEvent.FRAME_ERROR, str(err))
            self._nack(UNKNOWN_SEQ, NackReason.TOO_LARGE, str(err))
        else:
            # COBS and length damage are transit damage just like a CRC mismatch.
            self._emit(LinkEvent.FRAME_ERROR, str(err))
            self._nack(UNKNOWN_SEQ, NackReason.CRC, str(err))

    def _dispatch(self, seq: int, msg: Message) -> None:
        if isinstance(msg, Tile):
            self._on_tile(seq, msg)
        elif isinstance(msg, Hello):
            self._on_hello(msg)
        elif isinstance(msg, CaseBegin):
            self._on_case_begin(seq, msg)
        elif isinstance(msg, CaseEnd):
            self._on_case_end(seq, msg)
        elif isinstance(msg, ErrorMessage):
            self._emit(LinkEvent.REMOTE_ERROR, f"{msg.code.name}: {msg.text}")
        else:
            # ACK/NACK flow host -> scanner only; one arriving here is a confused peer.
            self._emit(LinkEvent.UNEXPECTED, f"{type(msg).__name__} from the scanner ignored")

    def _on_hello(self, msg: Hello) -> None:
        if msg.role != Role.SCANNER:
            self._emit(LinkEvent.UNEXPECTED, f"HELLO with role {msg.role.name}")
            self._send(ErrorMessage(ErrorCode.PROTOCOL, f"HELLO with role {msg.role.name}; expected SCANNER"))
            return
        self.peer = msg
        reply = Hello(
            version=PROTOCOL_VERSION,
            role=Role.HOST,
            window=self.window,
            max_payload=self.max_payload,
            capabilities=Capability.ZLIB | Capability.PNG,
        )
        self._emit(
            LinkEvent.UP,
            f"scanner speaks v{msg.version} (using v{min(msg.version, PROTOCOL_VERSION)}), "
            f"window {msg.window}, max payload {msg.max_payload}",
        )
        # A leading delimiter flushes whatever half-frame the scanner's reader holds.
        self._send(reply, prefix=DELIMITER)

    def _on_case_begin(self, seq: int, msg: CaseBegin) -> None:
        case = self._case
        if case is not None and case.begin.case_id == msg.case_id:
            if case.begin == msg:
                self._duplicate(seq, msg.case_id, -1, f"CASE_BEGIN {msg.case_id}")
            else:
                self._refuse_case(seq, f"case {msg.case_id} is already open with other metadata")
            return
        if msg.channels != CHANNELS:
            self._refuse_case(seq, f"case {msg.case_id}: {msg.channels} channels; v1 carries 3 (RGB)")
            return
        info = CaseInfo.from_message(msg)
        if not self._call_sink(seq, f"case {msg.case_id} begin", self.sink.case_began, info):
            return
        if case is not None:
            self._emit(LinkEvent.CASE_ABANDONED, f"case {case.begin.case_id} never ended; {msg.case_id} began")
        self._ended.pop(msg.case_id, None)  # the same case scanned again is a new case
        self._case = _OpenCase(begin=msg)
        self._ack(seq, msg.case_id, -1)

    def _on_tile(self, seq: int, tile: Tile) -> None:
        case = self._case
        if case is None or case.begin.case_id != tile.case_id:
            detail = f"tile {tile.index}: case {tile.case_id} is not open (send CASE_BEGIN first)"
            self._emit(LinkEvent.UNKNOWN_CASE, detail)
            self._nack(seq, NackReason.UNKNOWN_CASE, detail)
            return
        if tile.index in case.stored:
            self._duplicate(seq, tile.case_id, tile.index, f"tile {tile.index} of {tile.case_id}")
            return
        try:
            _check_tile_fits(case.begin, tile)
            pixels = decode_tile_pixels(tile)
        except TileDecodeError as exc:
            self.counters.bad_tiles += 1
            self._emit(LinkEvent.BAD_TILE, f"case {tile.case_id}: {exc}")
            self._nack(seq, NackReason.BAD_TILE, str(exc))
            return
        digest = hashlib.sha256(pixels.tobytes()).hexdigest() if self.hash_tiles else None
        received = TileReceived(tile.case_id, tile.index, tile.x, tile.y, pixels, digest)
        if not self._call_sink(seq, f"tile {tile.index} of {tile.case_id}", self.sink.tile_received, received):
            return
        case.stored.add(tile.index)
        self.counters.tiles_stored += 1
        self._ack(seq, tile.case_id, tile.index)

    def _on_case_end(self, seq: int, msg: CaseEnd) -> None:
        if msg.case_id in self._ended:
            self._duplicate(seq, msg.case_id, -1, f"CASE_END {msg.case_id}")
            return
        case = self._case
        if case is None or case.begin.case_id != msg.case_id:
            detail = f"CASE_END for {msg.case_id}, which is not open"
            self._emit(LinkEvent.UNKNOWN_CASE, detail)
            self._nack(seq, NackReason.UNKNOWN_CASE, detail)
            return
        if len(case.stored) != msg.tile_count:
            self._emit(
                LinkEvent.CASE_INCOMPLETE,
                f"case {msg.case_id}: scanner reports {msg.tile_count} tiles, {len(case.stored)} stored",
            )
        if not self._call_sink(seq, f"case {msg.case_id} end", self.sink.case_ended, msg.case_id, msg.tile_count):
            return
        self._case = None
        self._ended[msg.case_id] = msg.tile_count
        while len(self._ended) > ENDED_CASES_REMEMBERED:
            self._ended.popitem(last=False)
        self._ack(seq, msg.case_id, -1)
        self._case_ends.put(msg.case_id)  # after the ACK is written, so a waiter can stop the link

    # --- helpers ---------------------------------------------------------------------

    def _call_sink(self, seq: int, what: str, method: Callable[..., None], *args: object) -> bool:
        """Run one sink call; if it raises, NACK STORAGE so the scanner retransmits."""
        try:
            method(*args)
        except Exception as exc:  # noqa: BLE001 - the sink contract: any failure means "not stored"
            self.counters.storage_errors += 1
            detail = f"{what}: {type(exc).__name__}: {exc}"
            log.warning("sink failed, NACKing STORAGE: %s", detail, exc_info=exc)
            self._emit(LinkEvent.STORAGE_ERROR, detail)
            self._nack(seq, NackReason.STORAGE, detail)
            return False
        return True

    def _refuse_case(self, seq: int, detail: str) -> None:
        self.counters.malformed += 1
        self._emit(LinkEvent.MALFORMED, detail)
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

    def _send(self, msg: Message, *, prefix: bytes = b"") -> None:
        seq = self._seq
        self._seq = (self._seq + 1) % UNKNOWN_SEQ  # never emit the reserved value
        write_all(self.port, prefix + message_to_frame(msg, seq))

    def _emit(self, kind: LinkEvent, detail: str) -> None:
        # Called before the answer is written, so whoever sees the answer sees the event too.
        log.debug("link event %s: %s", kind, detail)
        if self._event_hook is not None:
            self._event_hook(str(kind), detail)

    def _emit_on_shutdown(self, kind: LinkEvent, detail: str) -> None:
        try:
            self._emit(kind, detail)
        except Exception:  # noqa: BLE001 - already shutting down; log so it is not lost
            log.exception("sink.link_event(%r) raised during shutdown", str(kind))


def _check_tile_fits(case: CaseBegin, tile: Tile) -> None:
    """Reject a tile whose geometry contradicts its CASE_BEGIN (0 in the case means unknown)."""
    label = f"tile {tile.index}"
    if case.expected_tiles and tile.index >= case.expected_tiles:
        raise TileDecodeError(f"{label}: index out of range, case declares {case.expected_tiles} tiles")
    if tile.w > case.tile_width or tile.h > case.tile_height:
        raise TileDecodeError(
            f"{label}: {tile.w}x{tile.h} is larger than the case tile size {case.tile_width}x{case.tile_height}"
        )
    if case.image_width and tile.x + tile.w > case.image_width:
        raise TileDecodeError(f"{label}: x {tile.x} + w {tile.w} exceeds image width {case.image_width}")
    if case.image_height and tile.y + tile.h > case.image_height:
        raise TileDecodeError(f"{label}: y {tile.y} + h {tile.h} exceeds image height {case.image_height}")
