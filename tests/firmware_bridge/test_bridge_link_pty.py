"""End to end over a real pseudo-terminal: ScannerEmulator on the master, HostLink on the slave via pyserial."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import threading

import numpy as np
import pytest

from firmware_bridge.emulator import ScannerEmulator, TileOnDemand, TileToSend
from firmware_bridge.errors import LinkTimeoutError
from firmware_bridge.faults import BitFlipFaults
from firmware_bridge.host import HostLink
from firmware_bridge.sink import CaseInfo
from firmware_bridge.messages import CaseBegin
from firmware_bridge.transport import open_port
from tests.ptys import open_pty


def _assert_delivered_exactly_once(sink, case: CaseBegin, tiles: list[TileToSend], result) -> None:
    assert sink.cases == [CaseInfo.from_message(case)]
    assert sink.ended == [(case.case_id, len(tiles))]
    assert sorted(sink.tiles) == list(range(len(tiles)))
    assert all(count == 1 for count in sink.stores.values()), sink.stores
    for index, sent in enumerate(tiles):
        got = sink.tiles[index]
        assert (got.case_id, got.x, got.y) == (case.case_id, sent.x, sent.y)
        np.testing.assert_array_equal(got.pixels, sent.pixels)
        assert got.sha256 == hashlib.sha256(sent.pixels.tobytes()).hexdigest()
    assert sorted(result.acked) == list(range(len(tiles)))
    assert result.rejected == {}
    assert result.tiles_sent == len(tiles)


@pytest.mark.parametrize("encoding", ["raw", "zlib", "png"])
def test_every_tile_arrives_once_with_identical_pixels(host, pty_pair, sink, make_case, encoding) -> None:
    case, tiles = make_case(f"CASE-{encoding}")
    assert {t.pixels.shape for t in tiles} == {(50, 50, 3), (35, 50, 3)}
    progress: list[tuple[int, int, int | None]] = []
    emulator = ScannerEmulator(
        pty_pair.scanner, case, tiles, encoding=encoding, ack_timeout=2.0, progress=lambda *a: progress.append(a)
    )
    result = emulator.run()
    assert host.wait_case_end(5) == case.case_id
    _assert_delivered_exactly_once(sink, case, tiles, result)
    assert progress[-1] == (30, 30, 30)
    assert host.counters.crc_errors == 0 and host.counters.bad_tiles == 0


def test_tiles_read_on_demand_are_read_when_sent_and_arrive_identical(host, pty_pair, sink, make_case) -> None:
    """`appliance emulate SLIDE`: each tile's pixels come from their source when the tile is sent."""
    case, tiles = make_case("CASE-LAZY")
    reads: list[int] = []

    def source(i: int) -> np.ndarray:
        reads.append(i)
        return tiles[i].pixels

    lazy = [TileOnDemand(t.x, t.y, t.w, t.h, lambda i=i: source(i)) for i, t in enumerate(tiles)]
    emulator = ScannerEmulator(pty_pair.scanner, case, lazy, encoding="zlib", ack_timeout=2.0)
    assert reads == []  # nothing read before the link is up
    result = emulator.run()
    assert host.wait_case_end(5) == case.case_id
    _assert_delivered_exactly_once(sink, case, tiles, result)
    assert sorted(set(reads)) == list(range(len(tiles)))
    assert reads == sorted(reads)  # in sending order, one tile after another


def test_bit_flips_on_the_wire_still_deliver_every_tile_once(host, pty_pair, sink, make_case) -> None:
    case, tiles = make_case("CASE-NOISY")
    faults = BitFlipFaults(rate=3e-6, seed=2026)  # ~1 in 6 raw tile frames damaged
    emulator = ScannerEmulator(
        pty_pair.scanner, case, tiles, encoding="raw", ack_timeout=0.5, max_retries=10, faults=faults
    )
    result = emulator.run()
    assert host.wait_case_end(5) == case.case_id
    _assert_delivered_exactly_once(sink, case, tiles, result)
    assert faults.flips > 0
    assert host.counters.crc_errors > 0
    assert result.retransmits > 0
    assert "crc-error" in sink.kinds()


