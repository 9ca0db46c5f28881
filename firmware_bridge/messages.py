"""Protocol v1 messages: one frozen dataclass per message type, each declaring its wire layout as a table.

Every layout is documented byte by byte in PROTOCOL.md. Each class's WIRE tuple lists its
fields in wire order with their PROTOCOL.md type names; codec.WireMessage derives LAYOUT
(the struct for the fixed part) and the one encode()/decode() pair from it, and the test
suite checks WIRE, the bytes encode() produces and the doc's tables against each other.
Strings are "str8" (u8 byte length + UTF-8) except ERROR text, which is "str16". The
classes here only add what the table cannot say: field checks and the odd value mapping.
The numbers their fields carry (message types, roles, capability bits, NACK reasons, ERROR
codes) are the tables in codes.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from firmware_bridge.codec import STR8_MAX, STR16_MAX, WireMessage, check_str, check_uint
from firmware_bridge.codes import DTYPE_CODES, Capability, ErrorCode, MsgType, NackReason, Role
from firmware_bridge.errors import MessageDecodeError
from firmware_bridge.frames import MAX_PAYLOAD, UNKNOWN_SEQ, Frame, encode_frame
from firmware_bridge.layout import Wire
from firmware_bridge.pixels import CHANNELS, TileEncoding, decode_pixels

# Capability, ErrorCode, MsgType, NackReason, Role (codes.py) and TileEncoding (pixels.py) are the
# fields' types, named here too for whoever builds or reads messages.
__all__ = [
    "ALL_MESSAGES",
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


_DTYPE_NAMES = {code: name for name, code in DTYPE_CODES.items()}


def _dtype_name(code: int) -> str:
    if code not in _DTYPE_NAMES:
        raise MessageDecodeError(f"CASE_BEGIN: unknown dtype code {code}")
    return _DTYPE_NAMES[code]


def _known_capabilities(bits: int) -> Capability:
    # A later revision may set bits this one does not know; they are dropped, not refused.
    return Capability(bits & sum(int(c) for c in Capability))


def clip_text(text: str, max_bytes: int = STR8_MAX) -> str:
    """Shorten text so its UTF-8 form fits max_bytes, without splitting a character."""
    raw = text.encode("utf-8")
    if len(raw) <= max_bytes:
        return text
    return raw[:max_bytes].decode("utf-8", errors="ignore")


@dataclass(frozen=True)
class Hello(WireMessage):
    """Sent by both ends first. Its layout is frozen for all versions; later ones may only append."""

    MSG_TYPE: ClassVar[MsgType] = MsgType.HELLO
    WIRE: ClassVar[Wire] = (
        ("version", "u8"),
        ("role", "u8"),
        ("window", "u16"),
        ("max_payload", "u32"),
        ("capabilities", "u32"),
    )  # 12 bytes
    # Every version must read this: a later one may append fields or set new capability bits.
    APPENDABLE: ClassVar[bool] = True
    FROM_WIRE: ClassVar[dict[str, Any]] = {"capabilities": _known_capabilities}

    version: int  # highest protocol version the sender speaks
    role: Role
    window: int  # most unacknowledged frames the sender will accept in flight (0 = no limit)
    max_payload: int  # largest frame payload the sender can receive
    capabilities: Capability = Capability.NONE

    def __post_init__(self) -> None:
        check_uint("version", self.version, 8)
        if self.version < 1:
            raise ValueError(f"version={self.version} must be at least 1")
        object.__setattr__(self, "role", Role(self.role))
        check_uint("window", self.window, 16)
        check_uint("max_payload", self.max_payload, 32)
        check_uint("capabilities", int(self.capabilities), 32)
        object.__setattr__(self, "capabilities", Capability(self.capabilities))


@dataclass(frozen=True)
class CaseBegin(WireMessage):
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
        ("accession", "str8"),
    )  # 28 bytes, then the three strings and, when there is one, the accession
    # Revision 1.3 added the accession: without one, CASE_BEGIN is the bytes a 1.2 host reads.
    OPTIONAL: ClassVar[frozenset[str]] = frozenset({"accession"})
    TO_WIRE: ClassVar[dict[str, Any]] = {"dtype": DTYPE_CODES.__getitem__}
    FROM_WIRE: ClassVar[dict[str, Any]] = {"dtype": _dtype_name}

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
    accession: str = ""  # the lab's accession (order) number; "" = none, or the host cannot take one

    def __post_init__(self) -> None:
        check_str("case_id", self.case_id, STR8_MAX, allow_empty=False)
        check_str("specimen_id", self.specimen_id, STR8_MAX)
        check_str("modality", self.modality, STR8_MAX)
        check_str("accession", self.accession, STR8_MAX)
        mpp = float(self.microns_per_pixel)
        if not math.isfinite(mpp) or mpp <= 0:
            raise ValueError(f"microns_per_pixel={self.microns_per_pixel!r} must be finite and > 0")
        object.__setattr__(self, "microns_per_pixel", mpp)
        for name in ("tile_width", "tile_height", "overlap"):
            check_uint(name, getattr(self, name), 16)
        if self.tile_width == 0 or self.tile_height == 0:
            raise ValueError(f"tile size {self.tile_width}x{self.tile_height} must not be zero")
        for name in ("expected_tiles", "image_width", "image_height"):
            check_uint(name, getattr(self, name), 32)
        check_uint("channels", self.channels, 8)
        if self.dtype not in DTYPE_CODES:
            raise ValueError(f"dtype={self.dtype!r} is not supported; v1 knows {sorted(DTYPE_CODES)}")


@dataclass(frozen=True)
class Tile(WireMessage):
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
        ("pixels", "bytes"),  # everything up to the frame's end
    )  # 18 bytes, then case_id and the pixels
    # PROTOCOL.md calls the field "pixels"; in code it is the encoded payload, not pixels yet.
    FIELD_ATTRS: ClassVar[dict[str, str]] = {"pixels": "payload"}

    case_id: str
    index: int
    x: int
    y: int
    w: int
    h: int
    encoding: TileEncoding
    payload: bytes = field(repr=False)

    def __post_init__(self) -> None:
        check_str("case_id", self.case_id, STR8_MAX, allow_empty=False)
        # index stays below 2**31 so an ACK can carry it in a signed i32 next to -1.
        check_uint("index", self.index, 31)
        check_uint("x", self.x, 32)
        check_uint("y", self.y, 32)
        check_uint("w", self.w, 16)
        check_uint("h", self.h, 16)
        object.__setattr__(self, "encoding", TileEncoding.parse(self.encoding))
        object.__setattr__(self, "payload", bytes(self.payload))


@dataclass(frozen=True)
class CaseEnd(WireMessage):
    """Closes a case; tile_count is how many tiles the scanner produced for it."""

    MSG_TYPE: ClassVar[MsgType] = MsgType.CASE_END
    WIRE: ClassVar[Wire] = (("tile_count", "u32"), ("case_id", "str8"))

    case_id: str
    tile_count: int

    def __post_init__(self) -> None:
        check_str("case_id", self.case_id, STR8_MAX, allow_empty=False)
        check_uint("tile_count", self.tile_count, 32)


@dataclass(frozen=True)
class Ack(WireMessage):
    """The frame with header seq acked_seq is durably handled."""

    MSG_TYPE: ClassVar[MsgType] = MsgType.ACK
    WIRE: ClassVar[Wire] = (("acked_seq", "u32"), ("tile_index", "i32"), ("case_id", "str8"))

    acked_seq: int
    case_id: str = ""
    tile_index: int = -1  # -1 when the acknowledged frame is not a TILE

    def __post_init__(self) -> None:
        check_uint("acked_seq", self.acked_seq, 32)
        check_str("case_id", self.case_id, STR8_MAX)
        if not isinstance(self.tile_index, int) or not -1 <= self.tile_index < (1 << 31):
            raise ValueError(f"tile_index={self.tile_index!r} must be -1 or in 0..{(1 << 31) - 1}")


@dataclass(frozen=True)
class Nack(WireMessage):
    """The frame with header seq was not handled; seq is UNKNOWN_SEQ when it was unreadable."""

    MSG_TYPE: ClassVar[MsgType] = MsgType.NACK
    WIRE: ClassVar[Wire] = (("seq", "u32"), ("reason", "u8"), ("detail", "str8"))

    seq: int
    reason: NackReason
    detail: str = ""

    def __post_init__(self) -> None:
        check_uint("seq", self.seq, 32)
        object.__setattr__(self, "reason", NackReason(self.reason))
        check_str("detail", self.detail, STR8_MAX)

    @property
    def seq_known(self) -> bool:
        return self.seq != UNKNOWN_SEQ


@dataclass(frozen=True)
class ErrorMessage(WireMessage):
    """A condition that no retransmission fixes; the receiver should stop and report it."""

    MSG_TYPE: ClassVar[MsgType] = MsgType.ERROR
    WIRE: ClassVar[Wire] = (("code", "u16"), ("text", "str16"))

    code: ErrorCode
    text: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "code", ErrorCode(self.code))
        check_str("text", self.text, STR16_MAX)


@dataclass(frozen=True)
class Heartbeat(WireMessage):
    """Keep-alive. reply_to is UNKNOWN_SEQ in one a sender originates, else the seq it answers."""

    MSG_TYPE: ClassVar[MsgType] = MsgType.HEARTBEAT
    WIRE: ClassVar[Wire] = (("reply_to", "u32"), ("uptime_ms", "u32"), ("interval_ms", "u16"))  # 10 bytes

    reply_to: int = UNKNOWN_SEQ
    uptime_ms: int = 0  # sender's monotonic clock, wrapping; for logs and round-trip times
    interval_ms: int = 0  # how often the sender sends one when idle; 0 = never on its own

    def __post_init__(self) -> None:
        check_uint("reply_to", self.reply_to, 32)
        check_uint("uptime_ms", self.uptime_ms, 32)
        check_uint("interval_ms", self.interval_ms, 16)

    @property
    def is_reply(self) -> bool:
        return self.reply_to != UNKNOWN_SEQ


Message = Hello | CaseBegin | Tile | CaseEnd | Ack | Nack | ErrorMessage | Heartbeat

ALL_MESSAGES: tuple[type[WireMessage], ...] = (Hello, CaseBegin, Tile, CaseEnd, Ack, Nack, ErrorMessage, Heartbeat)
_BY_TYPE: dict[int, type[WireMessage]] = {cls.MSG_TYPE: cls for cls in ALL_MESSAGES}


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
