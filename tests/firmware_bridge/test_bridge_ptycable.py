"""PtyCable: a real pty behind a stable symlink that unplugs like a USB cable."""

from __future__ import annotations

import os
import threading

import pytest

from firmware_bridge.errors import TransportError
from firmware_bridge.ptycable import PtyCable
from firmware_bridge.transport import open_port, read_some, write_all


@pytest.fixture
def cable(tmp_path):
    with PtyCable(tmp_path / "scanner") as c:
        yield c


def _read_exactly(port, n: int) -> bytes:
    got = b""
    for _ in range(100):
        got += read_some(port)
        if len(got) >= n:
            break
    return got


def test_path_is_a_symlink_to_the_slave_and_carries_bytes(cable) -> None:
    assert os.path.islink(cable.path)
    assert os.readlink(cable.path) == cable.device and cable.device.startswith("/dev/pts/")
    port = open_port(cable.path, timeout=0.2)
    try:
        cable.scanner.write(b"\x00\x01\x02\xff")
        assert _read_exactly(port, 4) == b"\x00\x01\x02\xff"
        write_all(port, b"ack\x00")
        assert cable.scanner.read(16) == b"ack\x00"
    finally:
        port.close()


def test_unplug_hangs_up_the_host_and_removes_the_link(cable) -> None:
    port = open_port(cable.path, timeout=0.5)
    end = cable.scanner
    try:
        cable.unplug()
        assert not cable.plugged and cable.device is None
        assert not os.path.lexists(cable.path)  # udev removes the node's symlink too
        with pytest.raises(TransportError):
            for _ in range(20):
                read_some(port)  # EIO or "readiness without data", never a hang
        with pytest.raises(TransportError, match="cable unplugged"):
            end.write(b"x")
        with pytest.raises(TransportError, match="cable unplugged"):
            end.read(1)
        with pytest.raises(TransportError, match="unplugged"):
            cable.scanner
        with pytest.raises(TransportError, match="cannot open"):
            open_port(cable.path)
        cable.unplug()  # idempotent
    finally:
        port.close()


def test_replug_points_the_same_path_at_a_fresh_pty(cable) -> None:
    first_device, first_end = cable.device, cable.scanner
    port = open_port(cable.path, timeout=0.2)
    port.close()
    cable.unplug()
    end = cable.replug()
    assert cable.plugged and cable.generation == 2 and end is cable.scanner and end is not first_end
    assert os.readlink(cable.path) == cable.device
    port = open_port(cable.path, timeout=0.2)
    try:
        end.write(b"again")
        assert _read_exactly(port, 5) == b"again"
    finally:
        port.close()
    assert first_device is not None


def test_replug_while_plugged_unplugs_first(cable) -> None:
    old = cable.scanner
    cable.replug()
    assert old.unplugged and cable.generation == 2


def test_wait_plugged_wakes_on_replug(cable) -> None:
    cable.unplug()
    assert cable.wait_plugged(0.05, newer_than=1) is None
    timer = threading.Timer(0.1, cable.replug)
    timer.start()
    try:
        end = cable.wait_plugged(5, newer_than=1)
        assert end is not None and end.generation == 2
    finally:
        timer.join()


def test_close_removes_the_link_and_its_temp_dir() -> None:
    cable = PtyCable()
    path = cable.path
    assert os.path.islink(path)
    cable.close()
    assert not os.path.lexists(path) and not os.path.exists(os.path.dirname(path))
    with pytest.raises(TransportError, match="closed"):
        cable.replug()
