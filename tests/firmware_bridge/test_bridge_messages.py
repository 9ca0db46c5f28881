"""Message layouts: round trips, exact bytes, decode errors, and tile pixel decoding."""

from __future__ import annotations

import dataclasses
import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from firmware_bridge.codec import WireMessage
from firmware_bridge.errors import MessageDecodeError, TileDecodeError, TileEncodeError
from firmware_bridge.frames import UNKNOWN_SEQ, decode_frame
from firmware_bridge.messages import (
    Ack, CaseBegin, CaseEnd, Capability, ErrorCode, ErrorMessage, Hello, MsgType, Nack, NackReason, Role, Tile,
    TileEncoding, clip_text, decode_message, decode_tile_pixels, encode_message, message_from_frame, message_to_frame,
)
from firmware_bridge.pixels import encode_pixels

CASE = CaseBegin(
    case_id="CASE-0001",
    specimen_id="S-42 · Ärztin",
    modality="brightfield-HE",
    microns_per_pixel=0.2527,
    tile_width=512,
    tile_height=512,
    expected_tiles=1197,
    image_width=20000,
    image_height=15000,
    overlap=16,
)
WITH_ACCESSION = dataclasses.replace(CASE, accession="ACC-2026-00417 · Zürich")

MESSAGES = [
    Hello(1, Role.SCANNER, 4, 1 << 20, Capability.ZLIB | Capability.PNG),
    Hello(1, Role.HOST, 0, 4096),
    CASE,
    WITH_ACCESSION,
    Tile("CASE-0001", 12, 600, 50, 50, 35, TileEncoding.ZLIB, b"\x00\x01payload\x00"),
    CaseEnd("CASE-0001", 1197),
    Ack(acked_seq=77, case_id="CASE-0001", tile_index=12),
    Ack(acked_seq=0),
    Nack(seq=UNKNOWN_SEQ, reason=NackReason.CRC, detail="CRC mismatch"),
    Nack(seq=9, reason=NackReason.STORAGE),
    ErrorMessage(ErrorCode.UNSUPPORTED_VERSION, "x" * 1000),
]


@pytest.mark.parametrize("msg", MESSAGES, ids=lambda m: type(m).__name__)
def test_every_message_round_trips_through_a_frame(msg) -> None:
    msg_type, payload = encode_message(msg)
    assert decode_message(msg_type, payload) == msg
    frame = decode_frame(message_to_frame(msg, 1234))
    assert frame.seq == 1234 and frame.msg_type == msg.MSG_TYPE
    assert message_from_frame(frame) == msg


def test_tile_layout_is_fixed_little_endian() -> None:
    tile = Tile("C1", index=12, x=600, y=50, w=50, h=35, encoding="png", payload=b"PIX")
    assert tile.encode() == (
        struct.pack("<IIIHHBx", 12, 600, 50, 50, 35, 2) + b"\x02C1" + b"PIX"
    )


def test_case_begin_layout() -> None:
    payload = CASE.encode()
    assert payload[:28] == struct.pack("<dIIIHHHBB", 0.2527, 20000, 15000, 1197, 512, 512, 16, 3, 1)
    assert payload[28:38] == b"\x09CASE-0001"


def test_case_begin_without_an_accession_is_the_revision_1_2_bytes() -> None:
    # What the encoder produced before the accession existed: an older host reads it unchanged.
    fixed = struct.pack("<dIIIHHHBB", 0.2527, 20000, 15000, 1197, 512, 512, 16, 3, 1)
    strings = [s.encode() for s in ("CASE-0001", "S-42 · Ärztin", "brightfield-HE")]
    assert CASE.encode() == fixed + b"".join(bytes([len(s)]) + s for s in strings)
    assert decode_message(MsgType.CASE_BEGIN, CASE.encode()).accession == ""


def test_case_begin_carries_the_accession_at_its_end() -> None:
    raw = WITH_ACCESSION.accession.encode()
    assert WITH_ACCESSION.encode() == CASE.encode() + bytes([len(raw)]) + raw
    # An explicitly empty accession (a length byte 0) reads the same as an absent one.
    assert decode_message(MsgType.CASE_BEGIN, CASE.encode() + b"\x00") == CASE


@dataclasses.dataclass(frozen=True)
class _TwoOptional(WireMessage):
    """Not a protocol message: the codec's optional-field rule with more than one such field."""

    MSG_TYPE = MsgType.CASE_END
    WIRE = (("n", "u8"), ("a", "str8"), ("b", "str8"))
    OPTIONAL = frozenset({"a", "b"})

    n: int
    a: str = ""
    b: str = ""


