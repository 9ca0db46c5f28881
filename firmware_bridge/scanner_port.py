"""The emulator's port keeper: it reads the host's frames on a thread, writes with injected faults, replugs.

The scanner-side counterpart of host.py. A reader thread decodes the host's frames into an
inbox; every write (through the fault injector, if any) comes from the thread that drives
the case, so the transport sees one reader and one writer, as serial.Serial allows. With a
PtyCable it also pulls and replugs the cable, or waits for someone else to plug it back.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from firmware_bridge.errors import FrameError, LinkLostError, MessageDecodeError, TransportError
from firmware_bridge.faults import FaultKind, Faults
from firmware_bridge.frames import MAX_PAYLOAD, FrameReader
from firmware_bridge.messages import message_from_frame
from firmware_bridge.transport import Transport, read_some, write_all

__all__ = ["Disconnected", "Pluggable", "ScannerPort", "is_pluggable"]

log = logging.getLogger(__name__)

READER_JOIN_TIMEOUT = 5.0  # seconds; reads time out far sooner, this only guards a stuck driver
REORDER_HOLD = 0.005  # a REORDER fault holds a frame back at most this long if nothing follows it


class Pluggable(Protocol):
    """A cable the emulator can pull and plug back in (PtyCable)."""

    generation: int

    @property
    def plugged(self) -> bool: ...

    @property
    def scanner(self) -> Transport: ...

    def unplug(self) -> None: ...

    def replug(self) -> Transport: ...

    def wait_plugged(self, timeout: float | None = None, *, newer_than: int = 0) -> Transport | None: ...


def is_pluggable(obj: object) -> bool:
    """True for a cable (PtyCable) rather than a plain transport."""
    # Looked up on the type: the cable's `scanner` property raises while it is unplugged,
    # so an isinstance check against the Protocol would call it.
    return all(callable(getattr(type(obj), name, None)) for name in ("unplug", "replug", "wait_plugged"))


class Disconnected(Exception):
    """The cable went away under a write or read; the emulator reconnects and resumes."""

    def __init__(self, reason: str, *, injected: bool = False) -> None:
        super().__init__(reason)
        self.injected = injected


@dataclass(frozen=True)
class _ReaderFailed:
    error: BaseException


class ScannerPort:
    """Owns the transport (or cable) of one emulator run: reads on a thread, writes on the caller's.

    on_frame_written is called once per frame write that reached the transport or that a
    fault swallowed on purpose (the emulator's frames_written).
    """

    def __init__(
        self,
        transport: Transport | Pluggable,
        *,
        faults: Faults | None = None,
        max_payload: int = MAX_PAYLOAD,
        replug_delay: float = 0.05,
        reconnect_timeout: float = 30.0,
        on_frame_written: Callable[[], None] | None = None,
    ) -> None:
        self.cable: Pluggable | None = transport if is_pluggable(transport) else None
        self.transport: Transport = self.cable.scanner if self.cable is not None else transport
        self.faults = faults
        self.max_payload = max_payload
        self.replug_delay = replug_delay
        self.reconnect_timeout = reconnect_timeout
        self.on_frame_written = on_frame_written
        self.connections = 0  # plug-ins so far, the first one included
        self.last_write = time.monotonic()
        self.inbound_seq = 0  # header seq of the host frame next_item() returned last
        self._held_at = 0.0
        self._inbox: queue.Queue[object] = queue.Queue()
        self._reader_stop = threading.Event()
        self._reader: threading.Thread | None = None

    # --- the reader thread -------------------------------------------------------------

    def open(self) -> None:
        """Start reading the current transport (a new inbox: nothing from an old connection leaks in)."""
        self.connections += 1
        self._inbox = queue.Queue()
        self._reader_stop = threading.Event()
        self._reader = threading.Thread(
            target=self._read_loop,
            args=(self.transport, self._inbox, self._reader_stop),
            name="scanner-emulator-reader",
            daemon=True,
        )
        self._reader.start()

    def close(self) -> None:
        """Stop the reader thread (the transport stays open; its owner closes it)."""
        self._reader_stop.set()
        reader, self._reader = self._reader, None
        if reader is None:
            return
        reader.join(READER_JOIN_TIMEOUT)
        if reader.is_alive():
            log.warning("emulator reader thread still blocked in read() on %r", self.transport)

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
        except Exception as exc:  # noqa: BLE001 - handed to the driving thread, which re-raises it
            if not stop.is_set():
                inbox.put(_ReaderFailed(exc))

    def next_item(self, timeout: float) -> object:
        """The next message (or FrameError / MessageDecodeError) from the host, or None after timeout.

        Raises Disconnected when the reader lost a pluggable cable, or the reader's error.
        """
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
            if self.cable is not None and isinstance(item.error, TransportError):
                raise Disconnected(str(item.error)) from item.error
            raise item.error
        if isinstance(item, tuple):
            self.inbound_seq, item = item
        return item

    # --- writes ----------------------------------------------------------------------

    def write(self, wire: bytes) -> None:
        """Write one frame, through the fault injector if there is one; raises Disconnected."""
        if self.faults is None:
            self._raw_write(wire)
            self._count_write()
            return
        injection = self.faults.apply(wire, can_disconnect=self.cable is not None)
        if injection.kind == FaultKind.REORDER:
            self._held_at = time.monotonic()
        if injection.data:
            self._raw_write(injection.data)
        self._count_write()
        if injection.disconnect:
            raise Disconnected("fault injection pulled the cable", injected=True)

    def _count_write(self) -> None:
        if self.on_frame_written is not None:
            self.on_frame_written()

    def _raw_write(self, data: bytes) -> None:
        try:
            write_all(self.transport, data)
        except TransportError as exc:
            if self.cable is None:
                raise
            raise Disconnected(str(exc)) from exc
        self.last_write = time.monotonic()

    def discard_faults(self) -> None:
        """Drop a frame a REORDER still holds back: after a case or a cut it would be a stray resend."""
        if self.faults is not None:
            self.faults.discard()

    # --- unplug and replug -------------------------------------------------------------

    def reconnect(self, cut: Disconnected) -> None:
        """After a cut: get a plugged-in cable (pulling it ourselves if a fault said so) and read it.

        Raises TransportError when the link failed with the cable still in, LinkLostError when
        it is not plugged back in within reconnect_timeout.
        """
        cable = self.cable
        assert cable is not None  # Disconnected is only raised with a cable
        old = self.transport
        old_generation = getattr(old, "generation", cable.generation)
        self.close()
        self.discard_faults()
        if cut.injected:
            log.debug("fault: pulling the cable for %.3f s", self.replug_delay)
            cable.unplug()
            time.sleep(self.replug_delay)
            end = cable.replug()
        else:
            if cable.plugged and cable.generation == old_generation:
                raise TransportError(f"the link failed but the cable is still plugged in: {cut}") from cut
            end = cable.wait_plugged(self.reconnect_timeout, newer_than=old_generation)
            if end is None:
                raise LinkLostError(
                    f"the cable {cable!r} was not plugged back in within {self.reconnect_timeout} s "
                    f"after: {cut}"
                ) from cut
        old.close()  # its reader has stopped; the cable retired it already
        self.transport = end
        self.open()
