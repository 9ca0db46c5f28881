"""HostLink against a hand-driven scanner on a real pty: every answer the protocol promises."""

from __future__ import annotations

import struct
import threading
import zlib

import numpy as np
import pytest

from firmware_bridge.errors import LinkLostError, TransportError
from firmware_bridge.frames import UNKNOWN_SEQ, cobs_encode, encode_frame
from firmware_bridge.host import HostLink
from firmware_bridge.messages import (
    Ack, CaseBegin, CaseEnd, Capability, ErrorCode, ErrorMessage, Hello, MsgType, Nack, NackReason, Role, Tile,
    TileEncoding,
)
from firmware_bridge.pixels import encode_pixels
from firmware_bridge.transport import open_port

CASE = CaseBegin("C1", "S1", "brightfield-HE", 0.5, 50, 50, expected_tiles=4, image_width=100, image_height=100)
PIX = np.random.default_rng(0).integers(0, 256, (50, 50, 3), dtype=np.uint8)


def _tile(index: int, payload: bytes | None = None, *, x: int = 0, case_id: str = "C1") -> Tile:
    raw = encode_pixels(PIX, TileEncoding.RAW) if payload is None else payload
    return Tile(case_id, index, x, 0, 50, 50, TileEncoding.RAW, raw)


def _open_case(scanner) -> None:
    seq = scanner.send(CASE)
    assert scanner.expect() == Ack(seq, "C1", -1)


def test_hello_is_answered_with_the_host_hello(host, scanner, sink) -> None:
    scanner.send(Hello(1, Role.SCANNER, 4, 1 << 20, Capability.ZLIB))
    reply = scanner.expect()
    assert isinstance(reply, Hello) and reply.role == Role.HOST and reply.version == 1
    assert reply.capabilities == (
        Capability.ZLIB | Capability.PNG | Capability.JPEG | Capability.HEARTBEAT | Capability.RESUME
        | Capability.ACCESSION
    )
    assert host.peer is not None and host.peer.window == 4
    assert "up" in sink.kinds()


def test_tile_is_acked_after_the_sink_stored_it(host, scanner, sink) -> None:
    _open_case(scanner)
    seq = scanner.send(_tile(0))
    assert scanner.expect() == Ack(seq, "C1", 0)
    stored = sink.tiles[0]
    np.testing.assert_array_equal(stored.pixels, PIX)
    assert stored.sha256 and len(stored.sha256) == 64
    assert host.counters.tiles_stored == 1 and host.counters.acks_sent == 2


def test_duplicate_tile_is_acked_again_without_a_second_store(host, scanner, sink) -> None:
    _open_case(scanner)
    first = scanner.send(_tile(1))
    again = scanner.send(_tile(1))  # a retransmission after a lost ACK
    assert scanner.expect() == Ack(first, "C1", 1)
    assert scanner.expect() == Ack(again, "C1", 1)
    assert sink.stores[1] == 1
    assert host.counters.duplicates == 1
    assert "duplicate" in sink.kinds()


def test_tile_before_case_begin_is_unknown_case(host, scanner) -> None:
    seq = scanner.send(_tile(0))
    nack = scanner.expect()
    assert isinstance(nack, Nack) and nack.seq == seq and nack.reason == NackReason.UNKNOWN_CASE


def test_bad_tile_payload_is_nacked_and_reported(host, scanner, sink) -> None:
    _open_case(scanner)
    seq = scanner.send(_tile(2, b"\x00" * 7499))
    nack = scanner.expect()
    assert nack == Nack(seq, NackReason.BAD_TILE, "tile 2: raw payload is 7499 bytes, expected 7500 for 50x50x3")
    seq = scanner.send(_tile(3, x=80))  # 80 + 50 > image width 100
    assert scanner.expect().reason == NackReason.BAD_TILE
    assert host.counters.bad_tiles == 2
    assert ("bad-tile", "case C1: tile 2: raw payload is 7499 bytes, expected 7500 for 50x50x3") in sink.events
    assert sink.stores == {}
    seq = scanner.send(_tile(2))  # the link carries on
    assert scanner.expect() == Ack(seq, "C1", 2)


def test_failing_sink_gets_storage_nack_then_the_retry_is_stored(pty_pair, scanner, make_sink) -> None:
    sink = make_sink(fail_first_attempt=frozenset({0}))
    with HostLink(open_port(pty_pair.path, timeout=0.05), sink) as host:
        _open_case(scanner)
        seq = scanner.send(_tile(0))
        nack = scanner.expect()
        assert nack.seq == seq and nack.reason == NackReason.STORAGE
        assert "No space left on device" in nack.detail
        seq = scanner.send(_tile(0))
        assert scanner.expect() == Ack(seq, "C1", 0)
        assert sink.attempts[0] == 2 and sink.stores[0] == 1
        assert host.counters.storage_errors == 1
        assert "storage-error" in sink.kinds()