@pytest.mark.parametrize(
    ("msg", "payload"),
    [
        (_TwoOptional(1), b"\x01"),
        (_TwoOptional(1, a="y"), b"\x01\x01y"),
        (_TwoOptional(1, b="x"), b"\x01\x00\x01x"),  # an empty field before a sent one keeps its place
    ],
)
def test_only_empty_optional_fields_at_the_end_are_left_out(msg, payload) -> None:
    assert msg.encode() == payload and _TwoOptional.decode(payload) == msg


@pytest.mark.parametrize(
    ("wire", "optional", "fragment"),
    [
        ((("a", "str8"), ("b", "str8")), {"a"}, "must be the last fields"),
        ((("a", "u8"), ("b", "u8")), {"b"}, "must be variable-length"),
    ],
)
def test_optional_fields_must_be_variable_and_last(wire, optional, fragment) -> None:
    with pytest.raises(TypeError, match=fragment):
        type("Bad", (WireMessage,), {"MSG_TYPE": MsgType.CASE_END, "WIRE": wire, "OPTIONAL": frozenset(optional)})


def test_ack_and_nack_layouts() -> None:
    assert Ack(5, "C1", -1).encode() == b"\x05\x00\x00\x00\xff\xff\xff\xff\x02C1"
    assert Nack(UNKNOWN_SEQ, NackReason.BAD_TILE, "x").encode() == b"\xff\xff\xff\xff\x05\x01x"


def test_hello_accepts_appended_fields_and_unknown_capability_bits() -> None:
    payload = struct.pack("<BBHII", 2, Role.HOST, 8, 65536, 0x8000_0003) + b"future fields"
    hello = decode_message(MsgType.HELLO, payload)
    assert hello == Hello(2, Role.HOST, 8, 65536, Capability.ZLIB | Capability.PNG)


@pytest.mark.parametrize(
    ("msg_type", "payload", "fragment"),
    [
        (0x09, b"", "unknown message type 0x09"),
        (MsgType.HEARTBEAT, b"\x01\x00\x00\x00", "HEARTBEAT: 4 bytes left"),
        (MsgType.HELLO, b"\x01\x01", "HELLO: 2 bytes left"),
        (MsgType.HELLO, bytes(12), "HELLO: version=0 must be at least 1"),
        (MsgType.HELLO, b"\x01" + bytes(11), "HELLO: 0 is not a valid Role"),
        (MsgType.CASE_BEGIN, CASE.encode()[:-3], "CASE_BEGIN: modality needs"),
        # A byte after modality is the accession's length prefix now (revision 1.3): still MALFORMED.
        (MsgType.CASE_BEGIN, CASE.encode() + b"!", "CASE_BEGIN: accession needs 33 bytes"),
        (MsgType.CASE_BEGIN, WITH_ACCESSION.encode() + b"!", "CASE_BEGIN: 1 unexpected bytes"),
        (MsgType.CASE_BEGIN, WITH_ACCESSION.encode()[:-1], "CASE_BEGIN: accession needs"),
        (MsgType.CASE_BEGIN, CASE.encode()[:27] + b"\x09" + CASE.encode()[28:], "unknown dtype code 9"),
        (MsgType.TILE, struct.pack("<IIIHHBx", 1, 0, 0, 5, 5, 7) + b"\x01C", "TILE: 7 is not a valid TileEncoding"),
        (MsgType.TILE, struct.pack("<IIIHHBx", 1, 0, 0, 5, 5, 0) + b"\x00", "case_id must not be empty"),
        (MsgType.CASE_END, b"\x01\x00\x00\x00\x05ab", "case_id needs 5 bytes"),
        (MsgType.ACK, b"\x01\x00\x00\x00\x00\x00\x00\x00\x02\xff\xfe", "case_id is not valid UTF-8"),
        (MsgType.NACK, b"\x01\x00\x00\x00\x63\x00", "NACK: 99 is not a valid NackReason"),
        (MsgType.ERROR, b"\x01\x00\x05\x00ab", "ERROR: text needs 5 bytes"),
    ],
)
def test_decode_errors_name_the_message_and_field(msg_type: int, payload: bytes, fragment: str) -> None:
    with pytest.raises(MessageDecodeError, match=fragment):
        decode_message(msg_type, payload)


