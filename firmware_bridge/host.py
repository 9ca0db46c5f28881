"""Daemon side of the link: a reader thread owns the port, hands tiles to a sink, ACKs once stored.

The thread also reopens a vanished port (USB unplug) by path with backoff, answers
heartbeats, and keeps the open case across a reconnect so the scanner can resume it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import queue
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field, fields
from typing import Callable, Iterable

import serial

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
    Heartbeat,
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
from firmware_bridge.sink import CaseInfo, CaseRefused, LinkEventSink, TileReceived, TileSink
from firmware_bridge.status import NOISY_EVENTS, LinkCounters, LinkEvent, LinkState
from firmware_bridge.transport import Transport, open_port, read_some, write_all

__all__ = ["HostLink"]

log = logging.getLogger(__name__)

ENDED_CASES_REMEMBERED = 16  # enough to re-ACK a retransmitted CASE_END; older ones cannot recur
HOST_CAPABILITIES = Capability.ZLIB | Capability.PNG | Capability.JPEG | Capability.HEARTBEAT | Capability.RESUME
BACKOFF_INITIAL = 0.05  # seconds before the first reopen of a vanished port
BACKOFF_MAX = 2.0  # the reopen interval doubles up to this; USB re-enumeration takes ~0.5-2 s
SILENCE_FACTOR = 3.0  # a scanner is "down" after this many of its heartbeat intervals without a frame
EVENT_INTERVAL = 1.0  # seconds between two reports of the same noisy event (crc-error, duplicate)


@dataclass
class _OpenCase:
    begin: CaseBegin
    stored: set[int] = field(default_factory=set)


_LINK_DOWN = object()  # queue sentinel for wait_case_end


class HostLink:
    """The protocol session on the daemon side. One reader thread does all port I/O.

    port is an open transport (serial.Serial, FdTransport) or a device path / pyserial URL,
    which start() opens with open_port. Either way the link owns it and stop() closes it.
    Given a path, the link reopens it when it vanishes (reconnect=True by default), waiting
    backoff_initial doubling to backoff_max between attempts, and keeps the open case so the
    scanner can resume it. Given a transport, it cannot reopen: a port error ends the
    thread, reaches on_connection_lost(exc), sink.link_event("down", ...) and the error
    attribute, and makes wait_case_end raise LinkLostError.
    Use as a context manager or call start() / stop().
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
        reconnect: bool | None = None,
        wait_for_port: bool = False,
        backoff_initial: float = BACKOFF_INITIAL,
        backoff_max: float = BACKOFF_MAX,
        capabilities: Capability = HOST_CAPABILITIES,
        event_interval: float = EVENT_INTERVAL,
    ) -> None:
        if not 0 < backoff_initial <= backoff_max:
            raise ValueError(f"need 0 < backoff_initial ({backoff_initial}) <= backoff_max ({backoff_max})")
        by_name = isinstance(port, str)
        if reconnect and not by_name:
            raise ValueError("reconnect=True needs a device path to reopen, not an open transport")
        self.port_name = port if by_name else repr(port)
        self.port: Transport | None = None if by_name else port
        self.sink = sink
        self.read_timeout = read_timeout
        self.max_payload = max_payload
        self.window = window
        self.hash_tiles = hash_tiles
        self.on_connection_lost = on_connection_lost
        self.reconnect = by_name if reconnect is None else reconnect
        self.wait_for_port = wait_for_port
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.capabilities = Capability(capabilities)
        self.event_interval = event_interval
        self.counters = LinkCounters()
        self.peer: Hello | None = None
        self.error: BaseException | None = None
        self._state = LinkState.STOPPED
        self._event_hook = sink.link_event if isinstance(sink, LinkEventSink) else None
        self._reader = FrameReader(max_payload=max_payload)
        self._seq = 0
        self._case: _OpenCase | None = None
        self._hello_since_begin = False
        self._ended: OrderedDict[str, int] = OrderedDict()
        self._case_ends: queue.Queue[object] = queue.Queue()
        self._stop = threading.Event()
        self._wake = threading.Event()  # stop(), or an operator asking for a reconnect (request_reconnect)
        self._reconnect_why: str | None = None
        self._port_lock = threading.Lock()  # port swaps (reader) vs cancel_read (stop)
        self._thread: threading.Thread | None = None
        self._t0 = time.monotonic()
        self._last_heard: float | None = None
        self._peer_interval: float | None = None  # seconds, from the scanner's HEARTBEAT
        self._noisy: dict[LinkEvent, tuple[float, int]] = {}
        self._backoff = backoff_initial  # first delay of the next reopen

    # --- lifecycle -------------------------------------------------------------------

    def restore_case(self, info: CaseInfo, stored: Iterable[int]) -> None:
        """Before start(): re-open a case a previous host process left open (rebuilt from its spool), with the
        tile indices it had stored and ACKed. The scanner's resumed CASE_BEGIN (same fields, after HELLO) then
        resumes it (8.8), and resent tiles that are already stored are re-ACKed, not stored twice."""
        if self._thread is not None:
            raise LinkError("restore_case() must be called before start()")
        begin = CaseBegin(**{f.name: getattr(info, f.name) for f in fields(CaseBegin)})
        self._case = _OpenCase(begin=begin, stored=set(stored))
        self._hello_since_begin = True

    def restore_ended(self, case_id: str, tile_count: int) -> None:
        """Before start(): a case a previous host process had ended (CASE_END stored, maybe not yet ACKed);
        a resent CASE_END for it is re-ACKed as a duplicate instead of refused as unknown."""
        if self._thread is not None:
            raise LinkError("restore_ended() must be called before start()")
        self._ended[case_id] = tile_count

    def start(self) -> HostLink:
        """Open the port if given by name, then start the reader thread; raises TransportError.

        With wait_for_port=True a missing device is not an error: the thread keeps trying
        to open it with backoff (state "reconnecting") until the scanner is plugged in.
        """
        if self._thread is not None:
            raise LinkError("HostLink.start() called twice")
        self._state = LinkState.CONNECTING
        if self.port is None:
            try:
                self.port = open_port(self.port_name, timeout=self.read_timeout)
            except TransportError:
                if not (self.wait_for_port and self.reconnect):
                    self._state = LinkState.STOPPED
                    raise
                self._state = LinkState.RECONNECTING
        elif hasattr(self.port, "timeout"):
            # The reader polls the stop flag between reads, so a read must not block forever.
            self.port.timeout = self.read_timeout
        self._thread = threading.Thread(target=self._run, name="firmware-bridge-host", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the reader, close the port, wait for the thread. Safe to call twice."""
        self._stop.set()
        self._wake.set()
        self._cancel_read()
        if self._thread is None:
            with self._port_lock:
                port = self.port
            if port is not None:
                port.close()  # never started: nobody else will close it
            self._state = LinkState.STOPPED
            return
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise LinkError(f"host reader thread did not stop within {timeout} s")
        self._state = LinkState.STOPPED

    def request_reconnect(self, why: str) -> None:
        """Close and reopen the port now, keeping the open case (the scanner resumes it after HELLO); while
        the port is already being reopened, retry at once instead of waiting out the backoff.

        Raises LinkError when the link cannot reopen (it was given an open transport) or is not running.
        """
        if not self.reconnect:
            raise LinkError("this link was given an open transport, not a device path: it cannot reopen it")
        if not self.running:
            raise LinkError(f"the link to {self.port_name} is not running")
        self._reconnect_why = why
        self._backoff = self.backoff_initial
        self._wake.set()
        self._cancel_read()

    def _cancel_read(self) -> None:
        """Wake a reader blocked in read() (pyserial ports); others wake on their read timeout."""
        with self._port_lock:
            port = self.port
            cancel = getattr(port, "cancel_read", None)
            if callable(cancel) and getattr(port, "is_open", True):
                try:
                    cancel()
                except (OSError, ValueError, TypeError):
                    pass  # port closing under us: the reader wakes on its own read timeout

    def __enter__(self) -> HostLink:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def state(self) -> str:
        """One of "connecting", "up", "down", "reconnecting", "stopped" (a LinkState)."""
        return self._state

    @property
    def last_error(self) -> str | None:
        return self.counters.last_error

    def last_heard_age(self) -> float | None:
        """Seconds since the last intact frame from the scanner, or None if none yet."""
        heard = self._last_heard
        return None if heard is None else time.monotonic() - heard

    def snapshot(self) -> dict[str, object]:
        """State, every counter, last_error, peer and open case as plain JSON-able values.

        Read without pausing the reader thread: each value is current, the set is not an
        atomic cut (tiles_stored may be one ahead of acks_sent, say).
        """
        out: dict[str, object] = {"state": str(self._state), "port": self.port_name, "running": self.running}
        out.update(dataclasses.asdict(self.counters))
        age = self.last_heard_age()
        out["last_heard_age_s"] = None if age is None else round(age, 3)
        peer = self.peer
        out["peer"] = None if peer is None else {
            "version": peer.version,
            "negotiated_version": min(peer.version, PROTOCOL_VERSION),
            "window": peer.window,
            "max_payload": peer.max_payload,
            "capabilities": [c.name.lower() for c in Capability if c in peer.capabilities],
            "heartbeat_interval_s": self._peer_interval,
        }
        case = self._case
        out["case"] = None if case is None else {
            "case_id": case.begin.case_id,
            "tiles_stored": len(case.stored),
            "expected_tiles": case.begin.expected_tiles,
        }
        return out

    def wait_case_end(self, timeout: float | None = None) -> str | None:
        """Return the case_id of the next case that ended, or None on timeout / clean stop.

        Raises LinkLostError if the link died before another case ended. A port that
        vanishes and is being reopened has not died: the wait goes on.
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
            if self.port is None:  # wait_for_port, and nothing there yet
                self._emit(LinkEvent.RECONNECTING, f"{self.port_name} is not there yet; opening it with backoff")
                if not self._reopen():
                    return
            while not self._stop.is_set():
                try:
                    self._pump()
                except TransportError as exc:
                    if self._stop.is_set():
                        break  # cancel_read/close during stop() can surface as a read error
                    if not self.reconnect:
                        raise
                    self._port_lost(exc)
                    if not self._reopen():
                        break
                    self.counters.reconnects += 1
        except Exception as exc:  # noqa: BLE001 - not swallowed: reported below, stored, re-raised by wait_case_end
            error = exc
            log.error("scanner link reader stopped: %s", exc, exc_info=exc)
        finally:
            error = self._close_port(error)
            self.error = error
            if error is not None:
                self.counters.last_error = f"{type(error).__name__}: {error}"
            self._state = LinkState.STOPPED if error is None or self._stop.is_set() else LinkState.DOWN
            self._case_ends.put(_LINK_DOWN)
            self._emit_on_shutdown(LinkEvent.DOWN, str(error) if error else "stopped")
            if self.on_connection_lost is not None:
                self.on_connection_lost(error)

    def _pump(self) -> None:
        """Read and handle frames until stop() or a TransportError."""
        port, reader, counters = self.port, self._reader, self.counters
        while not self._stop.is_set():
            data = read_some(port)
            if self._wake.is_set() and not self._stop.is_set():
                self._wake.clear()
                raise TransportError(f"reconnect requested: {self._reconnect_why}")
            if data:
                counters.bytes_received += len(data)
                for item in reader.feed(data):
                    self._handle(item)
            if self._peer_interval is not None:
                self._check_silence()

    def _port_lost(self, exc: TransportError) -> None:
        self.counters.last_error = f"port: {exc}"
        log.warning("scanner port %s lost: %s; reopening", self.port_name, exc)
        self._close_port(None)
        self._peer_interval = None  # silence is now the port's story, not the scanner's
        self._set_state(LinkState.DOWN, f"port {self.port_name} lost: {exc}")
        self._set_state(
            LinkState.RECONNECTING,
            f"reopening {self.port_name}: first try in {self._backoff:g} s, doubling to {self.backoff_max:g} s",
        )

    def _reopen(self) -> bool:
        """Reopen port_name with exponential backoff; False if stop() came first."""
        delay = self._backoff
        began = time.monotonic()
        attempts = 0
        while not self._sleep(delay):
            attempts += 1
            self.counters.reconnect_attempts += 1
            try:
                port = open_port(self.port_name, timeout=self.read_timeout)
            except TransportError as exc:
                # Expected while the device is gone; the doubling delay keeps this loop idle.
                log.debug("reopen attempt %d of %s failed: %s", attempts, self.port_name, exc)
                delay = min(delay * 2, self.backoff_max)
                continue
            with self._port_lock:
                self.port = port
            if self._stop.is_set():
                return False
            # A device that opens but fails at once (a stale node) must not cycle at the
            # initial rate: the next loss starts where this one left off, until a HELLO
            # proves the port works (_on_hello resets it).
            self._backoff = min(delay * 2, self.backoff_max)
            self._reader = FrameReader(max_payload=self.max_payload)  # drop any half frame
            self._set_state(
                LinkState.CONNECTING,
                f"opened {self.port_name} after {attempts} attempt(s) in {time.monotonic() - began:.2f} s",
            )
            return True
        return False

    def _sleep(self, delay: float) -> bool:
        """Wait ``delay`` s or until woken; True if stop() came. A reconnect request cuts the wait short."""
        if self._wake.wait(delay) and not self._stop.is_set():
            self._wake.clear()
        return self._stop.is_set()

    def _close_port(self, error: BaseException | None) -> BaseException | None:
        with self._port_lock:
            port, self.port = self.port, None
        if port is None:
            return error
        try:
            port.close()
        except (OSError, TransportError, serial.SerialException) as exc:
            log.warning("closing the scanner port failed: %s", exc)
            return error or TransportError(f"closing the port failed: {exc}")
        return error

    def _check_silence(self) -> None:
        limit = SILENCE_FACTOR * self._peer_interval
        heard = self._last_heard
        if self._state == LinkState.UP and heard is not None and time.monotonic() - heard > limit:
            self._set_state(
                LinkState.DOWN,
                f"no frame from the scanner for {time.monotonic() - heard:.1f} s "
                f"(it sends a heartbeat every {self._peer_interval:g} s when idle)",
            )

    def _handle(self, item: Frame | FrameError) -> None:
        if isinstance(item, FrameError):
            self._on_frame_error(item)
            return
        self.counters.frames_ok += 1
        self._last_heard = time.monotonic()
        try:
            msg = message_from_frame(item)
        except MessageDecodeError as exc:
            self.counters.malformed += 1
            self._problem(LinkEvent.MALFORMED, str(exc))
            self._nack(item.seq, NackReason.MALFORMED, str(exc))
            return
        if not isinstance(msg, Hello):
            if self._state == LinkState.DOWN:
                self._set_state(LinkState.UP, "the silent scanner was heard again")
            elif self._state == LinkState.CONNECTING and self.peer is not None:
                # a reopened port (the host's side of a reconnect): the same scanner session goes on
                self._set_state(LinkState.UP, "the scanner was heard again on the reopened port")
        self._dispatch(item.seq, msg)

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

    def _dispatch(self, seq: int, msg: Message) -> None:
        if isinstance(msg, Tile):
            self._on_tile(seq, msg)
        elif isinstance(msg, Heartbeat):
            self._on_heartbeat(seq, msg)
        elif isinstance(msg, Hello):
            self._on_hello(msg)
        elif isinstance(msg, CaseBegin):
            self._on_case_begin(seq, msg)
        elif isinstance(msg, CaseEnd):
            self._on_case_end(seq, msg)
        elif isinstance(msg, ErrorMessage):
            self._problem(LinkEvent.REMOTE_ERROR, f"{msg.code.name}: {msg.text}")
        else:
            # ACK/NACK flow host -> scanner only; one arriving here is a confused peer.
            self._emit(LinkEvent.UNEXPECTED, f"{type(msg).__name__} from the scanner ignored")

    def _on_hello(self, msg: Hello) -> None:
        if msg.role != Role.SCANNER:
            self._emit(LinkEvent.UNEXPECTED, f"HELLO with role {msg.role.name}")
            self._error(ErrorCode.PROTOCOL, f"HELLO with role {msg.role.name}; expected SCANNER")
            return
        self.peer = msg
        self.counters.hellos += 1
        self._backoff = self.backoff_initial
        self._hello_since_begin = True  # a CASE_BEGIN for the open case is now a resume
        self._peer_interval = None  # until this connection's first HEARTBEAT says otherwise
        reply = Hello(
            version=PROTOCOL_VERSION,
            role=Role.HOST,
            window=self.window,
            max_payload=self.max_payload,
            capabilities=self.capabilities,
        )
        self._set_state(
            LinkState.UP,
            f"scanner speaks v{msg.version} (using v{min(msg.version, PROTOCOL_VERSION)}), "
            f"window {msg.window}, max payload {msg.max_payload}",
            always=True,
        )
        # A leading delimiter flushes whatever half-frame the scanner's reader holds.
        self._send(reply, prefix=DELIMITER)

    def _on_heartbeat(self, seq: int, msg: Heartbeat) -> None:
        self.counters.heartbeats += 1
        if msg.interval_ms:
            self._peer_interval = msg.interval_ms / 1000.0
        if not msg.is_reply:
            uptime_ms = int((time.monotonic() - self._t0) * 1000) & 0xFFFFFFFF
            self._send(Heartbeat(reply_to=seq, uptime_ms=uptime_ms, interval_ms=0))

    def _on_case_begin(self, seq: int, msg: CaseBegin) -> None:
        case = self._case
        if case is not None and case.begin.case_id == msg.case_id:
            if case.begin != msg:
                self._refuse_case(seq, msg.case_id, _differences(case.begin, msg))
            elif self._hello_since_begin:
                # Same case, same fields, new connection: the scanner resumes after a
                # reconnect. Keep what is stored; the sink already knows the case.
                self._hello_since_begin = False
                self.counters.resumes += 1
                self._emit(
                    LinkEvent.RESUMED,
                    f"case {msg.case_id} resumed with {len(case.stored)} tiles already stored",
                )
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
        self._ended.pop(msg.case_id, None)  # the same case scanned again is a new case
        self._case = _OpenCase(begin=msg)
        self._hello_since_begin = False
        self._ack(seq, msg.case_id, -1)

    def _on_tile(self, seq: int, tile: Tile) -> None:
        case = self._case
        if case is None or case.begin.case_id != tile.case_id:
            detail = f"tile {tile.index}: case {tile.case_id} is not open (send CASE_BEGIN first)"
            self._problem(LinkEvent.UNKNOWN_CASE, detail)
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
            self._problem(LinkEvent.BAD_TILE, f"case {tile.case_id}: {exc}")
            self._nack(seq, NackReason.BAD_TILE, str(exc))
            return
        # hashlib reads the (C-contiguous) array's buffer directly: no tobytes() copy.
        digest = hashlib.sha256(pixels).hexdigest() if self.hash_tiles else None
        received = TileReceived(
            tile.case_id, tile.index, tile.x, tile.y, pixels, digest,
            encoding=tile.encoding.name.lower(), payload_size=len(tile.payload),
        )
        if not self._call_sink(seq, f"tile {tile.index} of {tile.case_id}", self.sink.tile_received, received):
            return
        case.stored.add(tile.index)
        self.counters.tiles_stored += 1
        self.counters.tile_bytes += pixels.nbytes
        self._ack(seq, tile.case_id, tile.index)

    def _on_case_end(self, seq: int, msg: CaseEnd) -> None:
        if msg.case_id in self._ended:
            self._duplicate(seq, msg.case_id, -1, f"CASE_END {msg.case_id}")
            return
        case = self._case
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
        self._case = None
        self._ended[msg.case_id] = msg.tile_count
        while len(self._ended) > ENDED_CASES_REMEMBERED:
            self._ended.popitem(last=False)
        self._ack(seq, msg.case_id, -1)
        self._case_ends.put(msg.case_id)  # after the ACK is written, so a waiter can stop the link

    # --- helpers ---------------------------------------------------------------------

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
        write_all(self.port, prefix + message_to_frame(msg, seq))

    def _set_state(self, state: LinkState, detail: str, *, always: bool = False) -> None:
        if state == self._state and not always:
            return
        self._state = state
        self._emit(LinkEvent(state.value), detail)

    def _problem(self, kind: LinkEvent, detail: str) -> None:
        """Record detail as last_error, then report it."""
        self.counters.last_error = f"{kind}: {detail}"
        self._emit(kind, detail)

    def _emit(self, kind: LinkEvent, detail: str) -> None:
        # Called before the answer is written, so whoever sees the answer sees the event too.
        if kind in NOISY_EVENTS:
            # A noisy line produces these by the thousand; the counters keep the exact
            # numbers, the event stream gets one per event_interval with a tally.
            now = time.monotonic()
            last, suppressed = self._noisy.get(kind, (float("-inf"), 0))
            if now - last < self.event_interval:
                self._noisy[kind] = (last, suppressed + 1)
                return
            self._noisy[kind] = (now, 0)
            if suppressed:
                detail = f"{detail} (and {suppressed} more since the last report)"
        log.debug("link event %s: %s", kind, detail)
        if self._event_hook is not None:
            self._event_hook(str(kind), detail)

    def _emit_on_shutdown(self, kind: LinkEvent, detail: str) -> None:
        try:
            self._emit(kind, detail)
        except Exception:  # noqa: BLE001 - already shutting down; log so it is not lost
            log.exception("sink.link_event(%r) raised during shutdown", str(kind))


def _differences(open_case: CaseBegin, new: CaseBegin) -> str:
    """Name each CASE_BEGIN field that differs, for the NACK a technician reads."""
    diffs = [
        f"{f.name} {getattr(open_case, f.name)!r} -> {getattr(new, f.name)!r}"
        for f in fields(CaseBegin)
        if getattr(open_case, f.name) != getattr(new, f.name)
    ]
    return ", ".join(diffs)


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
