"""Noisy cases over a real pty behind a PtyCable: bit flips, dropped bytes, truncated, duplicated and
reordered frames and pulled cables, mixed from one seed. Every tile must arrive exactly once, and
the sha256 of its pixels at the host must equal the emulator's (for jpeg: of what the emulator
decodes from its own payload)."""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass, field

import pytest

from firmware_bridge.emulator import ScannerEmulator
from firmware_bridge.faults import FaultKind, Faults
from firmware_bridge.host import HostLink
from firmware_bridge.sink import CaseInfo, TileReceived
from firmware_bridge.ptycable import PtyCable

from .conftest import he_case

ENCODINGS = ["raw", "zlib", "png", "jpeg"]


class CaseSink:
    """Remembers every stored tile of every case by (case_id, index) with its sha256."""

    def __init__(self) -> None:
        self.began: Counter[str] = Counter()
        self.ended: Counter[str] = Counter()
        self.stores: Counter[tuple[str, int]] = Counter()
        self.digests: dict[tuple[str, int], str] = {}

    def case_began(self, info: CaseInfo) -> None:
        self.began[info.case_id] += 1

    def tile_received(self, tile: TileReceived) -> None:
        self.stores[(tile.case_id, tile.index)] += 1
        self.digests[(tile.case_id, tile.index)] = tile.sha256

    def case_ended(self, case_id: str, tile_count: int) -> None:
        self.ended[case_id] += 1


@dataclass
class NoisyRun:
    cases: int = 0
    tiles: int = 0
    frames_written: int = 0
    retransmits: int = 0
    timeouts: int = 0
    disconnects: int = 0
    seconds: float = 0.0
    faults: dict[str, int] = field(default_factory=dict)
    host: dict[str, object] = field(default_factory=dict)

    @property
    def total_faults(self) -> int:
        return sum(self.faults.values())


def run_noisy_cases(tmp_path, *, min_faults: int, rate: float, seed: int, tiles_per_case: tuple[int, int],
                    tile: int, max_cases: int) -> NoisyRun:
    """Run cases (cycling encodings) until min_faults faults were injected; check each case as it ends."""
    cols, rows = tiles_per_case
    sink = CaseSink()
    faults = Faults(rate, seed=seed)
    run = NoisyRun()
    started = time.monotonic()
    with PtyCable(tmp_path / "scanner") as cable, HostLink(cable.path, sink, read_timeout=0.05) as host:
        while faults.total < min_faults:
            assert run.cases < max_cases, f"only {faults.total} faults after {run.cases} cases"
            n = run.cases
            case, tiles = he_case(f"NOISY-{seed}-{n:04d}", cols=cols, rows=rows, seed=seed * 1000 + n, tile=tile)
            emulator = ScannerEmulator(
                cable, case, tiles, encoding=ENCODINGS[n % len(ENCODINGS)], faults=faults,
                ack_timeout=0.1, max_retries=60, replug_delay=0.01, keep_digests=True,
            )
            result = emulator.run()
            assert host.wait_case_end(30) == case.case_id
            # Exactly once, bit-identical, for this case.
            assert sink.began[case.case_id] == 1 and sink.ended[case.case_id] == 1
            stored = sorted(index for (cid, index) in sink.stores if cid == case.case_id)
            assert stored == list(range(len(tiles))), f"{case.case_id}: missing {set(range(len(tiles))) - set(stored)}"
            assert all(sink.stores[(case.case_id, i)] == 1 for i in stored)
            assert all(sink.digests[(case.case_id, i)] == result.digests[i] for i in stored)
            assert result.rejected == {} and sorted(result.acked) == stored
            run.cases += 1
            run.tiles += len(tiles)
            run.frames_written += result.frames_written
            run.retransmits += result.retransmits
            run.timeouts += result.timeouts
            run.disconnects += result.disconnects
        run.host = host.snapshot()
    run.seconds = time.monotonic() - started
    run.faults = dict(faults.counts)
    assert run.disconnects == faults.counts[FaultKind.DISCONNECT]
    assert 1 <= run.host["reconnects"] <= run.disconnects
    assert run.host["bad_tiles"] == run.host["storage_errors"] == 0
    assert all(count > 0 for count in run.faults.values()), run.faults  # every kind, disconnects included
    print(f"\nnoisy run: {json.dumps({**run.__dict__, 'total_faults': run.total_faults}, default=str)}")
    return run


def test_a_few_hundred_mixed_faults_lose_and_duplicate_nothing(tmp_path) -> None:
    run = run_noisy_cases(tmp_path, min_faults=300, rate=0.3, seed=2026, tiles_per_case=(10, 8), tile=32, max_cases=40)
    assert run.total_faults >= 300


@pytest.mark.slow
def test_ten_thousand_mixed_faults_lose_and_duplicate_nothing(tmp_path) -> None:
    run = run_noisy_cases(
        tmp_path, min_faults=10_000, rate=0.35, seed=7, tiles_per_case=(16, 12), tile=32, max_cases=400
    )
    assert run.total_faults >= 10_000
