"""The scanner's send window: frames awaiting their ACK and when each is due again (PROTOCOL.md 8.4, 8.5).

Bookkeeping only: no I/O, no threads, no clock. The caller passes the time in, writes the
frames the window hands back, and tells the window about each write with sent(). So the
retransmission rules (timeouts, NACK retries, the ordering rule, the CRC grace, giving up,
and HELLO's own retries, which no window holds) can be tested without a transport.
"""

from __future__ import annotations

import itertools
import logging
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

from firmware_bridge.codes import RETRYABLE_NACKS, NackReason
from firmware_bridge.errors import DeliveryError, LinkTimeoutError
from firmware_bridge.messages import Ack, Nack

__all__ = ["CRC_GRACE_SHARE", "HelloRetry", "Pending", "SendWindow", "check_window"]

log = logging.getLogger(__name__)

CRC_GRACE_SHARE = 0.25  # after an unknown-seq NACK, frames in flight wait this share of ack_timeout


def check_window(size: int, *, ack_timeout: float, max_retries: int) -> None:
    """Raise ValueError for a window size or retry budget no SendWindow can work with."""
    if size < 1:
        raise ValueError(f"window={size} must be at least 1")
    if max_retries < 0 or ack_timeout <= 0:
        raise ValueError("max_retries must be >= 0 and ack_timeout > 0")


@dataclass
class Pending:
    """A frame on the wire awaiting its ACK: its exact bytes, so a resend is the same frame."""

    seq: int
    label: str
    wire: bytes
    case_id: str
    tile_index: int = -1
    attempts: int = 0
    first_order: int = -1  # transmission counter value of the first and the latest write
    last_order: int = -1
    deadline: float = 0.0
    retry_scheduled: bool = False  # NACKed; resend at deadline instead of timing out
    last_nack: str = ""
    rejected: bool = False  # NACKed for good (BAD_TILE, say): out of the window, the case goes on


