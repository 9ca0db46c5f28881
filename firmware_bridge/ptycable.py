"""A pseudo-terminal that can be unplugged and replugged, behind a stable symlink (like udev's /dev/scanner).

The scanner end (the pty master) is an FdTransport; the host opens `path` like a device.
unplug() hangs the pty up exactly as a pulled USB cable does (the host's reads fail with
EIO) and removes the symlink, as udev removes it; replug() makes a fresh pty and points the
symlink at its slave atomically, so the host finds the "same" device at the same path.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import tty
from pathlib import Path

from firmware_bridge.errors import TransportError
from firmware_bridge.transport import FdTransport

__all__ = ["CableEnd", "PtyCable"]


class CableEnd(FdTransport):
    """The scanner's end of one plug-in of a PtyCable (one pty master)."""

    def __init__(self, fd: int, generation: int, **kwargs: object) -> None:
        super().__init__(fd, **kwargs)
        self.generation = generation
        self.unplugged = False

    def __repr__(self) -> str:
        state = "unplugged" if self.unplugged else "plugged"
        return f"CableEnd(fd={self.fd}, generation={self.generation}, {state})"

    def read(self, size: int = 1) -> bytes:
        try:
            return super().read(size)
        except TransportError as exc:
            if self.unplugged:
                raise TransportError(f"cable unplugged (plug-in #{self.generation})") from exc
            raise

    def write(self, data: bytes) -> int:
        try:
            return super().write(data)
        except TransportError as exc:
            if self.unplugged:
                raise TransportError(f"cable unplugged (plug-in #{self.generation})") from exc
            raise

    def _check_open(self) -> None:
        if self.unplugged:
            raise TransportError(f"cable unplugged (plug-in #{self.generation})")
        super()._check_open()


class PtyCable:
    """Owns a pty pair and a symlink to its slave; unplug() and replug() simulate a USB cable.

    path is the stable name the host opens. scanner is the current CableEnd (raises
    TransportError while unplugged). The cable keeps its own slave descriptor open in raw
    mode, so the line discipline never echoes the scanner's bytes back while no host has
    the device open, and the scanner's end stays usable across host reopens.
    """

    def __init__(
        self,
        link_path: str | os.PathLike[str] | None = None,
        *,
        timeout: float | None = 0.05,
        write_timeout: float | None = 10.0,
    ) -> None:
        self._own_dir = None
        if link_path is None:
            self._own_dir = tempfile.mkdtemp(prefix="ptycable-")
            link_path = Path(self._own_dir) / "scanner"
        self.path = str(link_path)
        self.timeout = timeout
        self.write_timeout = write_timeout
        self.generation = 0
        self._lock = threading.Lock()
        self._plugged = threading.Condition(self._lock)
        self._end: CableEnd | None = None
        self._slave: int | None = None
        self._device: str | None = None
        self._retired: list[CableEnd] = []
        self._closed = False
        self.replug()

    def __repr__(self) -> str:
        return f"PtyCable({self.path!r} -> {self._device or 'unplugged'})"

    def __enter__(self) -> PtyCable:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- state --------------------------------------------------------------------------

    @property
    def plugged(self) -> bool:
        return self._end is not None

    @property
    def device(self) -> str | None:
        """The current slave device (/dev/pts/N) the symlink points at, or None while unplugged."""
        return self._device

    @property
    def scanner(self) -> CableEnd:
        """The scanner's end of the current plug-in."""
        end = self._end
        if end is None:
            raise TransportError(f"{self.path} is unplugged")
        return end

    def wait_plugged(self, timeout: float | None = None, *, newer_than: int = 0) -> CableEnd | None:
        """Block until the cable is plugged in with a generation above newer_than; None on timeout."""
        with self._plugged:
            ok = self._plugged.wait_for(
                lambda: self._closed or (self._end is not None and self.generation > newer_than), timeout
            )
            return self._end if ok and not self._closed else None

    # --- plugging -----------------------------------------------------------------------

    def unplug(self) -> None:
        """Pull the cable: hang the pty up, close both ends, remove the symlink. Idempotent."""
        with self._lock:
            self._unplug_locked()

    def replug(self) -> CableEnd:
        """Plug in a fresh pty and point the symlink at it; unplugs the old one first."""
        with self._plugged:
            if self._closed:
                raise TransportError(f"{self.path}: the cable was closed")
            self._unplug_locked()
            master, slave = os.openpty()
            try:
                tty.setraw(slave)
                device = os.ttyname(slave)
                # Symlink under a temporary name, then rename over the stable one: the
                # host sees either no path or a complete one, never a half-made link.
                tmp = f"{self.path}.{os.getpid()}.{self.generation + 1}.tmp"
                os.symlink(device, tmp)
                os.replace(tmp, self.path)
            except OSError as exc:
                os.close(master)
                os.close(slave)
                raise TransportError(f"cannot plug {self.path} in: {exc}") from exc
            self.generation += 1
            self._slave = slave
            self._device = device
            self._end = CableEnd(
                master, self.generation, timeout=self.timeout, write_timeout=self.write_timeout
            )
            self._plugged.notify_all()
            return self._end

    def close(self) -> None:
        """Unplug for good, close every end handed out, remove the symlink (and its temp dir)."""
        with self._plugged:
            self._unplug_locked()
            self._closed = True
            retired, self._retired = self._retired, []
            self._plugged.notify_all()
        for end in retired:
            end.close()
        if self._own_dir is not None:
            shutil.rmtree(self._own_dir, ignore_errors=True)

    def _unplug_locked(self) -> None:
        end, self._end = self._end, None
        if end is None:
            return
        end.unplugged = True
        if end.closed:
            # Its owner closed it already: the master is gone and the number may belong to
            # someone else by now, so it must not be touched.
            self._release_slave()
            return
        # The scanner's reader thread may be inside select() on the master right now, so
        # closing that descriptor would let its number be reused by the next openpty() and
        # the old reader would steal the new pty's bytes. Instead dup2 a dead pipe over it:
        # the master is released (the pty hangs up, the host reads EIO) while the number
        # stays taken until the end is closed, and later reads see end of file, writes EBADF.
        dead_r, dead_w = os.pipe()
        os.close(dead_w)
        try:
            os.dup2(dead_r, end.fd)
        finally:
            os.close(dead_r)
        self._retired.append(end)
        self._release_slave()

    def _release_slave(self) -> None:
        if self._slave is not None:
            os.close(self._slave)
            self._slave = None
        self._device = None
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
