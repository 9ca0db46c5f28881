"""One case as the scanner emulator takes it and reports it: the tiles to send and what a run did."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field, fields

import numpy as np

from firmware_bridge.messages import CaseBegin, Tile
from firmware_bridge.pixels import TileEncoding

__all__ = ["EmulatorResult", "JpegTile", "ProgressCallback", "TileOnDemand", "TileToSend", "case_begin_from",
           "expected_digest"]

ProgressCallback = Callable[[int, int, int | None], None]  # (sent, acked, total or None)


@dataclass(frozen=True)
class TileToSend:
    """One tile as the scanner produced it: top-left position and uint8 HxWx3 pixels."""

    x: int
    y: int
    pixels: np.ndarray = field(repr=False)

    @property
    def w(self) -> int:
        return int(self.pixels.shape[1])

    @property
    def h(self) -> int:
        return int(self.pixels.shape[0])

    def message(self, case_id: str, index: int, encoding: TileEncoding, payload: bytes) -> Tile:
        """The TILE message carrying this tile's pixels, already encoded as payload."""
        return Tile(case_id=case_id, index=index, x=self.x, y=self.y, w=self.w, h=self.h, encoding=encoding,
                    payload=payload)


@dataclass(frozen=True)
class TileOnDemand:
    """A tile whose pixels are read from their source (``read()``) each time they are needed, not held: a
    scanner streaming a large slide never has the slide in memory. Sent like a TileToSend; ``read`` may keep
    the last tile it read, so the encoder and the digest of one tile read it once."""

    x: int
    y: int
    w: int
    h: int
    read: Callable[[], np.ndarray] = field(repr=False, compare=False)

    @property
    def pixels(self) -> np.ndarray:
        return self.read()

    message = TileToSend.message


@dataclass(frozen=True)
class JpegTile:
    """A tile the scanner's hardware has already compressed: its JPEG bytes, sent as they are by an emulator
    whose encoding is jpeg (its link then costs the emulator nothing but the writes, as on a real scanner)."""

    x: int
    y: int
    w: int
    h: int
    jpeg: bytes = field(repr=False)

    @property
    def pixels(self) -> np.ndarray:
        from firmware_bridge.pixels import decode_pixels

        return decode_pixels(self.jpeg, TileEncoding.JPEG, self.w, self.h)

    message = TileToSend.message


@dataclass
class EmulatorResult:
    """What one run() did."""

    case_id: str
    tiles_sent: int = 0  # distinct tiles put on the wire
    frames_written: int = 0  # every write, first transmissions and retransmissions
    retransmits: int = 0  # includes tiles resent after a reconnect
    timeouts: int = 0  # retransmissions because ack_timeout (or the CRC grace) ran out
    acked: list[int] = field(default_factory=list)  # tile indices in the order their ACKs came
    rejected: dict[int, str] = field(default_factory=dict)  # index -> non-retryable NACK
    nacks_received: int = 0
    corrupt_answers: int = 0  # frames from the host that failed to decode
    disconnects: int = 0  # times the cable was pulled under the case (faults or otherwise)
    reconnects: int = 0  # times the emulator plugged back in, said HELLO and resumed
    heartbeats_sent: int = 0
    heartbeat_replies: int = 0
    # index -> sha256 of what the host keeps of each tile: the pixels for lossless encodings, the JPEG's
    # bytes for jpeg. keep_digests=True.
    digests: dict[int, str] = field(default_factory=dict)


def expected_digest(pixels: np.ndarray, payload: bytes, encoding: TileEncoding) -> str:
    """sha256 of what the host keeps of a tile: a JPEG's bytes as sent, else the pixels."""
    if encoding == TileEncoding.JPEG:
        return hashlib.sha256(payload).hexdigest()
    return hashlib.sha256(np.ascontiguousarray(pixels)).hexdigest()


def case_begin_from(case: object) -> CaseBegin:
    """Build the wire CASE_BEGIN from anything with its fields (sink.CaseInfo, typically)."""
    return CaseBegin(**{f.name: getattr(case, f.name) for f in fields(CaseBegin)})
