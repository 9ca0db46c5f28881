"""Byte-level fault injection for the emulator: hardware faults simulated on the wire, reproducibly."""

from __future__ import annotations

from typing import Protocol

import numpy as np


class Faults(Protocol):
    """Anything that may damage outgoing bytes. Called once per frame written, in order.

    Later fault kinds (dropped bytes, inserted garbage, unplugs) fit the same hook: they
    return a different byte string, or raise TransportError to simulate a dead line.
    """

    def mutate(self, data: bytes) -> bytes: ...


class BitFlipFaults:
    """Flip each bit independently with probability rate; the same seed gives the same flips."""

    def __init__(self, rate: float, seed: int = 0) -> None:
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"bit-flip rate {rate} must be between 0 and 1")
        self.rate = rate
        self.seed = seed
        self._rng = np.random.default_rng(seed)
        self.flips = 0  # bits flipped so far
        self.frames_damaged = 0

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
        return bytes(out)
