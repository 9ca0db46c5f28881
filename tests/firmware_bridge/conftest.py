"""Shared pieces for the firmware_bridge tests: a recording sink, a host on the real pty (tests/conftest.py's
`pty_pair`), a hand-driven scanner, H&E-like tiles."""

from __future__ import annotations

import threading
import time
from collections import Counter

import numpy as np
import pytest

from firmware_bridge.emulator import TileToSend
from firmware_bridge.frames import FrameReader
from firmware_bridge.host import HostLink
from firmware_bridge.sink import CaseInfo, TileReceived
from firmware_bridge.messages import CaseBegin, Message, message_from_frame, message_to_frame
from firmware_bridge.transport import FdTransport, open_port
from tests.ptys import PtyPair

TILE = 50
EDGE_H = 35


class RecordingSink:
    """A TileSink that keeps everything in memory and can fail on purpose."""

    def __init__(self, fail_first_attempt: frozenset[int] = frozenset()) -> None:
        self.fail_first_attempt = fail_first_attempt
        self.cases: list[CaseInfo] = []
        self.tiles: dict[int, TileReceived] = {}
        self.stores: Counter[int] = Counter()  # successful tile_received calls per index
        self.attempts: Counter[int] = Counter()
        self.ended: list[tuple[str, int]] = []
        self.events: list[tuple[str, str]] = []
        self.lock = threading.Lock()

    def case_began(self, info: CaseInfo) -> None:
        self.cases.append(info)

    def tile_received(self, tile: TileReceived) -> None:
        self.attempts[tile.index] += 1
        if tile.index in self.fail_first_attempt and self.attempts[tile.index] == 1:
            raise OSError(28, "No space left on device (simulated)")
        self.tiles[tile.index] = tile
        self.stores[tile.index] += 1

    def case_ended(self, case_id: str, tile_count: int) -> None:
        self.ended.append((case_id, tile_count))

    def link_event(self, kind: str, detail: str) -> None:
        with self.lock:
            self.events.append((kind, detail))

    def kinds(self) -> list[str]:
        with self.lock:
            return [kind for kind, _ in self.events]


@pytest.fixture
def sink() -> RecordingSink:
    return RecordingSink()


@pytest.fixture
def host(pty_pair: PtyPair, sink: RecordingSink):
    """A started HostLink on the pty slave, opened by path through pyserial like a real device."""
    link = HostLink(open_port(pty_pair.path, timeout=0.05), sink, read_timeout=0.05)
    link.start()
    yield link
    link.stop()


def he_tile(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Noisy pink eosin background with a few purple haematoxylin 'nuclei'."""
    base = np.array([232, 182, 205], dtype=np.float32)
    img = base + rng.normal(0, 12, size=(h, w, 3)).astype(np.float32)
    yy, xx = np.mgrid[0:h, 0:w]
    for _ in range(int(rng.integers(3, 9))):
        cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(2.5, 6.0)
        mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        img[mask] = np.array([92, 58, 148], dtype=np.float32) + rng.normal(0, 10, size=(int(mask.sum()), 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def he_case(case_id: str = "CASE-0001", *, cols: int = 6, rows: int = 5, seed: int = 7, tile: int = TILE):
    """A cols x rows grid of tile x tile tiles whose bottom row is shorter (50x35 by default).

    Returns (CaseBegin, tiles).
    """
    rng = np.random.default_rng(seed)
    edge = EDGE_H * tile // TILE
    tiles = []
    for r in range(rows):
        h = edge if r == rows - 1 else tile
        for c in range(cols):
            tiles.append(TileToSend(x=c * tile, y=r * tile, pixels=he_tile(rng, h, tile)))
    case = CaseBegin(
        case_id=case_id,
        specimen_id="S-2026-0042-A1",
        modality="brightfield-HE",
        microns_per_pixel=0.5,
        tile_width=tile,
        tile_height=tile,
        expected_tiles=len(tiles),
        image_width=cols * tile,
        image_height=(rows - 1) * tile + edge,
    )
    return case, tiles


class ScriptedScanner:
    """Hand-driven scanner end for host tests: send exact frames, read the host's answers."""

    def __init__(self, transport: FdTransport) -> None:
        self.transport = transport
        self.reader = FrameReader()
        self.seq = 100
        self._pending: list = []

    def send(self, msg: Message, seq: int | None = None) -> int:
        if seq is None:
            seq, self.seq = self.seq, self.seq + 1
        self.transport.write(message_to_frame(msg, seq))
        return seq

    def send_raw(self, data: bytes) -> None:
        self.transport.write(data)

    def expect(self, timeout: float = 3.0) -> Message:
        deadline = time.monotonic() + timeout
        while not self._pending:
            if time.monotonic() > deadline:
                raise AssertionError(f"no answer from the host within {timeout} s")
            data = self.transport.read(4096)
            if data:
                self._pending.extend(self.reader.feed(data))
        item = self._pending.pop(0)
        if isinstance(item, Exception):
            raise AssertionError(f"host sent an undecodable frame: {item}")
        return message_from_frame(item)


@pytest.fixture
def scanner(pty_pair: PtyPair) -> ScriptedScanner:
    return ScriptedScanner(pty_pair.scanner)


@pytest.fixture
def make_case():
    """he_case as a fixture, so test modules need not import conftest."""
    return he_case


@pytest.fixture
def make_sink():
    return RecordingSink
