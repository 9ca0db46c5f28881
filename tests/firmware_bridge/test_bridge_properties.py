"""Property tests (hypothesis): codecs round-trip, and the parsers survive any bytes.

The default run uses DEFAULT_EXAMPLES per property; the long properties run again with SLOW_EXAMPLES,
marked slow (parametrised by example count, the same body).
"Never hangs" is enforced by a SIGALRM watchdog per example, not only by hypothesis's
deadline (which can only complain after a slow example has finished).
"""

from __future__ import annotations

import math
import signal
from contextlib import contextmanager

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from firmware_bridge.errors import FrameError, FrameTooLargeError, MessageDecodeError, TileDecodeError
from firmware_bridge.frames import (
    CRC_SIZE, HEADER_SIZE, MAX_PAYLOAD, UNKNOWN_SEQ, Frame, FrameReader, cobs_decode, cobs_encode,
    cobs_max_encoded_len, decode_frame, encode_frame,
)
from firmware_bridge.messages import (
    STR8_MAX, Ack, CaseBegin, CaseEnd, Capability, ErrorCode, ErrorMessage, Heartbeat, Hello, MsgType, Nack, NackReason,
    Role, Tile, TileEncoding, decode_message, message_from_frame, message_to_frame,
)
from firmware_bridge.pixels import decode_pixels

DEFAULT_EXAMPLES = 500
SLOW_EXAMPLES = 10_000
WATCHDOG_S = 5.0  # no single example may take this long: a parser that loops fails here

# The watchdog, not hypothesis's deadline, decides what "too slow" is (see above).
COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def fast(fn):
    return settings(max_examples=DEFAULT_EXAMPLES, **COMMON)(fn)


EXAMPLES = pytest.mark.parametrize("examples", [
    pytest.param(DEFAULT_EXAMPLES, id="500"),
    pytest.param(SLOW_EXAMPLES, id="10k", marks=pytest.mark.slow),
])


def check(examples: int, prop, *strategies) -> None:
    """Check ``prop`` on ``examples`` hypothesis examples drawn from ``strategies``."""
    settings(max_examples=examples, **COMMON)(given(*strategies)(prop))()


class Hang(Exception):
    pass


@contextmanager
def watchdog(seconds: float = WATCHDOG_S):
    def _fire(signum, frame):
        raise Hang(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, _fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# --- strategies -----------------------------------------------------------------------

u8 = st.integers(0, 0xFF)
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)
seqs = st.integers(0, UNKNOWN_SEQ - 1)


def text(max_bytes: int, *, min_size: int = 0) -> st.SearchStrategy[str]:
    # Characters are up to 4 UTF-8 bytes, so max_bytes // 4 characters always fit.
    return st.text(min_size=min_size, max_size=max_bytes // 4)


payloads = st.binary(max_size=3000) | st.builds(lambda n, b: bytes([b]) * n, st.integers(250, 1100), u8)

messages = st.one_of(
    st.builds(Hello, st.integers(1, 0xFF), st.sampled_from(Role), u16, u32, st.builds(Capability, st.integers(0, 31))),
    st.builds(
        CaseBegin,
        text(STR8_MAX, min_size=1),
        text(STR8_MAX),
        text(STR8_MAX),
        st.floats(min_value=1e-6, max_value=1e6, allow_nan=False, allow_infinity=False),
        st.integers(1, 0xFFFF),
        st.integers(1, 0xFFFF),
        u8,
        st.just("uint8"),
        u32,
        u32,
        u32,
        u16,
    ),
    st.builds(Tile, text(STR8_MAX, min_size=1), st.integers(0, 2**31 - 1), u32, u32, u16, u16,
              st.sampled_from(TileEncoding), payloads),
    st.builds(CaseEnd, text(STR8_MAX, min_size=1), u32),
    st.builds(Ack, u32, text(STR8_MAX), st.integers(-1, 2**31 - 1)),
    st.builds(Nack, u32, st.sampled_from(NackReason), text(STR8_MAX)),
    st.builds(ErrorMessage, st.sampled_from(ErrorCode), text(2000)),
    st.builds(Heartbeat, u32, u32, u16),
)


@st.composite
def wire_soup(draw) -> bytes:
    """Bytes a damaged line could carry: valid frames, mangled frames, noise, stray delimiters, and a line stuck
    sending one byte (no delimiter for longer than the smallest frame limit drawn below)."""
    pieces = []
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["frame", "mangled", "noise", "zeros", "cobs", "stuck"]))
        if kind == "noise":
            pieces.append(draw(st.binary(max_size=400)))
        elif kind == "stuck":
            pieces.append(bytes([draw(st.integers(1, 0xFF))]) * draw(st.integers(60, 1200)))
        elif kind == "zeros":
            pieces.append(b"\x00" * draw(st.integers(1, 3)))
        elif kind == "cobs":
            pieces.append(cobs_encode(draw(st.binary(max_size=300))) + b"\x00")
        else:
            wire = bytearray(encode_frame(draw(u8), draw(seqs), draw(st.binary(max_size=300)), flags=draw(u8)))
            if kind == "mangled":
                for _ in range(draw(st.integers(1, 4))):
                    op = draw(st.sampled_from(["flip", "drop", "insert", "cut"]))
                    pos = draw(st.integers(0, len(wire) - 1)) if wire else 0
                    if op == "flip" and wire:
                        wire[pos] ^= 1 << draw(st.integers(0, 7))
                    elif op == "drop" and wire:
                        del wire[pos]
                    elif op == "insert":
                        wire.insert(pos, draw(u8))
                    elif op == "cut":
                        del wire[pos:]
            pieces.append(bytes(wire))
    return b"".join(pieces)


