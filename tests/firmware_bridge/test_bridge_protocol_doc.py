"""PROTOCOL.md's test vectors are what the code actually sends, so a firmware author can trust them."""

from __future__ import annotations

from pathlib import Path

import pytest

import firmware_bridge
from firmware_bridge.frames import MAX_FRAME, MAX_PAYLOAD, cobs_decode, cobs_max_encoded_len
from firmware_bridge.messages import Ack, Capability, Hello, Role, Tile, message_to_frame

DOC = (Path(firmware_bridge.__file__).parent / "PROTOCOL.md").read_text(encoding="utf-8")


@pytest.mark.parametrize(
    ("msg", "seq"),
    [
        (Hello(1, Role.SCANNER, 4, 1 << 20, Capability.ZLIB | Capability.PNG), 0),
        (Tile("C1", 0, 0, 0, 2, 1, "raw", bytes([0xE8, 0xB6, 0xCD, 0x5C, 0x3A, 0x94])), 2),
        (Ack(acked_seq=2, case_id="C1", tile_index=0), 1),
    ],
    ids=["hello", "tile", "ack"],
)
def test_documented_vectors_match_the_encoder(msg, seq) -> None:
    wire = message_to_frame(msg, seq)
    assert f"wire:  {wire.hex(' ')}" in DOC
    assert f"frame: {cobs_decode(wire[:-1]).hex(' ')}" in DOC


def test_doc_marks_planned_features() -> None:
    for planned in ("HEARTBEAT", "Reconnect and resume", "**planned**"):
        assert planned in DOC


def test_documented_limits_match_the_code() -> None:
    assert f"{MAX_PAYLOAD:,} bytes" in DOC
    assert f"{MAX_FRAME:,} bytes before COBS" in DOC
    assert f"{cobs_max_encoded_len(MAX_FRAME):,} bytes for the 1 MiB default" in DOC
