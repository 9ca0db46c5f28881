"""Frame codec: COBS vectors, header layout, CRC, and every FrameError, plus FrameReader resync."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest

from firmware_bridge.errors import (
    CobsError, CrcError, FrameError, FrameLengthError, FrameTooLargeError, TruncatedFrameError, UnknownVersionError,
)
from firmware_bridge.frames import (
    HEADER_SIZE, MAX_PAYLOAD, UNKNOWN_SEQ, Frame, FrameReader, cobs_decode, cobs_encode, cobs_max_encoded_len,
    decode_frame, encode_frame,
)

# Reference vectors from the COBS paper / Wikipedia, so a C implementation can reuse them.
RUN_254 = bytes(range(1, 255))
COBS_VECTORS = [
    (b"\x00", b"\x01\x01"),
    (b"\x00\x00", b"\x01\x01\x01"),
    (b"\x00\x11\x00", b"\x01\x02\x11\x01"),
    (b"\x11\x22\x00\x33", b"\x03\x11\x22\x02\x33"),
    (b"\x11\x22\x33\x44", b"\x05\x11\x22\x33\x44"),
    (b"\x11\x00\x00\x00", b"\x02\x11\x01\x01\x01"),
    (RUN_254, b"\xff" + RUN_254),
    (b"\x00" + RUN_254, b"\x01\xff" + RUN_254),
    (RUN_254 + b"\xff", b"\xff" + RUN_254 + b"\x02\xff"),
    (RUN_254 + b"\x00", b"\xff" + RUN_254 + b"\x01\x01"),
    (b"", b"\x01"),
]


def _raw(wire: bytes) -> bytes:
    """Header + payload + CRC of an encoded frame (COBS undone, delimiter dropped)."""
    assert wire.endswith(b"\x00")
    return cobs_decode(wire[:-1])


def _wire(raw: bytes) -> bytes:
    return cobs_encode(raw) + b"\x00"


def _with_crc(body: bytes) -> bytes:
    return body + struct.pack("<I", zlib.crc32(body))


@pytest.mark.parametrize(("data", "encoded"), COBS_VECTORS)
def test_cobs_reference_vectors(data: bytes, encoded: bytes) -> None:
    assert cobs_encode(data) == encoded
    assert cobs_decode(encoded) == data


def test_cobs_round_trips_random_data_and_never_emits_zero() -> None:
    rng = np.random.default_rng(1)
    for n in [0, 1, 253, 254, 255, 507, 508, 509, 3000]:
        for zero_share in (0.0, 0.01, 0.5):
            data = rng.integers(1, 256, n, dtype=np.uint8)
            data[rng.random(n) < zero_share] = 0
            raw = data.tobytes()
            enc = cobs_encode(raw)
            assert 0 not in enc
            assert len(enc) <= cobs_max_encoded_len(n)
            assert cobs_decode(enc) == raw


@pytest.mark.parametrize(
    ("bad", "fragment"),
    [
        (b"", "empty"),
        (b"\x03\x11", "announces 2 bytes but only 1 remain"),
        (b"\x03\x11\x00", "0x00 inside"),
        (b"\x00\x01", "0x00 inside"),
    ],
)
def test_cobs_decode_rejects_malformed_input(bad: bytes, fragment: str) -> None:
    with pytest.raises(CobsError, match=fragment):
        cobs_decode(bad)


def test_frame_round_trip_and_header_layout() -> None:
    wire = encode_frame(0x03, 0x01020304, b"hello\x00world", flags=0x40)
    assert wire.endswith(b"\x00") and 0 not in wire[:-1]
    raw = _raw(wire)
    assert raw[:HEADER_SIZE] == bytes([0xB1, 0x03, 0x40, 0x00, 4, 3, 2, 1, 11, 0, 0, 0])
    assert raw[HEADER_SIZE:-4] == b"hello\x00world"
    assert raw[-4:] == struct.pack("<I", zlib.crc32(raw[:-4]))
    frame = decode_frame(wire)
    assert frame == Frame(msg_type=3, seq=0x01020304, payload=b"hello\x00world", flags=0x40)
    assert decode_frame(wire[:-1]) == frame  # delimiter optional


def test_empty_and_maximum_payloads_round_trip() -> None:
    assert decode_frame(encode_frame(1, 0, b"")).payload == b""
    big = np.random.default_rng(2).integers(0, 256, MAX_PAYLOAD, dtype=np.uint8).tobytes()
    assert decode_frame(encode_frame(3, 7, big)).payload == big


@pytest.mark.parametrize("bit", [0, 7, 8 * HEADER_SIZE + 3, 8 * (HEADER_SIZE + 40) + 5])
def test_one_flipped_bit_is_a_crc_error(bit: int) -> None:
    raw = bytearray(_raw(encode_frame(3, 9, bytes(range(1, 200)))))
    raw[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(CrcError, match="CRC mismatch"):
        decode_frame(_wire(bytes(raw)))


def test_every_single_bit_flip_on_the_wire_is_detected() -> None:
    """Whatever a flip hits (data, COBS code byte, delimiter), nothing damaged decodes as valid."""
    payload = bytes(range(256)) * 2
    wire = encode_frame(3, 5, payload)
    for bit in range(len(wire) * 8):
        damaged = bytearray(wire)
        damaged[bit // 8] ^= 1 << (bit % 8)
        items = FrameReader().feed(bytes(damaged) + b"\x00")
        assert items, f"bit {bit}: nothing came out"
        assert all(isinstance(i, FrameError) for i in items), f"bit {bit}: {items}"


def test_truncated_frames() -> None:
    with pytest.raises(TruncatedFrameError, match="smallest is 16"):
        decode_frame(_wire(b"\xb1\x03\x00"))
    # Valid CRC but the header claims more payload than is there: a sender bug, not noise.
    body = struct.pack("<BBBxII", 0xB1, 3, 0, 1, 50) + b"x" * 10
    with pytest.raises(TruncatedFrameError, match="declares 50 payload bytes but carries 10"):
        decode_frame(_wire(_with_crc(body)))
    body = struct.pack("<BBBxII", 0xB1, 3, 0, 1, 5) + b"x" * 10
    with pytest.raises(FrameLengthError, match="declares 5 payload bytes but carries 10"):
        decode_frame(_wire(_with_crc(body)))


def test_a_cut_off_wire_frame_is_rejected() -> None:
    wire = encode_frame(3, 5, b"abcdefgh" * 20)
    with pytest.raises(FrameError):
        decode_frame(wire[: len(wire) // 2])


def test_unknown_version_and_foreign_magic() -> None:
    body = struct.pack("<BBBxII", 0xB2, 1, 0, 0, 0)
    with pytest.raises(UnknownVersionError, match="protocol version 2; this side speaks version 1"):
        decode_frame(_wire(_with_crc(body)))
    body = struct.pack("<BBBxII", 0x41, 1, 0, 0, 0)
    with pytest.raises(UnknownVersionError, match="0x41 is not a scanner-link frame"):
        decode_frame(_wire(_with_crc(body)))


def test_oversized_frames() -> None:
    with pytest.raises(FrameTooLargeError, match="payload is 1048577 bytes"):
        encode_frame(3, 0, b"\x01" * (MAX_PAYLOAD + 1))
    wire = encode_frame(3, 0, b"\x01" * 2000)
    with pytest.raises(FrameTooLargeError, match="chunk is"):
        decode_frame(wire, max_payload=1000)
    body = struct.pack("<BBBxII", 0xB1, 3, 0, 1, 5000) + b"x" * 10
    with pytest.raises(FrameTooLargeError, match="declares 5000 payload bytes, the limit is 1000"):
        decode_frame(_wire(_with_crc(body)), max_payload=1000)


def test_encode_frame_rejects_reserved_seq() -> None:
    with pytest.raises(ValueError, match="seq"):
        encode_frame(1, UNKNOWN_SEQ, b"")


def test_reader_handles_byte_by_byte_arrival() -> None:
    frames = [encode_frame(3, i, bytes([i]) * (i * 37)) for i in range(1, 8)]
    reader = FrameReader()
    out = []
    for byte in b"".join(frames):
        out.extend(reader.feed(bytes([byte])))
    assert [f.seq for f in out] == list(range(1, 8))
    assert all(isinstance(f, Frame) for f in out)


def test_reader_resynchronises_after_garbage() -> None:
    a, b, c = (encode_frame(3, i, b"tile-%d" % i) for i in (1, 2, 3))
    garbage_with_zeros = b"\x13\x37\x00\xde\xad\xbe\xef\x00\x00\xff"
    reader = FrameReader()
    out = reader.feed(a + garbage_with_zeros + b + b"\x00\x00\x00" + c)
    frames = [i for i in out if isinstance(i, Frame)]
    errors = [i for i in out if isinstance(i, FrameError)]
    # The garbage's tail runs into frame b (no 0x00 between them), so b is lost with it;
    # everything after the next delimiter is clean again.
    assert [f.seq for f in frames] == [1, 3]
    assert len(errors) == 3
    assert reader.bytes_dropped > 0


def test_leading_delimiter_protects_a_frame_from_preceding_garbage() -> None:
    frame = encode_frame(1, 42, b"hello")
    out = FrameReader().feed(b"\x55\x66\x77" + b"\x00" + frame)
    assert isinstance(out[0], FrameError)
    assert isinstance(out[1], Frame) and out[1].seq == 42


def test_reader_drops_an_oversized_run_and_reports_it_once() -> None:
    reader = FrameReader(max_payload=1000)
    out = []
    for _ in range(10):
        out += reader.feed(b"\x55" * 500)  # 5000 bytes, no delimiter
    out += reader.feed(b"\x00" + encode_frame(3, 9, b"ok"))
    assert [type(i) for i in out] == [FrameTooLargeError, Frame]
    assert out[1].payload == b"ok"
    assert reader.bytes_dropped == 5000  # the whole run, dropped rather than kept
    assert reader.feed(b"\x00") == []  # and nothing is held over after the frame


def test_reader_never_raises_on_random_bytes() -> None:
    rng = np.random.default_rng(3)
    reader = FrameReader(max_payload=4096)
    for _ in range(300):
        chunk = rng.integers(0, 256, int(rng.integers(0, 2000)), dtype=np.uint8)
        chunk[rng.random(chunk.size) < 0.3] = 0
        for item in reader.feed(chunk.tobytes()):
            assert isinstance(item, (Frame, FrameError))
    assert reader.feed(b"\x00" + encode_frame(3, 1, b"after the storm"))[-1].payload == b"after the storm"
