"""Byte transports for the link: pyserial ports by path or URL, and raw file descriptors (pty master)."""

from __future__ import annotations

import os
import select
import time
from typing import Protocol

import serial

from firmware_bridge.errors import TransportError

READ_CHUNK = 64 * 1024
WRITE_POLL = 0.1  # seconds; how often a write blocked on a full buffer re-checks the transport


class Transport(Protocol):
    """What the link needs from a byte pipe. read returns b"" when its timeout passes."""

    def read(self, size: int = 1) -> bytes: ...

    def write(self, data: bytes) -> int | None: ...

    def close(self) -> None: ...


def open_port(
    url_or_path: str,
    timeout: float | None = 0.1,
    *,
    baudrate: int = 115200,
    write_timeout: float | None = 5.0,
) -> serial.Serial:
    """Open a serial device path (/dev/ttyACM0, /dev/pts/N) or a pyserial URL (loop://, socket://).

    timeout bounds each read so a reader thread can notice a stop request; write_timeout
    bounds a write to a peer that stopped reading, which then surfaces as TransportError
    instead of a thread blocked forever. USB CDC ignores baudrate.
    """
    try:
        return serial.serial_for_url(
            url_or_path, baudrate=baudrate, timeout=timeout, write_timeout=write_timeout
        )
    except (serial.SerialException, OSError, ValueError) as exc:
        raise TransportError(
            f"cannot open {url_or_path!r}: {exc}. Check the device path "
            "(ls /dev/ttyACM* /dev/ttyUSB*) and permissions, or the URL (loop://, socket://HOST:PORT)"
        ) from exc


class FdTransport:
    """read/write/close over a raw file descriptor, e.g. the master end of os.openpty().

    The pty master has no device path pyserial could open, hence this small wrapper with
    the same surface as serial.Serial: read(n) returns at most n bytes, b"" on timeout.
    """

    def __init__(
        self,
        fd: int,
        *,
        timeout: float | None = 0.1,
        write_timeout: float | None = None,
        close_fd: bool = True,
    ) -> None:
        self.fd = fd
        self.timeout = timeout
        self.write_timeout = write_timeout
        self._close_fd = close_fd
        self._closed = False
        # Non-blocking, so a write never blocks past write_timeout on a large buffer (a
        # blocking os.write waits until everything fits) and a read after a spurious
        # select wake-up returns instead of hanging. select provides the waiting.
        os.set_blocking(fd, False)

    def __repr__(self) -> str:
        return f"FdTransport(fd={self.fd})"

    def fileno(self) -> int:
        return self.fd

    @property
    def closed(self) -> bool:
        return self._closed

    def read(self, size: int = 1) -> bytes:
        self._check_open()
        try:
            ready, _, _ = select.select([self.fd], [], [], self.timeout)
            if not ready:
                return b""
            data = os.read(self.fd, size)
        except BlockingIOError:
            return b""
        except OSError as exc:
            # A pty master reads EIO once every slave descriptor is closed.
            raise TransportError(f"read from fd {self.fd} failed: {exc} (peer closed?)") from exc
        if not data:
            raise TransportError(f"end of file on fd {self.fd}: the peer closed the link")
        return data

    def write(self, data: bytes) -> int:
        self._check_open()
        view = memoryview(data).cast("B")
        total = len(view)
        deadline = None if self.write_timeout is None else time.monotonic() + self.write_timeout
        try:
            while view:
                remaining = WRITE_POLL if deadline is None else min(WRITE_POLL, deadline - time.monotonic())
                if remaining <= 0:
                    raise TransportError(
                        f"write to fd {self.fd} timed out after {self.write_timeout} s with "
                        f"{len(view)} bytes unsent: the peer is not reading"
                    )
                _, ready, _ = select.select([], [self.fd], [], remaining)
                # Re-checked every WRITE_POLL: another thread may close (or unplug) us while
                # a full buffer keeps this write waiting.
                self._check_open()
                if not ready:
                    continue
                try:
                    written = os.write(self.fd, view)
                except BlockingIOError:
                    continue  # select said writable but the room went; wait again
                view = view[written:]
        except OSError as exc:
            raise TransportError(f"write to fd {self.fd} failed: {exc}") from exc
        return total

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._close_fd:
            try:
                os.close(self.fd)
            except OSError as exc:
                raise TransportError(f"closing fd {self.fd} failed: {exc}") from exc

    def _check_open(self) -> None:
        if self._closed:
            raise TransportError(f"fd {self.fd} is closed")


def read_some(port: Transport, max_bytes: int = READ_CHUNK) -> bytes:
    """Read whatever has arrived (up to max_bytes), waiting at most the port's timeout.

    serial.Serial.read(n) waits for all n bytes, so ask it for what is waiting (or 1 byte,
    to block until the timeout); a plain fd read already returns what is there.
    """
    try:
        waiting = getattr(port, "in_waiting", None)
        if waiting is None:
            return port.read(max_bytes)
        return port.read(min(max(waiting, 1), max_bytes))
    except TransportError:
        raise
    except (OSError, serial.SerialException) as exc:
        raise TransportError(f"read from {_name(port)} failed: {exc}") from exc


def write_all(port: Transport, data: bytes) -> None:
    """Write every byte or raise TransportError."""
    try:
        written = port.write(data)
    except TransportError:
        raise
    except (OSError, serial.SerialException) as exc:
        raise TransportError(f"write to {_name(port)} failed: {exc}") from exc
    if written is not None and written != len(data):
        raise TransportError(f"short write to {_name(port)}: {written} of {len(data)} bytes")


def _name(port: object) -> str:
    return getattr(port, "port", None) or getattr(port, "name", None) or repr(port)
