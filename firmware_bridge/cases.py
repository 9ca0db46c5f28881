"""The host's rules for cases: the open case, the cases it ended, and what a TILE must fit (PROTOCOL.md 8.2, 8.6)."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field, fields

from firmware_bridge.errors import TileDecodeError
from firmware_bridge.messages import CaseBegin, Tile

__all__ = ["ENDED_CASES_REMEMBERED", "EndedCases", "OpenCase", "check_tile_fits", "differences"]

ENDED_CASES_REMEMBERED = 16  # enough to re-ACK a retransmitted CASE_END; older ones cannot recur


@dataclass
class OpenCase:
    """The case between its CASE_BEGIN and CASE_END, and the tile indices the sink has stored."""

    begin: CaseBegin
    stored: set[int] = field(default_factory=set)


class EndedCases:
    """The last ENDED_CASES_REMEMBERED cases ended, so a CASE_END resent after a lost ACK is re-ACKed."""

    def __init__(self) -> None:
        self._tile_counts: OrderedDict[str, int] = OrderedDict()

    def __contains__(self, case_id: object) -> bool:
        return case_id in self._tile_counts

    def add(self, case_id: str, tile_count: int) -> None:
        self._tile_counts[case_id] = tile_count
        while len(self._tile_counts) > ENDED_CASES_REMEMBERED:
            self._tile_counts.popitem(last=False)

    def forget(self, case_id: str) -> None:
        """The same case_id began again: it is a new case, and its CASE_END no duplicate."""
        self._tile_counts.pop(case_id, None)


def differences(open_case: CaseBegin, new: CaseBegin) -> str:
    """Name each CASE_BEGIN field that differs, for the NACK a technician reads."""
    diffs = [
        f"{f.name} {getattr(open_case, f.name)!r} -> {getattr(new, f.name)!r}"
        for f in fields(CaseBegin)
        if getattr(open_case, f.name) != getattr(new, f.name)
    ]
    return ", ".join(diffs)


def check_tile_fits(case: CaseBegin, tile: Tile) -> None:
    """Reject a tile whose geometry contradicts its CASE_BEGIN (0 in the case means unknown)."""
    label = f"tile {tile.index}"
    if case.expected_tiles and tile.index >= case.expected_tiles:
        raise TileDecodeError(f"{label}: index out of range, case declares {case.expected_tiles} tiles")
    if tile.w > case.tile_width or tile.h > case.tile_height:
        raise TileDecodeError(
            f"{label}: {tile.w}x{tile.h} is larger than the case tile size {case.tile_width}x{case.tile_height}"
        )
    if case.image_width and tile.x + tile.w > case.image_width:
        raise TileDecodeError(f"{label}: x {tile.x} + w {tile.w} exceeds image width {case.image_width}")
    if case.image_height and tile.y + tile.h > case.image_height:
        raise TileDecodeError(f"{label}: y {tile.y} + h {tile.h} exceeds image height {case.image_height}")
