"""The host's answers to one frame from the scanner, as HostSession decides them, and the frames that carry them.

Each answer (ACK, NACK, ERROR, HELLO, HEARTBEAT) goes in a frame of its own with the host's
next seq; Replies collects them while the session handles one frame and hands them over as one
Answer for the port keeper to write (PROTOCOL.md 8.2, 8.3).
"""

from __future__ import annotations

from dataclasses import dataclass

from firmware_bridge.codec import STR16_MAX
from firmware_bridge.codes import ErrorCode, NackReason
from firmware_bridge.frames import UNKNOWN_SEQ
from firmware_bridge.messages import Ack, ErrorMessage, Message, Nack, clip_text, message_to_frame
from firmware_bridge.status import LinkCounters

__all__ = ["Answer", "Replies"]


@dataclass(frozen=True)
class Answer:
    """What the session made of one frame (or damaged chunk), for the port keeper to carry out in order:
    write `wire`, then, if a case ended, tell whoever waits for it."""

    messages: tuple[Message, ...] = ()  # the answers, as written in wire
    wire: bytes = b""
    case_ended: str | None = None  # case_id whose CASE_END this frame was (first time only)
    scanner_hello: bool = False  # a scanner HELLO was answered: the port demonstrably works


class Replies:
    """The host's outgoing seq and the answers to the frame being handled; ACKs and NACKs are counted as made."""

    def __init__(self, counters: LinkCounters) -> None:
        self.counters = counters
        self._seq = 0
        self._pending: list[tuple[Message, bytes]] = []

    def ack(self, seq: int, case_id: str, index: int) -> None:
        self.counters.acks_sent += 1
        self.send(Ack(acked_seq=seq, case_id=case_id, tile_index=index))

    def nack(self, seq: int, reason: NackReason, detail: str) -> None:
        self.counters.nacks_sent += 1
        self.send(Nack(seq=seq, reason=reason, detail=clip_text(detail)))

    def error(self, code: ErrorCode, text: str, *, peer_max_payload: int) -> None:
        """ERROR with its text clipped to what the scanner can receive: a small scanner may announce a
        max_payload of a few hundred bytes, and must never get a frame it has to drop."""
        room = peer_max_payload - ErrorMessage.LAYOUT.size - 2
        self.send(ErrorMessage(code, clip_text(text, max(0, min(STR16_MAX, room)))))

    def send(self, msg: Message, *, prefix: bytes = b"") -> None:
        seq = self._seq
        self._seq = (self._seq + 1) % UNKNOWN_SEQ  # never emit the reserved value
        self._pending.append((msg, prefix + message_to_frame(msg, seq)))

    def take(self, *, case_ended: str | None = None, scanner_hello: bool = False) -> Answer:
        """The answers collected since the last take(), as one Answer; collecting starts afresh."""
        pending, self._pending = self._pending, []
        return Answer(
            messages=tuple(msg for msg, _ in pending),
            wire=b"".join(wire for _, wire in pending),
            case_ended=case_ended,
            scanner_hello=scanner_hello,
        )