class SendWindow:
    """At most `size` frames in flight, keyed by seq, plus tiles parked while the cable is out."""

    def __init__(self, size: int, *, ack_timeout: float, max_retries: int, retry_delay: float) -> None:
        check_window(size, ack_timeout=ack_timeout, max_retries=max_retries)
        self.size = size  # lowered to the host's window after HELLO
        self.ack_timeout = ack_timeout
        self.max_retries = max_retries
        self.retry_delay = retry_delay
        self.in_flight: dict[int, Pending] = {}
        self.parked: deque[Pending] = deque()  # unACKed tiles waiting for the link to come back
        self._order = itertools.count()

    def __len__(self) -> int:
        return len(self.in_flight)

    def __contains__(self, seq: object) -> bool:
        return seq in self.in_flight

    @property
    def has_room(self) -> bool:
        return len(self.in_flight) < self.size

    @property
    def empty(self) -> bool:
        """Nothing in flight and nothing parked: every frame is ACKed or given up."""
        return not self.in_flight and not self.parked

    def add(self, seq: int, label: str, wire: bytes, case_id: str, tile_index: int = -1) -> Pending:
        """Put a new frame in flight; the caller writes it and then calls sent()."""
        pending = Pending(seq=seq, label=label, wire=wire, case_id=case_id, tile_index=tile_index)
        self.in_flight[seq] = pending
        return pending

    def unpark(self) -> Pending | None:
        """Move the lowest parked tile back in flight (same frame, same seq), if any."""
        if not self.parked:
            return None
        pending = self.parked.popleft()
        self.in_flight[pending.seq] = pending
        return pending

    def sent(self, p: Pending, now: float) -> bool:
        """Record one transmission of p at `now`; True if it was a retransmission."""
        resend = p.attempts > 0
        p.attempts += 1
        p.last_order = next(self._order)
        if p.first_order < 0:
            p.first_order = p.last_order
        p.retry_scheduled = False
        p.deadline = now + self.ack_timeout
        return resend

    def on_ack(self, ack: Ack) -> Pending | None:
        """Take the ACKed frame out of the window and return it; None for a stray ACK."""
        p = self.in_flight.get(ack.acked_seq)
        if p is None or ack.case_id != p.case_id or ack.tile_index != p.tile_index:
            log.debug("stray ACK %s ignored", ack)
            return None
        del self.in_flight[p.seq]
        return p

    def on_nack(self, nack: Nack, now: float) -> Pending | None:
        """Apply a NACK; return the frame it names (p.rejected if the window gave up on it), or None.

        Raises DeliveryError when the NACK ends the case (PROTOCOL.md 8.3).
        """
        p = self.in_flight.get(nack.seq)
        if p is None:
            # Unknown seq: the host read a damaged frame, one of those now in flight. The
            # ordering rule finds it as soon as a later frame is answered; if none is (it
            # was the last one sent), waiting the full ack_timeout would stall the case,
            # so every frame sent before this NACK gets a short grace instead.
            grace = now + self.ack_timeout * CRC_GRACE_SHARE
            for q in self.in_flight.values():
                if not q.retry_scheduled:
                    q.deadline = min(q.deadline, grace)
            return None
        p.last_nack = f"{nack.reason.name}: {nack.detail}"
        if nack.reason in RETRYABLE_NACKS:
            if p.attempts > self.max_retries:
                raise DeliveryError(f"the host refused {p.label} {p.attempts} times; last: {p.last_nack}")
            p.retry_scheduled = True
            p.deadline = now + (0.0 if nack.reason == NackReason.CRC else self.retry_delay)
        elif p.tile_index >= 0 and nack.reason not in (NackReason.UNKNOWN_CASE, NackReason.REFUSED):
            # One undeliverable tile should not lose the rest of the case; the host sees the
            # gap in CASE_END's tile_count and the result lists it.
            del self.in_flight[p.seq]
            p.rejected = True
        else:
            raise DeliveryError(f"the host refused {p.label}: {p.last_nack}")
        return p

    def overtaken(self, answered: Pending) -> list[Pending]:
        """Frames to resend now because an answer overtook theirs (the ordering rule, 8.5).

        The host handles frames strictly in arrival order and the line is FIFO both ways,
        so any frame last written before `answered` was first written is lost (or its
        answer was), and waiting for its timeout would only stall the window. One out of
        retries is left to due(), which reports it.
        """
        return [
            p
            for p in self.in_flight.values()
            if p is not answered
            and not p.retry_scheduled
            and p.last_order < answered.first_order
            and p.attempts <= self.max_retries
        ]

    def due(self, now: float) -> Iterator[tuple[Pending, bool]]:
        """Yield (frame, timed_out) for each frame whose deadline has passed, for the caller to resend.

        timed_out is False for a resend a NACK scheduled. Lazily, in window order: on reaching
        a frame out of retries it raises LinkTimeoutError (no answers) or DeliveryError (NACKed
        every time), after the caller has resent the frames before it.
        """
        for p in list(self.in_flight.values()):
            if p.deadline > now:
                continue
            if p.attempts > self.max_retries:
                if p.retry_scheduled:
                    raise DeliveryError(f"the host refused {p.label} {p.attempts} times; last: {p.last_nack}")
                raise LinkTimeoutError(
                    f"no answer for {p.label} (seq {p.seq}) after {p.attempts} transmissions, "
                    f"{self.ack_timeout} s each"
                )
            yield p, not p.retry_scheduled

    def nearest_deadline(self, default: float) -> float:
        return min((p.deadline for p in self.in_flight.values()), default=default)

    def park_tiles(self) -> None:
        """The cable went: keep every unACKed tile, in index order, to resend after the resume.

        CASE_BEGIN / CASE_END in flight are dropped: the scanner session sends them again itself.
        Parked tiles start their retry budget afresh on the new connection.
        """
        tiles = [p for p in self.in_flight.values() if p.tile_index >= 0]
        for p in tiles:
            p.attempts = 0
            p.retry_scheduled = False
        self.parked = deque(sorted([*tiles, *self.parked], key=lambda p: p.tile_index))
        self.in_flight.clear()


class HelloRetry:
    """When to resend HELLO and when to give up on the host (PROTOCOL.md 8.1, 8.5 timers, 8.8).

    First contact: ack_timeout apart, at most 1 + max_retries HELLOs. After a replug the
    host is reopening the device with its own backoff, so start at `initial`, double up to
    ack_timeout, and keep trying for reconnect_timeout.
    """

    def __init__(
        self,
        *,
        resuming: bool,
        ack_timeout: float,
        max_retries: int,
        reconnect_timeout: float,
        initial: float,
        now: float,
    ) -> None:
        self.resuming = resuming
        self.ack_timeout = ack_timeout
        self.max_retries = max_retries
        self.reconnect_timeout = reconnect_timeout
        self.attempts = 0
        self._interval = min(initial, ack_timeout) if resuming else ack_timeout
        self._give_up = now + reconnect_timeout

    def next_wait(self, now: float, where: str) -> float:
        """Count the HELLO about to be sent; return how long to wait for the host's answer to it.

        Raises LinkTimeoutError when no HELLO is left to send; `where` names the transport.
        """
        if self.resuming and now >= self._give_up:
            raise LinkTimeoutError(
                f"the host did not answer HELLO within {self.reconnect_timeout} s after the "
                f"cable was plugged back in ({self.attempts} attempts) on {where}"
            )
        if not self.resuming and self.attempts > self.max_retries:
            raise LinkTimeoutError(
                f"the host did not answer HELLO after {self.attempts} attempts "
                f"{self.ack_timeout} s apart on {where}: is the daemon running on the other end?"
            )
        self.attempts += 1
        wait = self._interval
        if self.resuming:
            self._interval = min(self._interval * 2, self.ack_timeout)
        return wait
