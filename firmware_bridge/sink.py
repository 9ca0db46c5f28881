"""What the link hands over, and to whom: the case and tile records the host gives its sink, and its interface.

The sink's interface is TileSink, with the optional LinkEventSink.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Protocol, runtime_checkable

import numpy as np

from firmware_bridge.messages import CaseBegin
from firmware_bridge.pixels import CHANNELS, TileEncoding, decode_pixels

__all__ = ["CaseInfo", "CaseRefused", "LinkEventSink", "TileReceived", "TileSink"]


class CaseRefused(Exception):
    """Raised by a sink that will not take a case (e.g. too little free disk space); the host NACKs the
    frame REFUSED with this message and the scanner stops the case instead of retrying."""


@dataclass(frozen=True)
class CaseInfo:
    """What the sink learns when a case begins (the CASE_BEGIN fields)."""

    case_id: str
    specimen_id: str
    modality: str
    microns_per_pixel: float
    tile_width: int
    tile_height: int
    channels: int = CHANNELS
    dtype: str = "uint8"
    expected_tiles: int = 0
    image_width: int = 0
    image_height: int = 0
    overlap: int = 0
    accession: str = ""  # the lab's order number; "" when the scanner had none (or predates revision 1.3)

    @classmethod
    def from_message(cls, msg: CaseBegin) -> CaseInfo:
        return cls(**{f.name: getattr(msg, f.name) for f in fields(cls)})


@dataclass(frozen=True)
class TileReceived:
    """One checked tile handed to the sink.

    A JPEG tile is handed over as the scanner sent it (``jpeg``, its bytes, checked to decode before this is
    made): the sink keeps those bytes (the case pyramid passes them through as its full-resolution tiles) and
    the model's path decodes only what it needs. Any other encoding arrives decoded (``decoded``). ``pixels``
    gives a tile's full-size pixels either way, decoding a JPEG on each call.
    """

    case_id: str
    index: int
    x: int
    y: int
    width: int
    height: int
    decoded: np.ndarray | None = field(default=None, repr=False)  # read-only uint8 (h, w, 3); None for jpeg
    jpeg: bytes | None = field(default=None, repr=False)  # the scanner's JPEG, for an encoding of jpeg
    sha256: str | None = None  # hex digest of what the sink keeps (pixels' bytes, or the JPEG's), when hashed
    encoding: str = "raw"  # how the tile travelled
    payload_size: int = 0  # bytes on the wire for the pixels, before COBS

    def __post_init__(self) -> None:
        if (self.decoded is None) == (self.jpeg is None):
            raise ValueError("a received tile has either decoded pixels or JPEG bytes")

    @property
    def pixels(self) -> np.ndarray:
        """Full-size read-only uint8 (h, w, 3) pixels (a JPEG tile is decoded now, at full size)."""
        if self.decoded is not None:
            return self.decoded
        return decode_pixels(self.jpeg, TileEncoding.JPEG, self.width, self.height, label=f"tile {self.index}")


class TileSink(Protocol):
    """Where received cases go (the spool, in the daemon).

    Each method returns only once its effect is durable; the host ACKs after it returns.
    If one raises, the host NACKs with STORAGE and the scanner retransmits, so the method
    may be called again with the same data. All calls come from the link's reader thread.
    A resumed case (same CASE_BEGIN after a reconnect) does not call case_began again.
    A sink may also define link_event(kind, detail) (see LinkEventSink) to hear about the link.
    """

    def case_began(self, info: CaseInfo) -> None: ...

    def tile_received(self, tile: TileReceived) -> None: ...

    def case_ended(self, case_id: str, tile_count: int) -> None: ...


@runtime_checkable
class LinkEventSink(Protocol):
    """Optional sink method: called from the reader thread with a LinkEvent and a readable detail."""

    def link_event(self, kind: str, detail: str) -> None: ...
