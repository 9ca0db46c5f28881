"""The host's scanner port: a transport it was given, or a device path it opens and reopens with backoff.

The host-side counterpart of scanner_port.py. HostLink's reader thread does everything here but
cancel_read(), which stop() and request_reconnect() call from other threads to wake a blocked
read; a lock keeps that from meeting a half-swapped transport.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import serial

from firmware_bridge.errors import TransportError
from firmware_bridge.status import LinkCounters
from firmware_bridge.transport import Transport, open_port

__all__ = ["BACKOFF_INITIAL", "BACKOFF_MAX", "HostPort"]

log = logging.getLogger(__name__)

BACKOFF_INITIAL = 0.05  # seconds before the first reopen of a vanished port
BACKOFF_MAX = 2.0  # the reopen interval doubles up to this; USB re-enumeration takes ~0.5-2 s


class HostPort:
    """The port of one HostLink. Given a path (or pyserial URL) it opens it itself and, with reconnect
    (the default for a path), reopens it when it vanishes; given an open transport it cannot reopen it."""

    def __init__(
        self,
        port: Transport | str,
        *,
        read_timeout: float,
        reconnect: bool | None = None,
        backoff_initial: float = BACKOFF_INITIAL,
        backoff_max: float = BACKOFF_MAX,
    ) -> None:
        if not 0 < backoff_initial <= backoff_max:
            raise ValueError(f"need 0 < backoff_initial ({backoff_initial}) <= backoff_max ({backoff_max})")
        by_name = isinstance(port, str)
        if reconnect and not by_name:
            raise ValueError("reconnect=True needs a device path to reopen, not an open transport")
        self.name = port if by_name else repr(port)
        self.transport: Transport | None = None if by_name else port
        self.read_timeout = read_timeout
        self.reconnect = by_name if reconnect is None else reconnect
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.backoff = backoff_initial  # first delay of the next reopen
        self._lock = threading.Lock()  # transport swaps (reader) vs cancel_read (stop)

    def open(self) -> None:
        """Open the path if nothing is open yet (raises TransportError), else give the transport the read timeout."""
        if self.transport is None:
            transport = open_port(self.name, timeout=self.read_timeout)
            with self._lock:
                self.transport = transport
        elif hasattr(self.transport, "timeout"):
            # The reader polls the stop flag between reads, so a read must not block forever.
            self.transport.timeout = self.read_timeout

    def works(self) -> None:
        """The port demonstrably works (a scanner HELLO came) or an operator asked: the next reopen starts afresh."""
        self.backoff = self.backoff_initial

    def reopen(self, sleep: Callable[[float], bool], counters: LinkCounters) -> int | None:
        """Reopen the path, waiting `backoff` doubling to backoff_max before each try; the attempts so far.

        sleep(delay) waits and returns True when the link is stopping: then None. Each try is counted in
        counters.reconnect_attempts as it is made.
        """
        delay = self.backoff
        attempts = 0
        while not sleep(delay):
            attempts += 1
            counters.reconnect_attempts += 1
            try:
                transport = open_port(self.name, timeout=self.read_timeout)
            except TransportError as exc:
                # Expected while the device is gone; the doubling delay keeps this loop idle.
                log.debug("reopen attempt %d of %s failed: %s", attempts, self.name, exc)
                delay = min(delay * 2, self.backoff_max)
                continue
            with self._lock:
                self.transport = transport
            # A device that opens but fails at once (a stale node) must not cycle at the
            # initial rate: the next loss starts where this one left off, until a HELLO
            # proves the port works (works()).
            self.backoff = min(delay * 2, self.backoff_max)
            return attempts
        return None

    def cancel_read(self) -> None:
        """Wake a reader blocked in read() (pyserial ports); others wake on their read timeout."""
        with self._lock:
            transport = self.transport
            cancel = getattr(transport, "cancel_read", None)
            if callable(cancel) and getattr(transport, "is_open", True):
                try:
                    cancel()
                except (OSError, ValueError, TypeError) as exc:
                    # The port is closing under us; the reader wakes on its own read timeout.
                    log.debug("cancel_read on %s failed: %s", self.name, exc)

    def close(self) -> TransportError | None:
        """Close the transport, if one is open; a failure to close is logged and returned, not raised."""
        with self._lock:
            transport, self.transport = self.transport, None
        if transport is None:
            return None
        try:
            transport.close()
        except (OSError, TransportError, serial.SerialException) as exc:
            log.warning("closing the scanner port failed: %s", exc)
            return TransportError(f"closing the port failed: {exc}")
        return None