def test_storage_failure_is_nacked_retransmitted_and_stored_once(pty_pair, make_sink, make_case) -> None:
    sink = make_sink(fail_first_attempt=frozenset({7}))
    case, tiles = make_case("CASE-DISKFULL")
    with HostLink(open_port(pty_pair.path, timeout=0.05), sink) as host:
        result = ScannerEmulator(pty_pair.scanner, case, tiles, encoding="zlib", ack_timeout=2.0).run()
        assert host.wait_case_end(5) == case.case_id
    _assert_delivered_exactly_once(sink, case, tiles, result)
    assert sink.attempts[7] == 2 and sink.stores[7] == 1
    assert host.counters.storage_errors == 1 and host.counters.nacks_sent == 1
    assert result.nacks_received == 1 and result.retransmits >= 1
    assert "storage-error" in sink.kinds()


def test_a_tile_the_host_cannot_place_is_rejected_and_the_case_still_ends(host, pty_pair, sink, make_case) -> None:
    case, tiles = make_case("CASE-OVERHANG")
    stray = TileToSend(x=case.image_width - 10, y=0, pixels=tiles[0].pixels)  # overhangs the right edge
    tiles = [*tiles[:3], stray, *tiles[4:]]
    result = ScannerEmulator(pty_pair.scanner, case, tiles, ack_timeout=2.0).run()
    assert host.wait_case_end(5) == case.case_id
    assert list(result.rejected) == [3] and result.rejected[3].startswith("BAD_TILE: tile 3: x 290 + w 50")
    assert sorted(sink.tiles) == [i for i in range(len(tiles)) if i != 3]
    assert ("case-incomplete", f"case {case.case_id}: scanner reports 30 tiles, 29 stored") in sink.events


def test_emulator_gives_up_when_nobody_answers(make_case) -> None:
    with open_pty(raw=True) as pty:  # nobody reads the slave; raw so the line discipline does not echo us back
        case, tiles = make_case()
        emulator = ScannerEmulator(pty.transport(timeout=0.02), case, tiles, ack_timeout=0.05, max_retries=2)
        with pytest.raises(LinkTimeoutError, match="did not answer HELLO after 3 attempts"):
            emulator.run()
        assert emulator.result.frames_written == 3


def test_emulator_can_run_in_a_thread_while_the_test_waits_on_the_host(host, pty_pair, sink, make_case) -> None:
    case, tiles = make_case("CASE-THREAD", cols=3, rows=2)
    failures: list[BaseException] = []

    def scan() -> None:
        try:
            ScannerEmulator(pty_pair.scanner, case, iter(tiles), encoding="png").run()
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            failures.append(exc)

    worker = threading.Thread(target=scan)
    worker.start()
    assert host.wait_case_end(10) == case.case_id
    worker.join(10)
    assert failures == [] and len(sink.tiles) == 6


def test_jpeg_tiles_arrive_once_as_the_scanner_itself_decodes_them(host, pty_pair, sink, make_case) -> None:
    case, tiles = make_case("CASE-JPEG")
    result = ScannerEmulator(pty_pair.scanner, case, tiles, encoding="jpeg", keep_digests=True).run()
    assert host.wait_case_end(5) == case.case_id
    assert sorted(sink.tiles) == list(range(len(tiles))) and set(sink.stores.values()) == {1}
    for index, sent in enumerate(tiles):
        got = sink.tiles[index]
        assert got.encoding == "jpeg" and got.sha256 == result.digests[index]
        # Lossy, but close: these synthetic tiles carry per-pixel noise of sigma 12, which
        # JPEG smooths; the error stays below the noise.
        assert np.abs(got.pixels.astype(int) - sent.pixels.astype(int)).mean() < 12
        assert got.payload_size < sent.pixels.nbytes / 2


