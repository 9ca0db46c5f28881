"""Protocol v1 messages: dataclasses with fixed little-endian layouts and pure encode/decode.

Every layout is documented byte by byte in PROTOCOL.md. Each class's WIRE tuple lists its
fields in wire order with their PROTOCOL.md type names; LAYOUT (the struct for the fixed
part) is derived from it, and the test suite checks WIRE, the bytes encode() produces and
the doc's tables against each other. Strings are "str8" (u8 byte length + UTF-8) except
ERROR text, which is "str16".
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field
from enum import IntEnum, IntFlag
from typing import ClassVar

import numpy as np

from firmware_bridge.errors import MessageDecodeError
from firmware_bridge.frames import MAX_PAYLOAD, UNKNOWN_SEQ, Frame, encode_frame
from firmware_bridge.layout import Wire, fixed_layout
from firmware_bridge.pixels import CHANNELS, TileEncoding, decode_pixels

__all__ = [
    "ALL_MESSAGES",
    "ENCODING_CAPABILITY",
    "Ack",
    "CaseBegin",
    "CaseEnd",
    "Capability",
    "ErrorCode",
    "ErrorMessage",
    "Heartbeat",
    "Hello",
    "Message",
    "MsgType",
    "Nack",
    "NackReason",
    "Role",
    "Tile",
    "TileEncoding",
    "clip_text",
    "decode_message",
    "decode_tile_pixels",
    "encode_message",
    "message_from_frame",
    "message_to_frame",
]


class MsgType(IntEnum):
    """Frame header byte 1."""

    HELLO = 0x01
    CASE_BEGIN = 0x02
    TILE = 0x03
    CASE_END = 0x04
    ACK = 0x05
    NACK = 0x06
    ERROR = 0x07
    HEARTBEAT = 0x08  # only to a peer whose HELLO has Capability.HEARTBEAT


class Role(IntEnum):
    SCANNER = 1
    HOST = 2


class Capability(IntFlag):
    """HELLO capability bits. RAW tiles are always accepted and have no bit."""

    NONE = 0
    ZLIB = 1 << 0
    PNG = 1 << 1
    HEARTBEAT = 1 << 2  # understands HEARTBEAT (0x08); a host with it answers every one
    RESUME = 1 << 3  # a host with it resumes an open case on a repeated identical CASE_BEGIN
    JPEG = 1 << 4


ENCODING_CAPABILITY = {
    TileEncoding.RAW: Capability.NONE,
    TileEncoding.ZLIB: Capability.ZLIB,
    TileEncoding.PNG: Capability.PNG,
    TileEncoding.JPEG: Capability.JPEG,
}


class NackReason(IntEnum):
    CRC = 1  # frame damaged in transit (any framing error); retransmit
    MALFORMED = 2  # frame intact but its payload does not parse; do not retransmit as is
    STORAGE = 3  # the host could not store it durably; retransmit after a short delay
    UNKNOWN_CASE = 4  # no open case with that case_id; send CASE_BEGIN first
    BAD_TILE = 5  # tile pixels do not decode or do not fit the case; do not retransmit
    TOO_LARGE = 6  # frame above the host's max payload; do not retransmit
    BUSY = 7  # host temporarily cannot accept; retransmit after a delay (not sent by v1 hosts)
    REFUSED = 8  # the host will not take this case (e.g. too little free disk space); stop the case


RETRYABLE_NACKS = frozenset({NackReason.CRC, NackReason.STORAGE, NackReason.BUSY})


class ErrorCode(IntEnum):
    UNSUPPORTED_VERSION = 1
    PROTOCOL = 2  # a message that makes no sense in this role or state
    INTERNAL = 3


DTYPE_CODES = {"uint8": 1}
_DTYPE_NAMES = {code: name for name, code in DTYPE_CODES.items()}

STR8_MAX = 0xFF
STR16_MAX = 0xFFFF


def clip_text(text: str, max_bytes: int = STR8_MAX) -> str:
    """Shorten text so its UTF-8 form fits max_bytes, without splitting a character."""
    raw = text.encode("utf-8")
    if len(raw) <= max_bytes:
        return text
    return raw[:max_bytes].decode("utf-8", errors="ignore")


def _check_uint(name: str, value: int, bits: int) -> None:
    if not isinstance(value, int) or not 0 <= value < (1 << bits):
        raise ValueError(f"{name}={value!r} must be an integer in 0..{(1 << bits) - 1}")


def _check_str(name: str, value: str, max_bytes: int, *, allow_empty: bool = True) -> None:
    if not isinstance(value, str):
        raise ValueError(f"{name} must be a str, got {type(value).__name__}")
    if not allow_empty and not value:
        raise ValueError(f"{name} must not be empty")
    size = len(value.encode("utf-8"))
    if size > max_bytes:
        raise ValueError(f"{name} is {size} bytes in UTF-8, the limit is {max_bytes}")


def _str8(value: str) -> bytes:
    raw = value.encode("utf-8")
    return bytes([len(raw)]) + raw


def _str16(value: str) -> bytes:
    raw = value.encode("utf-8")
    return struct.pack("<H", len(raw)) + raw


class _Cursor:
    """Bounds-checked reader over one payload; every failure names the message and field."""

    def __init__(self, payload: bytes, what: str) -> None:
        self.data = bytes(payload)
        self.pos = 0
        self.what = what

    def unpack(self, layout: struct.Struct, fields: str) -> tuple:
        if len(self.data) - self.pos < layout.size:
            raise MessageDecodeError(
                f"{self.what}: {len(self.data) - self.pos} bytes left at offset {self.pos}, "
                f"need {layout.size} for {fields}"
            )
        values = layout.unpack_from(self.data, self.pos)
        self.pos += layout.size
        return values

    def take(self, n: int, name: str) -> bytes:
        if len(self.data) - self.pos < n:
            raise MessageDecodeError(
                f"{self.what}: {name} needs {n} bytes at offset {self.pos}, "
                f"only {len(self.data) - self.pos} left"
            )
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def text(self, name: str, *, wide: bool = False) -> str:
        (n,) = self.unpack(_U16 if wide else _U8, f"length of {name}")
        raw = self.take(n, name)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise MessageDecodeError(f"{self.what}: {name} is not valid UTF-8 ({exc})") from exc

    def rest(self) -> bytes:
        chunk = self.data[self.pos :]
        self.pos = len(self.data)
        return chunk

    def end(self) -> None:
        if self.pos != len(self.data):
            raise MessageDecodeError(
                f"{self.what}: {len(self.data) - self.pos} unexpected bytes after offset {self.pos}"
            )


_U8 = struct.Struct("<B")
_U16 = struct.Struct("<H")


@dataclass(frozen=True)
class Hello:
    """Sent by both ends first. Its layout is frozen for all versions; later ones may only append."""

    MSG_TYPE: ClassVar[MsgType] = MsgType.HELLO
    WIRE: ClassVar[Wire] = (
        ("version", "u8"),
        ("role", "u8"),
        ("window", "u16"),
        ("max_payload", "u32"),
        ("capabilities", "u32"),
    )
    LAYOUT: ClassVar[struct.Struct] = fixed_layout(WIRE)  # 12 bytes

    version: int  # highest protocol version the sender speaks
    role: Role
    window: int  # most unacknowledged frames the sender will accept in flight (0 = no limit)
    max_payload: int  # largest frame payload the sender can receive
    capabilities: Capability = Capability.NONE

    def __post_init__(self) -> None:
        _check_uint("version", self.version, 8)
        if self.version < 1:
            raise ValueError(f"version={self.version} must be at least 1")
        object.__setattr__(self, "role", Role(self.role))
        _check_uint("window", self.window, 16)
        _check_uint("max_payload", self.max_payload, 32)
        _check_uint("capabilities", int(self.capabilities), 32)
        object.__setattr__(self, "capabilities", Capability(self.capabilities))

    def encode(self) -> bytes:
        return self.LAYOUT.pack(
            self.version, self.role, self.window, self.max_payload, self.capabilities
        )

    @classmethod
    def decode(cls, payload: bytes) -> Hello:
        cur = _Cursor(payload, "HELLO")
        version, role, window, max_payload, caps = cur.unpack(cls.LAYOUT, "the HELLO fields")
        # No cur.end(): a later version may append fields, and every version must read this.
        # Unknown capability bits are dropped rather than rejected for the same reason.
        known = caps & sum(int(c) for c in Capability)
        return _build(
            cls, "HELLO", version=version, role=role, window=window, max_payload=max_payload,
            capabilities=Capability(known),
        )


@dataclass(frozen=True)
class CaseBegin:
    """Opens a case: what the slide is and how its tiles are laid out."""

    MSG_TYPE: ClassVar[MsgType] = MsgType.CASE_BEGIN
    WIRE: ClassVar[Wire] = (
        ("microns_per_pixel", "f64"),
        ("image_width", "u32"),
        ("image_height", "u32"),
        ("expected_tiles", "u32"),
        ("tile_width", "u16"),
        ("tile_height", "u16"),
        ("overlap", "u16"),
        ("channels", "u8"),
        ("dtype", "u8"),
        ("case_id", "str8"),
        ("specimen_id", "str8"),
        ("modality", "str8"),
    )
    LAYOUT: ClassVar[struct.Struct] = fixed_layout(WIRE)  # 28 bytes, then the three strings

    case_id: str
    specimen_id: str
    modality: str
    microns_per_pixel: float
    tile_width: int
    tile_height: int
    channels: int = CHANNELS
    dtype: str = "uint8"
    expected_tiles: int = 0  # 0 = not known in advance
    image_width: int = 0  # 0 = not known in advance
    image_height: int = 0
    overlap: int = 0  # pixels shared by neighbouring tiles

    def __post_init__(self) -> None:
        _check_str("case_id", self.case_id, STR8_MAX, allow_empty=False)
        _check_str("specimen_id", self.specimen_id, STR8_MAX)
        _check_str("modality", self.modality, STR8_MAX)
        mpp = float(self.microns_per_pixel)
        if not math.isfinite(mpp) or mpp <= 0:
            raise ValueError(f"microns_per_pixel={self.microns_per_pixel!r} must be finite and > 0")
        object.__setattr__(self, "microns_per_pixel", mpp)
        for name in ("tile_width", "tile_height", "overlap"):
            _check_uint(name, getattr(self, name), 16)
        if self.tile_width == 0 or self.tile_height == 0:
            raise ValueError(f"tile size {self.tile_width}x{self.tile_height} must not be zero")
        for name in ("expected_tiles", "image_width", "image_height"):
            _check_uint(name, getattr(self, name), 32)
        _check_uint("channels", self.channels, 8)
        if self.dtype not in DTYPE_CODES:
            raise ValueError(f"dtype={self.dtype!r} is not supported; v1 knows {sorted(DTYPE_CODES)}")

    def encode(self) -> bytes:
        fixed = self.LAYOUT.pack(
            self.microns_per_pixel,
            self.image_width,
            self.image_height,
            self.expected_tiles,
            self.tile_width,
            self.tile_height,
            self.overlap,
            self.channels,
            DTYPE_CODES[self.dtype],
        )
        return fixed + _str8(self.case_id) + _str8(self.specimen_id) + _str8(self.modality)

    @classmethod
    def decode(cls, payload: bytes) -> CaseBegin:
        cur = _Cursor(payload, "CASE_BEGIN")
        mpp, iw, ih, expected, tw, th, overlap, channels, dtype_code = cur.unpack(
            cls.LAYOUT, "the fixed CASE_BEGIN fields"
        )
        case_id = cur.text("case_id")
        specimen_id = cur.text("specimen_id")
        modality = cur.text("modality")
        cur.end()
        if dtype_code not in _DTYPE_NAMES:
            raise MessageDecodeError(f"CASE_BEGIN: unknown dtype code {dtype_code}")
        return _build(
            cls,
            "CASE_BEGIN",
            case_id=case_id,
            specimen_id=specimen_id,
            modality=modality,
            microns_per_pixel=mpp,
            tile_width=tw,
            tile_height=th,
            channels=channels,
            dtype=_DTYPE_NAMES[dtype_code],
            expected_tiles=expected,
            image_width=iw,
            image_height=ih,
            overlap=overlap,
        )


@dataclass(frozen=True)
class Tile:
    """One tile: where it sits in the slide and its encoded pixels."""

    MSG_TYPE: ClassVar[MsgType] = MsgType.TILE
    WIRE: ClassVar[Wire] = (
        ("index", "u32"),
        ("x", "u32"),
        ("y", "u32"),
        ("w", "u16"),
        ("h", "u16"),
        ("encoding", "u8"),
        ("reserved", "u8"),
        ("case_id", "str8"),
        ("pixels", "bytes"),  # the attribute is `payload`: everything up to the frame's end
    )
    LAYOUT: ClassVar[struct.Struct] = fixed_layout(WIRE)  # 18 bytes

    case_id: str
    index: int
    x: int
    y: int
    w: int
    h: int
    encoding: TileEncoding
    payload: bytes = field(repr=False)

    def __post_init__(self) -> None:
        _check_str("case_id", self.case_id, STR8_MAX, allow_empty=False)
        # index stays below 2**31 so an ACK can carry it in a signed i32 next to -1.
        _check_uint("index", self.index, 31)
        _check_uint("x", self.x, 32)
        _check_uint("y", self.y, 32)
        _check_uint("w", self.w, 16)
        _check_uint("h", self.h, 16)
        object.__setattr__(self, "encoding", TileEncoding.parse(self.encoding))
        object.__setattr__(self, "payload", bytes(self.payload))

    def encode(self) -> bytes:
        fixed = self.LAYOUT.pack(self.index, self.x, self.y, self.w, self.h, self.encoding)
        return fixed + _str8(self.case_id) + self.payload

    @classmethod
    def decode(cls, payload: bytes) -> Tile:
        cur = _Cursor(payload, "TILE")
        index, x, y, w, h, encoding = cur.unpack(cls.LAYOUT, "the fixed TILE fields")
        case_id = cur.text("case_id")
        return _build(
            cls, "TILE", case_id=case_id, index=index, x=x, y=y, w=w, h=h,
            encoding=encoding, payload=cur.rest(),
        )


@dataclass(frozen=True)
class CaseEnd:
    """Closes a case; tile_count is how many tiles the scanner produced for it."""

    MSG_TYPE: ClassVar[MsgType] = MsgType.CASE_END
    WIRE: ClassVar[Wire] = (("tile_count", "u32"), ("case_id", "str8"))
    LAYOUT: ClassVar[struct.Struct] = fixed_layout(WIRE)

    case_id: str
    tile_count: int

    def __post_init__(self) -> None:
        _check_str("case_id", self.case_id, STR8_MAX, allow_empty=False)
        _check_uint("tile_count", self.tile_count, 32)

    def encode(self) -> bytes:
        return self.LAYOUT.pack(self.tile_count) + _str8(self.case_id)

    @classmethod
    def decode(cls, payload: bytes) -> CaseEnd:
        cur = _Cursor(payload, "CASE_END")
        (count,) = cur.unpack(cls.LAYOUT, "tile_count")
        case_id = cur.text("case_id")
        cur.end()
        return _build(cls, "CASE_END", case_id=case_id, tile_count=count)


@dataclass(frozen=True)
class Ack:
    """The frame with header seq acked_seq is durably handled."""

    MSG_TYPE: ClassVar[MsgType] = MsgType.ACK
    WIRE: ClassVar[Wire] = (("acked_seq", "u32"), ("tile_index", "i32"), ("case_id", "str8"))
    LAYOUT: ClassVar[struct.Struct] = fixed_layout(WIRE)

    acked_seq: int
    case_id: str = ""
    tile_index: int = -1  # -1 when the acknowledged frame is not a TILE

    def __post_init__(self) -> None:
        _check_uint("acked_seq", self.acked_seq, 32)
        _check_str("case_id", self.case_id, STR8_MAX)
        if not isinstance(self.tile_index, int) or not -1 <= self.tile_index < (1 << 31):
            raise ValueError(f"tile_index={self.tile_index!r} must be -1 or in 0..{(1 << 31) - 1}")

    def encode(self) -> bytes:
        return self.LAYOUT.pack(self.acked_seq, self.tile_index) + _str8(self.case_id)

    @classmethod
    def decode(cls, payload: bytes) -> Ack:
        cur = _Cursor(payload, "ACK")
        acked_seq, index = cur.unpack(cls.LAYOUT, "acked_seq and tile_index")
        case_id = cur.text("case_id")
        cur.end()
        return _build(cls, "ACK", acked_seq=acked_seq, case_id=case_id, tile_index=index)


@dataclass(frozen=True)
class Nack:
    """The frame with header seq was not handled; seq is UNKNOWN_SEQ when it was unreadable."""

    MSG_TYPE: ClassVar[MsgType] = MsgType.NACK
    WIRE: ClassVar[Wire] = (("seq", "u32"), ("reason", "u8"), ("detail", "str8"))
    LAYOUT: ClassVar[struct.Struct] = fixed_layout(WIRE)

    seq: int
    reason: NackReason
    detail: str = ""

    def __post_init__(self) -> None:
        _check_uint("seq", self.seq, 32)
        object.__setattr__(self, "reason", NackReason(self.reason))
        _check_str("detail", self.detail, STR8_MAX)

    @property
    def seq_known(self) -> bool:
        return self.seq != UNKNOWN_SEQ

    def encode(self) -> bytes:
        return self.LAYOUT.pack(self.seq, self.reason) + _str8(self.detail)

    @classmethod
    def decode(cls, payload: bytes) -> Nack:
        cur = _Cursor(payload, "NACK")
        seq, reason = cur.unpack(cls.LAYOUT, "seq and reason")
        detail = cur.text("detail")
        cur.end()
        return _build(cls, "NACK", seq=seq, reason=reason, detail=detail)


@dataclass(frozen=True)
class ErrorMessage:
    """A condition that no retransmission fixes; the receiver should stop and report it."""

    MSG_TYPE: ClassVar[MsgType] = MsgType.ERROR
    WIRE: ClassVar[Wire] = (("code", "u16"), ("text", "str16"))
    LAYOUT: ClassVar[struct.Struct] = fixed_layout(WIRE)

    code: ErrorCode
    text: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "code", ErrorCode(self.code))
        _check_str("text", self.text, STR16_MAX)

    def encode(self) -> bytes:
        return self.LAYOUT.pack(self.code) + _str16(self.text)

    @classmethod
    def decode(cls, payload: bytes) -> ErrorMessage:
        cur = _Cursor(payload, "ERROR")
        (code,) = cur.unpack(cls.LAYOUT, "code")
        text = cur.text("text", wide=True)
        cur.end()
        return _build(cls, "ERROR", code=code, text=text)


@dataclass(frozen=True)
class Heartbeat:
    """Keep-alive. reply_to is UNKNOWN_SEQ in one a sender originates, else the seq it answers."""

    MSG_TYPE: ClassVar[MsgType] = MsgType.HEARTBEAT
    WIRE: ClassVar[Wire] = (("reply_to", "u32"), ("uptime_ms", "u32"), ("interval_ms", "u16"))
    LAYOUT: ClassVar[struct.Struct] = fixed_layout(WIRE)  # 10 bytes

    reply_to: int = UNKNOWN_SEQ
    uptime_ms: int = 0  # sender's monotonic clock, wrapping; for logs and round-trip times
    interval_ms: int = 0  # how often the sender sends one when idle; 0 = never on its own

    def __post_init__(self) -> None:
        _check_uint("reply_to", self.reply_to, 32)
        _check_uint("uptime_ms", self.uptime_ms, 32)
        _check_uint("interval_ms", self.interval_ms, 16)

    @property
    def is_reply(self) -> bool:
        return self.reply_to != UNKNOWN_SEQ

    def encode(self) -> bytes:
        return self.LAYOUT.pack(self.reply_to, self.uptime_ms, self.interval_ms)

    @classmethod
    def decode(cls, payload: bytes) -> Heartbeat:
        cur = _Cursor(payload, "HEARTBEAT")
        reply_to, uptime_ms, interval_ms = cur.unpack(cls.LAYOUT, "the HEARTBEAT fields")
        cur.end()
        return _build(cls, "HEARTBEAT", reply_to=reply_to, uptime_ms=uptime_ms, interval_ms=interval_ms)


Message = Hello | CaseBegin | Tile | CaseEnd | Ack | Nack | ErrorMessage | Heartbeat

ALL_MESSAGES: tuple[type, ...] = (Hello, CaseBegin, Tile, CaseEnd, Ack, Nack, ErrorMessage, Heartbeat)
_BY_TYPE: dict[int, type] = {cls.MSG_TYPE: cls for cls in ALL_MESSAGES}


def _build(cls: type, what: str, **fields: object):
    """Construct a decoded message, turning a failed field check into MessageDecodeError."""
    try:
        return cls(**fields)
    except ValueError as exc:
        raise MessageDecodeError(f"{what}: {exc}") from exc


def encode_message(msg: Message) -> tuple[MsgType, bytes]:
    """Return (frame msg_type, frame payload) for a message."""
    return msg.MSG_TYPE, msg.encode()


def decode_message(msg_type: int, payload: bytes) -> Message:
    """Decode a frame payload by its msg_type; raises MessageDecodeError."""
    cls = _BY_TYPE.get(msg_type)
    if cls is None:
        raise MessageDecodeError(f"unknown message type 0x{msg_type:02X}")
    return cls.decode(payload)


def message_to_frame(msg: Message, seq: int, *, max_payload: int = MAX_PAYLOAD) -> bytes:
    """Wire bytes (COBS, delimiter included) of one message in one frame."""
    msg_type, payload = encode_message(msg)
    return encode_frame(msg_type, seq, payload, max_payload=max_payload)


def message_from_frame(frame: Frame) -> Message:
    """Decode the message carried by an already CRC-checked frame."""
    return decode_message(frame.msg_type, frame.payload)


def decode_tile_pixels(tile: Tile, *, channels: int = CHANNELS) -> np.ndarray:
    """Decode a TILE's pixels to a read-only uint8 (h, w, 3) array; raises TileDecodeError."""
    return decode_pixels(
        tile.payload, tile.encoding, tile.w, tile.h, channels=channels, label=f"tile {tile.index}"
    )