def test_constructors_validate_fields() -> None:
    with pytest.raises(ValueError, match="case_id must not be empty"):
        CaseBegin("", "s", "m", 0.5, 50, 50)
    with pytest.raises(ValueError, match="dtype='uint16' is not supported"):
        CaseBegin("c", "s", "m", 0.5, 50, 50, dtype="uint16")
    with pytest.raises(ValueError, match="microns_per_pixel"):
        CaseBegin("c", "s", "m", float("nan"), 50, 50)
    with pytest.raises(ValueError, match="index"):
        Tile("c", 1 << 31, 0, 0, 1, 1, "raw", b"")
    with pytest.raises(ValueError, match="unknown tile encoding 'webp'"):
        Tile("c", 0, 0, 0, 1, 1, "webp", b"")
    with pytest.raises(ValueError, match="case_id is 256 bytes"):
        CaseEnd("é" * 128, 1)
    with pytest.raises(ValueError, match="accession is 256 bytes"):
        CaseBegin("c", "s", "m", 0.5, 50, 50, accession="x" * 256)
    assert CaseBegin("c", "s", "m", 0.5, 50, 50, accession="x" * 255).accession == "x" * 255


def test_clip_text_respects_utf8_boundaries() -> None:
    assert clip_text("ab", 5) == "ab"
    clipped = clip_text("é" * 200)
    assert len(clipped.encode()) <= 255 and clipped == "é" * 127


# --- pixels ---------------------------------------------------------------------------

PIXELS = np.random.default_rng(5).integers(0, 256, (35, 50, 3), dtype=np.uint8)


def _tile(encoding: TileEncoding, payload: bytes, index: int = 12, w: int = 50, h: int = 35) -> Tile:
    return Tile("C1", index, 0, 0, w, h, encoding, payload)


@pytest.mark.parametrize("encoding", [e for e in TileEncoding if e != TileEncoding.JPEG])
def test_pixels_round_trip_in_every_lossless_encoding(encoding: TileEncoding) -> None:
    arr = decode_tile_pixels(_tile(encoding, encode_pixels(PIXELS, encoding)))
    assert arr.dtype == np.uint8 and arr.shape == (35, 50, 3)
    np.testing.assert_array_equal(arr, PIXELS)
    assert not arr.flags.writeable  # the sink gets the pixels as received


def test_raw_size_mismatch_message_is_specific() -> None:
    full = np.zeros((50, 50, 3), np.uint8).tobytes()
    with pytest.raises(TileDecodeError, match=r"^tile 12: raw payload is 7499 bytes, expected 7500 for 50x50x3$"):
        decode_tile_pixels(_tile(TileEncoding.RAW, full[:-1], w=50, h=50))


@pytest.mark.parametrize(
    ("payload", "fragment"),
    [
        (b"not zlib at all", "zlib payload is corrupt"),
        (zlib.compress(PIXELS.tobytes())[:-20], "zlib stream is truncated"),
        (zlib.compress(PIXELS.tobytes() + b"\x00"), "inflates to more than 5250 bytes"),
        (zlib.compress(PIXELS.tobytes()[:-3]), "inflates to 5247 bytes, expected 5250 for 50x35x3"),
        (zlib.compress(PIXELS.tobytes()) + b"junk", "4 stray bytes after the end"),
    ],
)
def test_zlib_tiles_fail_with_specific_messages(payload: bytes, fragment: str) -> None:
    with pytest.raises(TileDecodeError, match=fragment):
        decode_tile_pixels(_tile(TileEncoding.ZLIB, payload))


def test_zlib_bomb_is_capped() -> None:
    bomb = zlib.compress(b"\x00" * 50_000_000)
    with pytest.raises(TileDecodeError, match="more than 5250 bytes"):
        decode_tile_pixels(_tile(TileEncoding.ZLIB, bomb))


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize(
    ("payload", "fragment"),
    [
        (_png(PIXELS[:, :40]), "png is RGB 40x35, expected RGB 50x35"),
        (_png(np.dstack([PIXELS, PIXELS[..., :1]])), "png is RGBA 50x35"),
        (b"\x89PNG\r\n\x1a\n garbage", "png payload cannot be decoded"),
        (_png(PIXELS)[:200], "png payload cannot be decoded"),
    ],
)
def test_png_tiles_fail_with_specific_messages(payload: bytes, fragment: str) -> None:
    with pytest.raises(TileDecodeError, match=fragment):
        decode_tile_pixels(_tile(TileEncoding.PNG, payload))


def test_encode_pixels_rejects_wrong_arrays() -> None:
    with pytest.raises(TileEncodeError, match="uint8 HxWx3"):
        encode_pixels(PIXELS.astype(np.float32), TileEncoding.RAW)
    with pytest.raises(TileEncodeError, match="uint8 HxWx3"):
        encode_pixels(PIXELS[..., 0], TileEncoding.RAW)
