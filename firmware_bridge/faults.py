"""Byte-level fault injection for the emulator: hardware faults simulated on the wire, reproducibly.

The emulator hands every frame it writes to Faults.apply(), which decides from its seeded
random generator whether that write is damaged and how. The same seed and the same
sequence of writes give the same faults; which frames a run writes still depends on
timing (a retransmission after a timeout is an extra write), so two runs of a noisy case
are alike in distribution, not byte for byte.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from enum import StrEnum
from typing import Iterable, Mapping

import numpy as np


class FaultKind(StrEnum):
    BIT_FLIP = "bit_flip"  # 1-3 bits of the frame inverted (noise on the line)
    DROP = "drop"  # 1-8 bytes of the frame lost (a UART overrun); may take the delimiter
    TRUNCATE = "truncate"  # the frame's tail lost, delimiter included: it runs into the next one
    DUPLICATE = "duplicate"  # the frame arrives twice (a USB retry after a lost handshake)
    REORDER = "reorder"  # the frame arrives after the next one
    DISCONNECT = "disconnect"  # the cable is pulled part-way through the frame


# Disconnects are rare and slow to recover from (reopen, HELLO, resume); weighting them
# low keeps a noisy run mostly about the other kinds while still pulling the cable often.
DEFAULT_WEIGHTS: Mapping[FaultKind, float] = {
    FaultKind.BIT_FLIP: 4.0,
    FaultKind.DROP: 2.0,
    FaultKind.TRUNCATE: 2.0,
    FaultKind.DUPLICATE: 2.0,
    FaultKind.REORDER: 2.0,
    FaultKind.DISCONNECT: 0.25,
}


@dataclass(frozen=True)
class Injection:
    """What to do with one frame write: send data (may be empty), then maybe pull the cable."""

    data: bytes
    kind: FaultKind | None = None
    disconnect: bool = False


class Faults:
    """Damage each frame write with probability rate, choosing a kind by weight, from a seed.

    counts holds how many faults of each kind were injected; total is their sum. A
    DISCONNECT is only chosen when the caller says the transport can be unplugged, and a
    REORDER only when no frame is already held back, so the other kinds take their share.
    """

    def __init__(
        self,
        rate: float,
        seed: int = 0,
        *,
        kinds: Iterable[FaultKind | str] | None = None,
        weights: Mapping[FaultKind | str, float] | None = None,
    ) -> None:
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"fault rate {rate} must be between 0 and 1 (the share of frames damaged)")
        chosen = [FaultKind(k) for k in kinds] if kinds is not None else list(FaultKind)
        if not chosen:
            raise ValueError("at least one fault kind is needed")
        table = {FaultKind(k): float(w) for k, w in (weights or DEFAULT_WEIGHTS).items()}
        self.weights = {k: table.get(k, 1.0) for k in chosen}
        if any(w < 0 for w in self.weights.values()) or not any(self.weights.values()):
            raise ValueError(f"fault weights {self.weights} must be >= 0 and not all 0")
        self.rate = rate
        self.seed = seed
        self.counts: Counter[str] = Counter({str(k): 0 for k in chosen})
        self._rng = np.random.default_rng(seed)
        self._held: bytes | None = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(rate={self.rate}, seed={self.seed}, counts={dict(self.counts)})"

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def holding(self) -> bool:
        """True while a REORDER keeps a frame back; release() or the next write sends it."""
        return self._held is not None

    def release(self) -> bytes:
        """The frame held back by a REORDER (b"" if none); it is no longer held."""
        held, self._held = self._held, None
        return held or b""

    def discard(self) -> None:
        """Forget a held frame: the cable it was waiting for is gone."""
        self._held = None

    def apply(self, wire: bytes, *, can_disconnect: bool = False) -> Injection:
        """Decide what happens to one frame write."""
        kind = self._draw(len(wire), can_disconnect)
        if kind is None:
            return Injection(wire + self.release())
        self.counts[str(kind)] += 1
        if kind == FaultKind.REORDER:
            self._held = wire
            return Injection(b"", kind)
        if kind == FaultKind.DISCONNECT:
            self.discard()
            return Injection(wire[: int(self._rng.integers(0, len(wire)))], kind, disconnect=True)
        return Injection(self._damage(kind, wire) + self.release(), kind)

    # --- internals ---------------------------------------------------------------------

    def _draw(self, size: int, can_disconnect: bool) -> FaultKind | None:
        if self.rate <= 0.0 or self._rng.random() >= self.rate:
            return None
        options = [
            k
            for k, w in self.weights.items()
            if w > 0
            and (k != FaultKind.DISCONNECT or can_disconnect)
            and (k != FaultKind.REORDER or self._held is None)
            and (k not in (FaultKind.TRUNCATE, FaultKind.DROP) or size > 1)
        ]
        if not options:
            return None
        p = np.array([self.weights[k] for k in options])
        return options[int(self._rng.choice(len(options), p=p / p.sum()))]

    def _damage(self, kind: FaultKind, wire: bytes) -> bytes:
        rng = self._rng
        if kind == FaultKind.BIT_FLIP:
            out = bytearray(wire)
            for pos in rng.choice(len(wire) * 8, size=min(int(rng.integers(1, 4)), len(wire) * 8), replace=False):
                out[int(pos) >> 3] ^= 1 << (int(pos) & 7)
            return bytes(out)
        if kind == FaultKind.DROP:
            keep = np.ones(len(wire), dtype=bool)
            keep[rng.choice(len(wire), size=min(int(rng.integers(1, 9)), len(wire) - 1), replace=False)] = False
            return np.frombuffer(wire, dtype=np.uint8)[keep].tobytes()
        if kind == FaultKind.TRUNCATE:
            return wire[: int(rng.integers(1, len(wire)))]
        if kind == FaultKind.DUPLICATE:
            return wire + wire
        raise ValueError(f"{kind} is not a byte-damage fault")


class BitFlipFaults(Faults):
    """Flip each bit independently with probability rate; the same seed gives the same flips.

    The original v1 fault model, kept for callers that pass a per-bit rate (3e-6 damages
    about one raw 50x50 tile frame in six). counts["bit_flip"] counts damaged frames.
    """

    def __init__(self, rate: float, seed: int = 0) -> None:
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"bit-flip rate {rate} must be between 0 and 1")
        super().__init__(rate, seed, kinds=[FaultKind.BIT_FLIP])
        self.flips = 0  # bits flipped so far
        self.frames_damaged = 0

    def apply(self, wire: bytes, *, can_disconnect: bool = False) -> Injection:
        out = self.mutate(wire)
        return Injection(out, FaultKind.BIT_FLIP if out is not wire else None)

    def mutate(self, data: bytes) -> bytes:
        nbits = len(data) * 8
        count = int(self._rng.binomial(nbits, self.rate)) if nbits else 0
        if count == 0:
            return data
        positions = self._rng.choice(nbits, size=count, replace=False)
        out = bytearray(data)
        for pos in positions.tolist():
            out[pos >> 3] ^= 1 << (pos & 7)
        self.flips += count
        self.frames_damaged += 1
        self.counts[str(FaultKind.BIT_FLIP)] += 1
        return bytes(out)
