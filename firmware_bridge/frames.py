"""Frame codec for protocol v1: header + payload + CRC-32, COBS-encoded, 0x00-delimited. Pure, no I/O."""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, field

from firmware_bridge.errors import (
    CobsError,
    CrcError,
    FrameError,
    FrameLengthError,
    FrameTooLargeError,
    TruncatedFrameError,
    UnknownVersionError,
)
from firmware_bridge.layout import Wire, fixed_layout

PROTOCOL_VERSION = 1
MAGIC = 0xB0  # high nibble of byte 0; the low nibble is the version
VERSION_BYTE = MAGIC | PROTOCOL_VERSION  # 0xB1

# The reserved byte keeps seq and length 4-byte aligned for a microcontroller that casts
# the header. PROTOCOL.md section 3 documents the same fields; the tests compare the two.
HEADER_WIRE: Wire = (
    ("version", "u8"),
    ("msg_type", "u8"),
    ("flags", "u8"),
    ("reserved", "u8"),
    ("seq", "u32"),
    ("payload_len", "u32"),
)
HEADER = fixed_layout(HEADER_WIRE)  # "<BBBxII"
HEADER_SIZE = HEADER.size  # 12
CRC = struct.Struct("<I")
CRC_SIZE = CRC.size  # 4

MAX_PAYLOAD = 1 << 20  # 1 MiB: one 512x512x3 raw field fits with room to spare
MAX_FRAME = HEADER_SIZE + MAX_PAYLOAD + CRC_SIZE
UNKNOWN_SEQ = 0xFFFFFFFF  # reserved: "the frame was too damaged to read its seq"
DELIMITER = b"\x00"


def cobs_max_encoded_len(raw_len: int) -> int:
    """Worst-case COBS output length (without the delimiter) for raw_len input bytes."""
    return raw_len + raw_len // 254 + 1


def cobs_encode(data: bytes) -> bytes:
    """COBS-encode data so the result contains no 0x00 (the delimiter is not appended)."""
    out = bytearray()
    chunks = bytes(data).split(b"\x00")
    last = len(chunks) - 1
    for i, chunk in enumerate(chunks):
        n = len(chunk)
        pos = 0
        # A full 254-byte block (code 0xFF) carries no implied zero. Inside the data a
        # zero still has to follow, so such a chunk needs an extra 0x01 block; at the very
        # end it must not get one, or the encoding stops being the canonical one. Offsets
        # rather than re-slicing the rest keep long zero-free runs (raw pixels) linear.
        while n - pos > 254 or (i != last and n - pos == 254):
            out.append(0xFF)
            out += chunk[pos : pos + 254]
            pos += 254
        out.append(n - pos + 1)
        out += chunk[pos:] if pos else chunk
    return bytes(out)


def cobs_decode(data: bytes) -> bytes:
    """Invert cobs_encode; raises CobsError on any malformed input."""
    data = bytes(data)
    if not data:
        raise CobsError("empty COBS chunk (the smallest encoding is 1 byte)")
    zero = data.find(0)
    if zero >= 0:
        # One scan up front instead of one per block: a FrameReader chunk never has one.
        raise CobsError(f"0x00 inside a COBS chunk at offset {zero}")
    out = bytearray()
    view = memoryview(data)
    i, n = 0, len(data)
    while i < n:
        code = data[i]
        end = i + code
        if end > n:
            raise CobsError(
                f"COBS block at offset {i} announces {code - 1} bytes but only {n - i - 1} remain"
            )
        out += view[i + 1 : end]
        i = end
        if code != 0xFF and i < n:
            out.append(0)
    return bytes(out)


@dataclass(frozen=True, slots=True)
class Frame:
    """One decoded frame. msg_type is left as an int: this layer does not know messages."""

    msg_type: int
    seq: int
    payload: bytes = field(repr=False)
    flags: int = 0
    version: int = PROTOCOL_VERSION


def encode_frame(
    msg_type: int, seq: int, payload: bytes, *, flags: int = 0, max_payload: int = MAX_PAYLOAD
) -> bytes:
    """Build the wire bytes of one frame, trailing 0x00 delimiter included."""
    if len(payload) > max_payload:
        raise FrameTooLargeError(f"payload is {len(payload)} bytes, the limit is {max_payload}")
    if not 0 <= msg_type <= 0xFF or not 0 <= flags <= 0xFF:
        raise ValueError(f"msg_type {msg_type} and flags {flags} must fit in one byte")
    if not 0 <= seq < UNKNOWN_SEQ:
        raise ValueError(f"seq {seq} out of range 0..0x{UNKNOWN_SEQ - 1:08X}")
    header = HEADER.pack(VERSION_BYTE, msg_type, flags, seq, len(payload))
    crc = zlib.crc32(payload, zlib.crc32(header))
    return cobs_encode(header + payload + CRC.pack(crc)) + DELIMITER


