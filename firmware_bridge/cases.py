"""The host's cases: the open case, the cases it ended, what a TILE must fit, and the sink calls that make each
CASE_BEGIN, TILE and CASE_END durable before it is ACKed (PROTOCOL.md 8.2, 8.6, 8.8)."""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields

from firmware_bridge.answers import Replies
from firmware_bridge.codes import NackReason
from firmware_bridge.errors import TileDecodeError
from firmware_bridge.messages import CaseBegin, CaseEnd, Tile, decode_tile_pixels
from firmware_bridge.pixels import CHANNELS, TileEncoding, check_jpeg
from firmware_bridge.sink import CaseInfo, CaseRefused, TileReceived, TileSink
from firmware_bridge.status import LinkEvent, LinkStatus

__all__ = ["ENDED_CASES_REMEMBERED", "EndedCases", "HostCases", "OpenCase", "check_tile_fits", "differences"]

log = logging.getLogger(__name__)

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


class HostCases:
    """The host's cases for one scanner, across reconnects: HostSession hands it each CASE_BEGIN, TILE and
    CASE_END with its seq and time; it calls the sink and ACKs only once the call returned (8.2), re-ACKs
    duplicates without calling it again (8.6) and resumes the open case after a new HELLO (8.8).

    Answers go to `replies`, events and counters to `status`. A sink that raises gets the frame NACKed
    (STORAGE, or REFUSED for CaseRefused), so the scanner retransmits or stops.
    """

    def __init__(self, sink: TileSink | None, status: LinkStatus, replies: Replies, *, hash_tiles: bool) -> None:
        self.sink = sink
        self.status = status
        self.counters = status.counters
        self.replies = replies
        self.hash_tiles = hash_tiles
        self.open: OpenCase | None = None
        self.ended = EndedCases()
        self._hello_since_begin = False  # a CASE_BEGIN for the open case is now a resume
        self._now = 0.0  # the time of the frame being handled, for its events

    def restore(self, info: CaseInfo, stored: Iterable[int]) -> None:
        """Re-open a case a previous host process left open, with the tile indices it had stored and ACKed."""
        begin = CaseBegin(**{f.name: getattr(info, f.name) for f in fields(CaseBegin)})
        self.open = OpenCase(begin=begin, stored=set(stored))
        self._hello_since_begin = True

    def hello(self) -> None:
        """The scanner said HELLO: its next CASE_BEGIN for the open case, unchanged, resumes it."""
        self._hello_since_begin = True

    def on_case_begin(self, seq: int, msg: CaseBegin, now: float) -> None:
        self._now = now
        case = self.open
        if case is not None and case.begin.case_id == msg.case_id:
            if case.begin != msg:
                self._refuse_case(seq, msg.case_id, differences(case.begin, msg))
            elif self._hello_since_begin:
                # Same case, same fields, new connection: the scanner resumes after a
                # reconnect. Keep what is stored; the sink already knows the case.
                self._hello_since_begin = False
                self.counters.resumes += 1
                stored = len(case.stored)
                self._emit(LinkEvent.RESUMED, f"case {msg.case_id} resumed with {stored} tiles already stored")
                self.replies.ack(seq, msg.case_id, -1)
            else:
                self._duplicate(seq, msg.case_id, -1, f"CASE_BEGIN {msg.case_id}")
            return
        if msg.channels != CHANNELS:
            self.counters.malformed += 1
            detail = f"case {msg.case_id}: {msg.channels} channels; v1 carries 3 (RGB)"
            self._problem(LinkEvent.MALFORMED, detail)
            self.replies.nack(seq, NackReason.MALFORMED, detail)
            return
        info = CaseInfo.from_message(msg)
        if not self._call_sink(seq, f"case {msg.case_id} begin", self.sink.case_began, info):
            return
        if case is not None:
            self._emit(LinkEvent.CASE_ABANDONED, f"case {case.begin.case_id} never ended; {msg.case_id} began")
        self.ended.forget(msg.case_id)
        self.open = OpenCase(begin=msg)
        self._hello_since_begin = False
        self.replies.ack(seq, msg.case_id, -1)

    def on_tile(self, seq: int, tile: Tile, now: float) -> None:
        self._now = now
        case = self.open
        if case is None or case.begin.case_id != tile.case_id:
            detail = f"tile {tile.index}: case {tile.case_id} is not open (send CASE_BEGIN first)"
            self._problem(LinkEvent.UNKNOWN_CASE, detail)
            self.replies.nack(seq, NackReason.UNKNOWN_CASE, detail)
            return
        if tile.index in case.stored:
            self._duplicate(seq, tile.case_id, tile.index, f"tile {tile.index} of {tile.case_id}")
            return
        try:
            received = self._received(case.begin, tile)
        except TileDecodeError as exc:
            self.counters.bad_tiles += 1
            self._problem(LinkEvent.BAD_TILE, f"case {tile.case_id}: {exc}")
            self.replies.nack(seq, NackReason.BAD_TILE, str(exc))
            return
        if not self._call_sink(seq, f"tile {tile.index} of {tile.case_id}", self.sink.tile_received, received):
            return
        case.stored.add(tile.index)
        self.counters.tiles_stored += 1
        self.counters.tile_bytes += tile.w * tile.h * CHANNELS
        self.replies.ack(seq, tile.case_id, tile.index)

    def on_case_end(self, seq: int, msg: CaseEnd, now: float) -> bool:
        """Handle CASE_END; True if it ended the open case (not for a duplicate)."""
        self._now = now
        if msg.case_id in self.ended:
            self._duplicate(seq, msg.case_id, -1, f"CASE_END {msg.case_id}")
            return False
        case = self.open
        if case is None or case.begin.case_id != msg.case_id:
            detail = f"CASE_END for {msg.case_id}, which is not open"
            self._problem(LinkEvent.UNKNOWN_CASE, detail)
            self.replies.nack(seq, NackReason.UNKNOWN_CASE, detail)
            return False
        if len(case.stored) != msg.tile_count:
            self._emit(
                LinkEvent.CASE_INCOMPLETE,
                f"case {msg.case_id}: scanner reports {msg.tile_count} tiles, {len(case.stored)} stored",
            )
        if not self._call_sink(seq, f"case {msg.case_id} end", self.sink.case_ended, msg.case_id, msg.tile_count):
            return False
        self.open = None
        self.ended.add(msg.case_id, msg.tile_count)
        self.replies.ack(seq, msg.case_id, -1)
        return True

    def _received(self, begin: CaseBegin, tile: Tile) -> TileReceived:
        """What the sink gets for a tile: checked against its case, decoded (a JPEG only checked), hashed."""
        jpeg = tile.encoding == TileEncoding.JPEG
        check_tile_fits(begin, tile)
        if jpeg:
            check_jpeg(tile.payload, tile.w, tile.h, label=f"tile {tile.index}")
            pixels = None
        else:
            pixels = decode_tile_pixels(tile)
        payload = bytes(tile.payload) if jpeg else None
        digest = None
        if self.hash_tiles:
            # hashlib reads the (C-contiguous) array's buffer directly: no tobytes() copy.
            digest = hashlib.sha256(payload if jpeg else pixels).hexdigest()
        return TileReceived(
            tile.case_id, tile.index, tile.x, tile.y, tile.w, tile.h, decoded=pixels, jpeg=payload, sha256=digest,
            encoding=tile.encoding.name.lower(), payload_size=len(tile.payload),
        )

    def _call_sink(self, seq: int, what: str, method: Callable[..., None], *args: object) -> bool:
        """Run one sink call; if it raises, NACK STORAGE so the scanner retransmits, or NACK REFUSED if the
        sink raised CaseRefused (the scanner stops the case)."""
        try:
            method(*args)
        except CaseRefused as exc:
            self.counters.cases_refused += 1
            detail = f"{what}: {exc}"
            log.warning("sink refused, NACKing REFUSED: %s", detail)
            self._problem(LinkEvent.STORAGE_ERROR, detail)
            self.replies.nack(seq, NackReason.REFUSED, detail)
            return False
        except Exception as exc:  # noqa: BLE001 - the sink contract: any failure means "not stored"
            self.counters.storage_errors += 1
            detail = f"{what}: {type(exc).__name__}: {exc}"
            log.warning("sink failed, NACKing STORAGE: %s", detail, exc_info=exc)
            self._problem(LinkEvent.STORAGE_ERROR, detail)
            self.replies.nack(seq, NackReason.STORAGE, detail)
            return False
        return True

    def _refuse_case(self, seq: int, case_id: str, differences: str) -> None:
        self.counters.malformed += 1
        detail = (
            f"case {case_id} is already open with different fields ({differences}); "
            "end it with CASE_END or use a new case_id"
        )
        self._problem(LinkEvent.CASE_CONFLICT, detail)
        self.replies.nack(seq, NackReason.MALFORMED, detail)

    def _duplicate(self, seq: int, case_id: str, index: int, what: str) -> None:
        self.counters.duplicates += 1
        self._emit(LinkEvent.DUPLICATE, f"{what} already stored; ACKed again")
        self.replies.ack(seq, case_id, index)

    # Events are reported before the answer is written, so whoever sees the answer sees the event too.

    def _emit(self, kind: LinkEvent, detail: str) -> None:
        self.status.emit(kind, detail, self._now)

    def _problem(self, kind: LinkEvent, detail: str) -> None:
        self.status.problem(kind, detail, self._now)
