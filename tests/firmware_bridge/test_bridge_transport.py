"""Transports: pyserial URLs and paths through open_port, FdTransport on pipes and ptys, bit-flip faults."""

from __future__ import annotations

import os
import socket
import threading

import pytest
import serial

from firmware_bridge.errors import TransportError
from firmware_bridge.faults import BitFlipFaults
from firmware_bridge.transport import FdTransport, open_port, read_some, write_all
from tests.ptys import open_pty


def test_open_port_loop_url_round_trips() -> None:
    port = open_port("loop://", timeout=0.2)
    try:
        write_all(port, b"\x01\x02\x00")
        assert read_some(port) == b"\x01\x02\x00"
        assert read_some(port) == b""  # timeout, not a hang
    finally:
        port.close()


def test_open_port_socket_url(tmp_path) -> None:
    server = socket.create_server(("127.0.0.1", 0))
    host, port_no = server.getsockname()

    def echo_once() -> None:
        conn, _ = server.accept()
        with conn:
            conn.sendall(conn.recv(64)[::-1])

    t = threading.Thread(target=echo_once)
    t.start()
    port = open_port(f"socket://{host}:{port_no}", timeout=2.0)
    try:
        write_all(port, b"abc")
        got = b""
        while len(got) < 3:
            got += read_some(port)
        assert got == b"cba"
    finally:
        port.close()
        t.join(2)
        server.close()


def test_open_port_on_a_pty_path_configures_raw_mode(pty_pair) -> None:
    port = open_port(pty_pair.path, timeout=0.5)
    try:
        pty_pair.scanner.write(b"\x00\x0d\x0a\x03\x11")  # NUL, CR, LF, ^C, XON: all must pass untouched
        got = b""
        while len(got) < 5:
            got += read_some(port)
        assert got == b"\x00\x0d\x0a\x03\x11"
        write_all(port, b"\x0a\xff")
        assert pty_pair.scanner.read(16) == b"\x0a\xff"  # no echo, no CRLF translation
    finally:
        port.close()


def test_open_port_failure_is_a_transport_error_with_cause(tmp_path) -> None:
    with pytest.raises(TransportError, match="cannot open") as info:
        open_port(str(tmp_path / "ttyACM9"))
    assert isinstance(info.value.__cause__, serial.SerialException)
    with pytest.raises(TransportError, match="cannot open"):
        open_port("nosuchscheme://x")


def test_fd_transport_on_a_pipe() -> None:
    r, w = os.pipe()
    reader, writer = FdTransport(r, timeout=0.05), FdTransport(w)
    try:
        assert reader.read(10) == b""  # timeout
        writer.write(b"hello")
        assert reader.read(10) == b"hello"
        writer.close()
        with pytest.raises(TransportError, match="peer closed"):
            reader.read(10)
    finally:
        reader.close()
        writer.close()
    with pytest.raises(TransportError, match="is closed"):
        reader.read(1)


def test_fd_transport_reports_a_dead_pty_peer() -> None:
    with open_pty(raw=True) as pty:
        transport = pty.transport(timeout=0.5)
        pty.close_slave()
        with pytest.raises(TransportError, match="fd .* failed|peer closed") as info:
            transport.read(10)
        assert info.value.__cause__ is None or isinstance(info.value.__cause__, OSError)


def test_fd_transport_write_timeout_when_nobody_reads() -> None:
    r, w = os.pipe()
    writer = FdTransport(w, write_timeout=0.1)
    try:
        with pytest.raises(TransportError, match="timed out .* the peer is not reading"):
            writer.write(b"\x01" * 1_000_000)
    finally:
        writer.close()
        os.close(r)


def test_bit_flips_are_reproducible_and_rate_zero_is_clean() -> None:
    data = bytes(range(256)) * 40
    a, b = BitFlipFaults(1e-3, seed=11), BitFlipFaults(1e-3, seed=11)
    out_a = [a.mutate(data) for _ in range(5)]
    assert out_a == [b.mutate(data) for _ in range(5)]
    assert a.flips > 0 and out_a[0] != data
    flipped = sum(bin(x ^ y).count("1") for x, y in zip(out_a[0], data))
    assert 0 < flipped < 200
    assert BitFlipFaults(0.0, seed=1).mutate(data) == data
    with pytest.raises(ValueError):
        BitFlipFaults(1.5)