def decode_frame(data: bytes, *, max_payload: int = MAX_PAYLOAD) -> Frame:
    """Decode one COBS chunk (a trailing 0x00 is allowed) into a Frame, or raise a FrameError."""
    data = bytes(data)
    if data.endswith(DELIMITER):
        data = data[:-1]
    limit = cobs_max_encoded_len(HEADER_SIZE + max_payload + CRC_SIZE)
    if len(data) > limit:
        raise FrameTooLargeError(f"chunk is {len(data)} bytes, the largest valid frame is {limit}")
    raw = cobs_decode(data)
    if len(raw) < HEADER_SIZE + CRC_SIZE:
        raise TruncatedFrameError(
            f"frame is {len(raw)} bytes after COBS decoding; the smallest is "
            f"{HEADER_SIZE + CRC_SIZE} (header + CRC)"
        )
    # CRC before anything in the header: until it matches, no header field can be trusted,
    # and a version byte damaged in transit should count as damage, not as a new version.
    (carried,) = CRC.unpack_from(raw, len(raw) - CRC_SIZE)
    computed = zlib.crc32(memoryview(raw)[:-CRC_SIZE])
    if carried != computed:
        raise CrcError(
            f"CRC mismatch over {len(raw) - CRC_SIZE} bytes: frame carries 0x{carried:08X}, "
            f"computed 0x{computed:08X}"
        )
    version_byte, msg_type, flags, seq, length = HEADER.unpack_from(raw)
    if version_byte & 0xF0 != MAGIC:
        raise UnknownVersionError(
            f"first byte 0x{version_byte:02X} is not a scanner-link frame (expected 0x{VERSION_BYTE:02X})"
        )
    if version_byte != VERSION_BYTE:
        raise UnknownVersionError(
            f"frame is protocol version {version_byte & 0x0F}; this side speaks version {PROTOCOL_VERSION}"
        )
    if length > max_payload:
        raise FrameTooLargeError(f"frame declares {length} payload bytes, the limit is {max_payload}")
    present = len(raw) - HEADER_SIZE - CRC_SIZE
    if present < length:
        raise TruncatedFrameError(f"frame declares {length} payload bytes but carries {present}")
    if present > length:
        raise FrameLengthError(f"frame declares {length} payload bytes but carries {present}")
    return Frame(
        msg_type=msg_type,
        seq=seq,
        payload=raw[HEADER_SIZE : HEADER_SIZE + length],
        flags=flags,
        version=PROTOCOL_VERSION,
    )


class FrameReader:
    """Stateful splitter: feed it bytes as they arrive, get back frames and frame errors.

    It never raises on bad input: damaged chunks come back as FrameError values so the
    session can count and NACK them, and the next 0x00 always resynchronises.
    """

    def __init__(self, *, max_payload: int = MAX_PAYLOAD) -> None:
        self.max_payload = max_payload
        self._limit = cobs_max_encoded_len(HEADER_SIZE + max_payload + CRC_SIZE)
        self._buf = bytearray()
        self._discarding = False
        self.bytes_dropped = 0

    def feed(self, data: bytes) -> list[Frame | FrameError]:
        """Consume data; return every complete frame (or its error) in arrival order."""
        out: list[Frame | FrameError] = []
        data = bytes(data)
        start = 0
        while True:
            end = data.find(0, start)
            if end < 0:
                self._accumulate(data[start:], out)
                return out
            self._accumulate(data[start:end], out)
            self._finish_chunk(out)
            start = end + 1

    def _accumulate(self, piece: bytes, out: list[Frame | FrameError]) -> None:
        if self._discarding:
            self.bytes_dropped += len(piece)
            return
        self._buf += piece
        if len(self._buf) > self._limit:
            # Bounded memory: a line stuck sending garbage without 0x00 must not grow us.
            out.append(
                FrameTooLargeError(
                    f"no delimiter within {self._limit} bytes; dropping until the next 0x00"
                )
            )
            self.bytes_dropped += len(self._buf)
            self._buf.clear()
            self._discarding = True

    def _finish_chunk(self, out: list[Frame | FrameError]) -> None:
        if self._discarding:
            self._discarding = False
            return
        if not self._buf:
            return  # consecutive delimiters are legal padding
        chunk = bytes(self._buf)
        self._buf.clear()
        try:
            out.append(decode_frame(chunk, max_payload=self.max_payload))
        except FrameError as exc:
            self.bytes_dropped += len(chunk)
            out.append(exc)