def test_scanner_refuses_an_encoding_the_host_did_not_offer(pty_pair, sink, make_case) -> None:
    from firmware_bridge.errors import NegotiationError
    from firmware_bridge.messages import Capability

    case, tiles = make_case("CASE-NOJPEG")
    with HostLink(open_port(pty_pair.path, timeout=0.05), sink, capabilities=Capability.ZLIB | Capability.PNG):
        with pytest.raises(NegotiationError, match="does not accept jpeg tiles"):
            ScannerEmulator(pty_pair.scanner, case, tiles, encoding="jpeg").run()
    assert sink.cases == []


def test_a_newer_scanner_negotiates_down_to_version_1(host, scanner, sink) -> None:
    from firmware_bridge.messages import Hello, Role

    # A future v3 scanner: HELLO layout frozen, extra fields appended, unknown capability bits.
    scanner.send_raw(b"\x00")
    wire_hello = Hello(3, Role.SCANNER, 8, 1 << 20)
    scanner.send(wire_hello)
    reply = scanner.expect()
    assert isinstance(reply, Hello) and reply.version == 1
    assert host.snapshot()["peer"]["negotiated_version"] == 1
    assert any(kind == "up" and "scanner speaks v3 (using v1)" in detail for kind, detail in sink.events)


def test_mixed_faults_on_a_port_that_cannot_be_unplugged(host, pty_pair, sink, make_case) -> None:
    from firmware_bridge.faults import Faults

    case, tiles = make_case("CASE-MIXED")
    faults = Faults(0.3, seed=99)  # what `appliance emulate --faults 0.3 --seed 99` builds
    result = ScannerEmulator(
        pty_pair.scanner, case, tiles, encoding="zlib", faults=faults, ack_timeout=0.2, max_retries=30
    ).run()
    assert host.wait_case_end(5) == case.case_id
    _assert_delivered_exactly_once(sink, case, tiles, result)
    assert faults.total > 5 and faults.counts["disconnect"] == 0 and result.disconnects == 0


def test_the_accession_reaches_a_host_that_announced_it(host, pty_pair, sink, make_case) -> None:
    from firmware_bridge.messages import Capability

    case, tiles = make_case("CASE-ACC", cols=3, rows=2)
    case = dataclasses.replace(case, accession="ACC-2026-00417")
    result = ScannerEmulator(pty_pair.scanner, case, tiles, encoding="zlib").run()
    assert host.wait_case_end(5) == case.case_id
    _assert_delivered_exactly_once(sink, case, tiles, result)
    assert sink.cases[0].accession == "ACC-2026-00417"
    assert Capability.ACCESSION in host.peer.capabilities  # the scanner announces it too


def test_a_host_without_accession_gets_the_case_without_it(pty_pair, sink, make_case, caplog) -> None:
    from firmware_bridge.messages import Capability
    from firmware_bridge.session import HOST_CAPABILITIES

    case, tiles = make_case("CASE-OLDHOST", cols=3, rows=2)
    case = dataclasses.replace(case, accession="ACC-2026-00418")
    older = HOST_CAPABILITIES & ~Capability.ACCESSION  # a revision 1.2 host
    with caplog.at_level(logging.WARNING, logger="firmware_bridge.scanner_session"):
        with HostLink(open_port(pty_pair.path, timeout=0.05), sink, capabilities=older) as host:
            result = ScannerEmulator(pty_pair.scanner, case, tiles, encoding="zlib").run()
            assert host.wait_case_end(5) == case.case_id
    # This host would have read an accession had one come: "" proves the scanner left it out.
    _assert_delivered_exactly_once(sink, dataclasses.replace(case, accession=""), tiles, result)
    assert any(
        "host cannot take accession numbers" in r.getMessage() and "ACC-2026-00418" in r.getMessage()
        for r in caplog.records if r.levelno == logging.WARNING
    ), caplog.text
