"""Daemon side of the link, the port keeper: a reader thread owns the scanner port and feeds the protocol session.

The role of pyserial's serial.threaded.ReaderThread: the thread opens and owns the port,
reads bytes, writes the answers, and reports connection_lost(exc) (on_connection_lost).
What to answer is decided by session.HostSession, which also hands tiles to the sink and
ACKs them once stored. The thread reopens a vanished port (USB unplug) by path with
backoff (host_port.HostPort) and keeps the session, and so the open case, so the scanner
can resume it.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from typing import Callable, Iterable

from firmware_bridge.answers import Answer
from firmware_bridge.cases import ENDED_CASES_REMEMBERED
from firmware_bridge.codes import Capability
from firmware_bridge.errors import LinkError, LinkLostError, TransportError
from firmware_bridge.frames import MAX_PAYLOAD
from firmware_bridge.host_port import BACKOFF_INITIAL, BACKOFF_MAX, HostPort
from firmware_bridge.messages import Hello
from firmware_bridge.session import EVENT_INTERVAL, HOST_CAPABILITIES, SILENCE_FACTOR, HostSession
from firmware_bridge.sink import CaseInfo, TileSink
from firmware_bridge.status import LinkCounters, LinkEvent, LinkState, LinkStatus
from firmware_bridge.transport import Transport, read_some, write_all

# The protocol constants are the session's; PROTOCOL.md (8.5, 8.6) documents them as the host's.
__all__ = ["ENDED_CASES_REMEMBERED", "HOST_CAPABILITIES", "SILENCE_FACTOR", "HostLink"]

log = logging.getLogger(__name__)

_LINK_DOWN = object()  # queue sentinel for wait_case_end


class HostLink:
    """The daemon's end of the scanner link. One reader thread does all port I/O; `session` does the protocol.

    port is an open transport (serial.Serial, FdTransport) or a device path / pyserial URL,
    which start() opens with open_port. Either way the link owns it and stop() closes it.
    Given a path, the link reopens it when it vanishes (reconnect=True by default), waiting
    backoff_initial doubling to backoff_max between attempts, and keeps the open case so the
    scanner can resume it. Given a transport, it cannot reopen: a port error ends the
    thread, reaches on_connection_lost(exc), sink.link_event("down", ...) and the error
    attribute, and makes wait_case_end raise LinkLostError.
    Use as a context manager or call start() / stop(). The protocol settings (max_payload,
    window, hash_tiles, capabilities, event_interval) are the session's: link.session.window.
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
        self._port = HostPort(
            port,
            read_timeout=read_timeout,
            reconnect=reconnect,
            backoff_initial=backoff_initial,
            backoff_max=backoff_max,
        )
        self.sink = sink
        self.on_connection_lost = on_connection_lost
        self.wait_for_port = wait_for_port
        self.session = HostSession(
            sink,
            max_payload=max_payload,
            window=window,
            hash_tiles=hash_tiles,
            capabilities=capabilities,
            event_interval=event_interval,
            started=time.monotonic(),
        )
        self.counters: LinkCounters = self.session.counters
        self.error: BaseException | None = None
        self._status: LinkStatus = self.session.status  # the port's states go to the same place
        self._case_ends: queue.Queue[object] = queue.Queue()
        self._stop = threading.Event()
        self._wake = threading.Event()  # stop(), or an operator asking for a reconnect (request_reconnect)
        self._reconnect_why: str | None = None
        self._thread: threading.Thread | None = None

    # --- lifecycle -------------------------------------------------------------------

    def restore_case(self, info: CaseInfo, stored: Iterable[int]) -> None:
        """Before start(): re-open a case a previous host process left open (rebuilt from its spool), with the
        tile indices it had stored and ACKed. The scanner's resumed CASE_BEGIN (same fields, after HELLO) then
        resumes it (8.8), and resent tiles that are already stored are re-ACKed, not stored twice."""
        if self._thread is not None:
            raise LinkError("restore_case() must be called before start()")
        self.session.restore_case(info, stored)

    def restore_ended(self, case_id: str, tile_count: int) -> None:
        """Before start(): a case a previous host process had ended (CASE_END stored, maybe not yet ACKed);
        a resent CASE_END for it is re-ACKed as a duplicate instead of refused as unknown."""
        if self._thread is not None:
            raise LinkError("restore_ended() must be called before start()")
        self.session.restore_ended(case_id, tile_count)

    def start(self) -> HostLink:
        """Open the port if given by name, then start the reader thread; raises TransportError.

        With wait_for_port=True a missing device is not an error: the thread keeps trying
        to open it with backoff (state "reconnecting") until the scanner is plugged in.
        """
        if self._thread is not None:
            raise LinkError("HostLink.start() called twice")
        self._status.state = LinkState.CONNECTING
        try:
            self._port.open()
        except TransportError:
            if not (self.wait_for_port and self._port.reconnect):
                self._status.state = LinkState.STOPPED
                raise
            self._status.state = LinkState.RECONNECTING
        self._thread = threading.Thread(target=self._run, name="firmware-bridge-host", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the reader, close the port, wait for the thread. Safe to call twice."""
        self._stop.set()
        self._wake.set()
        self._port.cancel_read()
        if self._thread is None:
            self._port.close()  # never started: nobody else will close it
            self._status.state = LinkState.STOPPED
            return
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise LinkError(f"host reader thread did not stop within {timeout} s")
        self._status.state = LinkState.STOPPED

    def request_reconnect(self, why: str) -> None:
        """Close and reopen the port now, keeping the open case (the scanner resumes it after HELLO); while
        the port is already being reopened, retry at once instead of waiting out the backoff.

        Raises LinkError when the link cannot reopen (it was given an open transport) or is not running.
        """
        if not self._port.reconnect:
            raise LinkError("this link was given an open transport, not a device path: it cannot reopen it")
        if not self.running:
            raise LinkError(f"the link to {self.port_name} is not running")
        self._reconnect_why = why
        self._port.works()
        self._wake.set()
        self._port.cancel_read()

    def __enter__(self) -> HostLink:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def port(self) -> Transport | None:
        """The open transport, or None while the port is being (re)opened or after stop()."""
        return self._port.transport

    @property
    def port_name(self) -> str:
        """The device path the link opens, or the repr of the transport it was given."""
        return self._port.name

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def state(self) -> str:
        """One of "connecting", "up", "down", "reconnecting", "stopped" (a LinkState)."""
        return self._status.state

    @property
    def peer(self) -> Hello | None:
        """The scanner's latest HELLO, or None before the first."""
        return self.session.peer

    @property
    def last_error(self) -> str | None:
        return self.counters.last_error

    def last_heard_age(self) -> float | None:
        """Seconds since the last intact frame from the scanner, or None if none yet."""
        heard = self.session.last_heard
        return None if heard is None else time.monotonic() - heard

    def snapshot(self) -> dict[str, object]:
        """State, every counter, last_error, peer and open case as plain JSON-able values.

        Read without pausing the reader thread: each value is current, the set is not an
        atomic cut (tiles_stored may be one ahead of acks_sent, say).
        """
        out: dict[str, object] = {"state": str(self.state), "port": self.port_name, "running": self.running}
        out.update(dataclasses.asdict(self.counters))
        age = self.last_heard_age()
        out["last_heard_age_s"] = None if age is None else round(age, 3)
        out.update(self.session.describe())  # peer and case
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
            if self._port.transport is None:  # wait_for_port, and nothing there yet
                detail = f"{self.port_name} is not there yet; opening it with backoff"
                self._status.emit(LinkEvent.RECONNECTING, detail, time.monotonic())
                if not self._reopen():
                    return
            while not self._stop.is_set():
                try:
                    self._pump()
                except TransportError as exc:
                    if self._stop.is_set():
                        break  # cancel_read/close during stop() can surface as a read error
                    if not self._port.reconnect:
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
            self._status.state = LinkState.STOPPED if error is None or self._stop.is_set() else LinkState.DOWN
            self._case_ends.put(_LINK_DOWN)
            self._emit_on_shutdown(LinkEvent.DOWN, str(error) if error else "stopped")
            if self.on_connection_lost is not None:
                self.on_connection_lost(error)

    def _pump(self) -> None:
        """Read and handle frames until stop() or a TransportError."""
        port, session = self._port.transport, self.session
        while not self._stop.is_set():
            data = read_some(port)
            if self._wake.is_set() and not self._stop.is_set():
                self._wake.clear()
                raise TransportError(f"reconnect requested: {self._reconnect_why}")
            if data:
                # One frame at a time, each answer written before the next frame is handled:
                # an ACK must not wait for the storage of the tiles behind it.
                for item in session.split(data):
                    self._carry_out(session.handle(item, time.monotonic()), port)
            session.check_silence(time.monotonic())

    def _carry_out(self, answer: Answer, port: Transport) -> None:
        if answer.scanner_hello:
            self._port.works()  # a HELLO proves it
        if answer.wire:
            write_all(port, answer.wire)
        if answer.case_ended is not None:
            self._case_ends.put(answer.case_ended)  # after the ACK is written, so a waiter can stop the link

    def _port_lost(self, exc: TransportError) -> None:
        port = self._port
        self.counters.last_error = f"port: {exc}"
        log.warning("scanner port %s lost: %s; reopening", self.port_name, exc)
        port.close()
        self.session.port_lost()
        self._status.set_state(LinkState.DOWN, f"port {self.port_name} lost: {exc}", time.monotonic())
        self._status.set_state(
            LinkState.RECONNECTING,
            f"reopening {port.name}: first try in {port.backoff:g} s, doubling to {port.backoff_max:g} s",
            time.monotonic(),
        )

    def _reopen(self) -> bool:
        """Reopen the port by name with backoff, then start the session's new connection; False if stop() came first."""
        began = time.monotonic()
        attempts = self._port.reopen(self._sleep, self.counters)
        if attempts is None or self._stop.is_set():
            return False
        self.session.new_connection()
        self._status.set_state(
            LinkState.CONNECTING,
            f"opened {self.port_name} after {attempts} attempt(s) in {time.monotonic() - began:.2f} s",
            time.monotonic(),
        )
        return True

    def _sleep(self, delay: float) -> bool:
        """Wait ``delay`` s or until woken; True if stop() came. A reconnect request cuts the wait short."""
        if self._wake.wait(delay) and not self._stop.is_set():
            self._wake.clear()
        return self._stop.is_set()

    def _close_port(self, error: BaseException | None) -> BaseException | None:
        """Close the port; the error the reader stopped with, else a failure to close, else None."""
        closing = self._port.close()
        return error or closing

    def _emit_on_shutdown(self, kind: LinkEvent, detail: str) -> None:
        try:
            self._status.emit(kind, detail, time.monotonic())
        except Exception:  # noqa: BLE001 - already shutting down; logged with its traceback, not lost
            log.exception("sink.link_event(%r) raised during shutdown", str(kind))

