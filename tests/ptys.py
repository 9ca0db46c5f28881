"""The tests' one real pseudo-terminal: the scanner's side drives the master end, a host opens the slave's path.

`open_pty()` (a context manager) and the `pty_pair` fixture in tests/conftest.py both give a `PtyPair` and close
both of its ends afterwards, whichever the test has not closed already."""

from __future__ import annotations

import os
import tty
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cached_property

from firmware_bridge.transport import FdTransport


class PtyPair:
    """``os.openpty()``: ``path`` is the slave's device path (what a host opens as its scanner port); the
    scanner's side reads and writes the master through ``transport()`` or ``scanner``."""

    def __init__(self, *, raw: bool = False) -> None:
        self.master, self.slave = os.openpty()
        if raw:
            # for a slave nobody opens through pyserial (which sets its own modes): no echo, no CR/LF changes
            tty.setraw(self.slave)
        self.path = os.ttyname(self.slave)
        self._open = {self.master, self.slave}
        self._transports: list[FdTransport] = []

    def transport(self, **options) -> FdTransport:
        """An FdTransport on the master end, with FdTransport's own options; the pair, not the transport,
        closes the descriptor (so several transports may take turns on it)."""
        transport = FdTransport(self.master, close_fd=False, **options)
        self._transports.append(transport)
        return transport

    @cached_property
    def scanner(self) -> FdTransport:
        """The master end as the bridge tests drive it: reads wait 50 ms at most, a write gives up after 10 s."""
        return self.transport(timeout=0.05, write_timeout=10.0)

    def close_master(self) -> None:
        """The scanner is unplugged: the master end disappears (the host's next read fails)."""
        self._close(self.master)

    def close_slave(self) -> None:
        """Nobody has the port open any more (the master's next read fails)."""
        self._close(self.slave)

    def close(self) -> None:
        for transport in self._transports:
            transport.close()
        self.close_master()
        self.close_slave()

    def _close(self, fd: int) -> None:
        if fd in self._open:
            self._open.discard(fd)
            os.close(fd)


@contextmanager
def open_pty(*, raw: bool = False) -> Iterator[PtyPair]:
    """A PtyPair (raw: see PtyPair) whose ends are closed when the block ends."""
    pair = PtyPair(raw=raw)
    try:
        yield pair
    finally:
        pair.close()