arbitrary_bytes = st.binary(max_size=2000) | wire_soup()


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:])]


# --- round trips ----------------------------------------------------------------------


def _cobs_round_trip(data: bytes) -> None:
    enc = cobs_encode(data)
    assert 0 not in enc
    assert len(enc) <= cobs_max_encoded_len(len(data))
    assert cobs_decode(enc) == data


def _frame_round_trip(msg_type: int, seq: int, flags: int, payload: bytes, cuts: list[int]) -> None:
    wire = encode_frame(msg_type, seq, payload, flags=flags)
    assert wire.endswith(b"\x00") and 0 not in wire[:-1]
    expected = Frame(msg_type=msg_type, seq=seq, payload=payload, flags=flags)
    assert decode_frame(wire) == expected
    reader = FrameReader()
    got = [item for piece in _split(wire + wire, cuts) for item in reader.feed(piece)]
    assert got == [expected, expected]


def _message_round_trip(msg, seq: int) -> None:
    frame = decode_frame(message_to_frame(msg, seq))
    assert frame.seq == seq and frame.msg_type == msg.MSG_TYPE
    back = message_from_frame(frame)
    if isinstance(msg, CaseBegin):
        assert math.isclose(back.microns_per_pixel, msg.microns_per_pixel)
    assert back == msg


@fast
@given(st.binary(max_size=3000) | payloads)
def test_cobs_round_trip(data: bytes) -> None:
    _cobs_round_trip(data)


@EXAMPLES
def test_frame_round_trip(examples) -> None:
    check(examples, _frame_round_trip, u8, seqs, u8, payloads, st.lists(st.integers(0, 10_000), max_size=6))


@EXAMPLES
def test_every_message_round_trips(examples) -> None:
    check(examples, _message_round_trip, messages, seqs)


# --- the parsers never raise anything but their own errors, and never hang --------------


def _decode_frame_any(data: bytes, max_payload: int) -> None:
    with watchdog():
        try:
            frame = decode_frame(data, max_payload=max_payload)
        except FrameError:
            return
    assert isinstance(frame, Frame) and len(frame.payload) <= max_payload


def _reader_any(data: bytes, cuts: list[int], max_payload: int) -> None:
    reader = FrameReader(max_payload=max_payload)
    limit = cobs_max_encoded_len(HEADER_SIZE + max_payload + CRC_SIZE)  # the longest chunk a frame can be
    items, fed = [], b""
    with watchdog():
        for piece in _split(data, cuts):
            items += reader.feed(piece)
            fed += piece
            # Memory stays bounded whatever arrives: one item per chunk between delimiters, a chunk longer than
            # any frame reported as soon as it passes the limit, and every byte of a bad chunk dropped (counted,
            # not held), so all the reader can hold is a last chunk of at most `limit` bytes.
            *chunks, last = fed.split(b"\x00")
            chunks = [c for c in chunks if c]
            overlong = len(last) > limit
            assert len(items) == len(chunks) + overlong
            assert all(isinstance(i, FrameTooLargeError) for c, i in zip(chunks, items) if len(c) > limit)
            assert not overlong or isinstance(items[-1], FrameTooLargeError)
            dropped = sum(len(c) for c, i in zip(chunks, items) if isinstance(i, FrameError))
            assert reader.bytes_dropped == dropped + (len(last) if overlong else 0)
    assert all(isinstance(i, (Frame, FrameError)) for i in items)
    # Whatever came before, a delimiter and a good frame always get through.
    good = encode_frame(MsgType.TILE, 7, b"after the noise")
    assert reader.feed(b"\x00" + good)[-1] == Frame(MsgType.TILE, 7, b"after the noise")


limits = st.sampled_from([64, 1000, MAX_PAYLOAD])


@EXAMPLES
def test_decode_frame_raises_only_frame_errors(examples) -> None:
    check(examples, _decode_frame_any, arbitrary_bytes, limits)


@EXAMPLES
def test_frame_reader_never_raises_or_hangs(examples) -> None:
    check(examples, _reader_any, arbitrary_bytes, st.lists(st.integers(0, 10_000), max_size=8), limits)


@fast
@given(st.sampled_from(MsgType) | u8, st.binary(max_size=400))
def test_decode_message_raises_only_message_errors(msg_type, payload) -> None:
    with watchdog():
        try:
            decode_message(int(msg_type), payload)
        except MessageDecodeError:
            pass


@settings(max_examples=200, **COMMON)
@given(st.sampled_from(TileEncoding), st.binary(max_size=600), st.integers(1, 40), st.integers(1, 40))
def test_decode_pixels_raises_only_tile_errors(encoding, payload, w, h) -> None:
    with watchdog():
        try:
            arr = decode_pixels(payload, encoding, w, h)
        except TileDecodeError:
            return
    assert arr.shape == (h, w, 3)