def test_garbage_is_nacked_with_unknown_seq_and_the_link_recovers(host, scanner, sink) -> None:
    _open_case(scanner)
    wire = bytearray(encode_frame(MsgType.TILE, 5, _tile(0).encode()))
    wire[100] ^= 0x10  # one flipped bit in the pixels
    scanner.send_raw(bytes(wire))
    nack = scanner.expect()
    assert nack.seq == UNKNOWN_SEQ and nack.reason == NackReason.CRC
    scanner.send_raw(b"\x17\x99\x42\x00")  # line noise that happens to contain a delimiter
    assert scanner.expect().seq == UNKNOWN_SEQ
    seq = scanner.send(_tile(0))
    assert scanner.expect() == Ack(seq, "C1", 0)
    assert host.counters.crc_errors == 1 and host.counters.framing_errors == 1
    assert host.counters.nacks_sent == 2
    assert sink.stores[0] == 1


def test_frame_from_a_future_version_gets_an_error(host, scanner, sink) -> None:
    body = struct.pack("<BBBxII", 0xB2, 1, 0, 0, 0)
    scanner.send_raw(cobs_encode(body + struct.pack("<I", zlib.crc32(body))) + b"\x00")
    err = scanner.expect()
    assert isinstance(err, ErrorMessage) and err.code == ErrorCode.UNSUPPORTED_VERSION
    assert "version-mismatch" in sink.kinds()


def test_malformed_payload_is_nacked_with_its_seq(host, scanner) -> None:
    scanner.send_raw(encode_frame(MsgType.CASE_END, 321, b"\x01\x00"))
    nack = scanner.expect()
    assert nack.seq == 321 and nack.reason == NackReason.MALFORMED
    assert "CASE_END" in nack.detail


def test_case_end_is_idempotent_and_reports_missing_tiles(host, scanner, sink) -> None:
    _open_case(scanner)
    scanner.send(_tile(0))
    scanner.expect()
    first = scanner.send(CaseEnd("C1", 4))
    assert scanner.expect() == Ack(first, "C1", -1)
    assert host.wait_case_end(2) == "C1"
    again = scanner.send(CaseEnd("C1", 4))
    assert scanner.expect() == Ack(again, "C1", -1)
    assert sink.ended == [("C1", 4)]
    assert ("case-incomplete", "case C1: scanner reports 4 tiles, 1 stored") in sink.events
    assert host.wait_case_end(0.05) is None


def test_clean_stop_reports_no_error(pty_pair, sink) -> None:
    lost: list[BaseException | None] = []
    link = HostLink(open_port(pty_pair.path, timeout=0.05), sink, on_connection_lost=lost.append).start()
    link.stop()
    assert lost == [None] and not link.running
    assert link.wait_case_end(0.1) is None
    assert ("down", "stopped") in sink.events


def test_losing_the_port_reaches_connection_lost(pty_pair, scanner, sink) -> None:
    lost: list[BaseException | None] = []
    got_it = threading.Event()

    def on_lost(exc: BaseException | None) -> None:
        lost.append(exc)
        got_it.set()

    link = HostLink(open_port(pty_pair.path, timeout=0.05), sink, on_connection_lost=on_lost).start()
    try:
        scanner.send(Hello(1, Role.SCANNER, 4, 1 << 20))
        assert isinstance(scanner.expect(), Hello)  # the link is up and reading
        pty_pair.close_master()  # the scanner is unplugged: the master end disappears
        assert got_it.wait(5), "connection_lost was never called"
        assert isinstance(lost[0], TransportError)
        assert link.error is lost[0]
        with pytest.raises(LinkLostError, match="link lost before the case ended"):
            link.wait_case_end(1)
        assert any(kind == "down" and detail != "stopped" for kind, detail in sink.events)
    finally:
        link.stop()


def test_host_link_opens_a_device_path_itself(pty_pair, scanner, sink) -> None:
    with HostLink(pty_pair.path, sink, read_timeout=0.05) as host:
        scanner.send(Hello(1, Role.SCANNER, 4, 1 << 20))
        assert isinstance(scanner.expect(), Hello)
        assert host.port is not None and host.port_name == pty_pair.path


def test_host_link_on_a_missing_device_fails_at_start(tmp_path, sink) -> None:
    link = HostLink(str(tmp_path / "ttyACM7"), sink)
    with pytest.raises(TransportError, match="cannot open"):
        link.start()


def test_hello_with_impossible_fields_is_malformed_not_fatal(host, scanner) -> None:
    scanner.send_raw(encode_frame(MsgType.HELLO, 9, b"\x01" + bytes(11)))  # role 0
    nack = scanner.expect()
    assert nack.seq == 9 and nack.reason == NackReason.MALFORMED and "Role" in nack.detail
    scanner.send(Hello(1, Role.SCANNER, 4, 1 << 20))
    assert isinstance(scanner.expect(), Hello) and host.running


def test_host_error_text_fits_the_scanner_max_payload(host, scanner) -> None:
    scanner.send(Hello(1, Role.SCANNER, 4, 64))  # a small microcontroller
    scanner.expect()
    scanner.send(Hello(1, Role.HOST, 4, 64))  # wrong role: answered with a long ERROR text
    err = scanner.expect()
    assert isinstance(err, ErrorMessage) and err.code == ErrorCode.PROTOCOL
    assert len(err.encode()) <= 64
