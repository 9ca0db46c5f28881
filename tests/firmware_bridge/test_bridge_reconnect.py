"""Unplug and replug over a real pty behind a stable symlink: the host reopens the same path with
backoff, the scanner resumes the case, and every tile is stored exactly once."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import threading
import time

import numpy as np
import pytest

from firmware_bridge.emulator import ScannerEmulator
from firmware_bridge.errors import LinkLostError
from firmware_bridge.faults import FaultKind, Faults, Injection
from firmware_bridge.frames import cobs_decode
from firmware_bridge.host import HostLink
from firmware_bridge.sink import CaseInfo
from firmware_bridge.messages import (
    Ack, CaseBegin, Capability, Hello, MsgType, Nack, NackReason, Role, Tile, TileEncoding,
)
from firmware_bridge.pixels import encode_pixels
from firmware_bridge.ptycable import PtyCable
from tests.waiting import wait_until

from .conftest import RecordingSink, ScriptedScanner


class SlowSink(RecordingSink):
    """Storage that takes a little while, so a case lasts long enough to pull the cable mid-way."""

    def __init__(self, delay: float) -> None:
        super().__init__()
        self.delay = delay

    def tile_received(self, tile) -> None:
        time.sleep(self.delay)
        super().tile_received(tile)


def _assert_exactly_once(sink: RecordingSink, case: CaseBegin, tiles, result) -> None:
    assert sink.cases == [CaseInfo.from_message(case)]  # case_began once, not again on resume
    assert sink.ended == [(case.case_id, len(tiles))]
    assert sorted(sink.tiles) == list(range(len(tiles)))
    assert set(sink.stores.values()) == {1}, sink.stores
    for index, sent in enumerate(tiles):
        assert sink.tiles[index].sha256 == hashlib.sha256(sent.pixels.tobytes()).hexdigest()
        np.testing.assert_array_equal(sink.tiles[index].pixels, sent.pixels)
    assert sorted(result.acked) == list(range(len(tiles))) and result.rejected == {}


def _in_order(kinds: list[str], expected: list[str]) -> bool:
    it = iter(kinds)
    return all(any(k == want for k in it) for want in expected)


def test_unplug_mid_case_host_reopens_the_symlink_and_the_case_completes(tmp_path, make_case) -> None:
    sink = SlowSink(delay=0.004)
    case, tiles = make_case("CASE-UNPLUG", cols=8, rows=6)
    failures: list[BaseException] = []
    results = []
    with PtyCable(tmp_path / "scanner") as cable, HostLink(cable.path, sink, read_timeout=0.05) as host:
        assert host.state == "connecting"
        emulator = ScannerEmulator(cable, case, tiles, encoding="zlib", ack_timeout=0.5, reconnect_timeout=10)

        def scan() -> None:
            try:
                results.append(emulator.run())
            except BaseException as exc:  # noqa: BLE001 - handed to the test thread
                failures.append(exc)

        worker = threading.Thread(target=scan)
        worker.start()
        wait_until(lambda: len(sink.tiles) >= 15, 10.0, 0.01, what="15 tiles stored")
        cable.unplug()  # mid-case: the host reads EIO, the scanner's writes fail
        wait_until(lambda: host.state == "reconnecting", 10.0, 0.01, what="host reconnecting")
        # The path is gone; the host must idle in its backoff, not spin: counted in reopen attempts, which a
        # spinning loop would make by the thousand (the time passing is the behaviour under test).
        attempts0 = host.counters.reconnect_attempts
        time.sleep(0.6)
        attempts = host.counters.reconnect_attempts - attempts0
        assert host.state == "reconnecting" and host.last_error.startswith("port: ")
        assert 1 <= attempts <= 5, attempts  # 0.05, 0.1, 0.2, 0.4 s apart
        stored_while_out = len(sink.tiles)
        cable.replug()
        worker.join(30)
        assert not worker.is_alive() and failures == [], failures
        assert host.wait_case_end(5) == case.case_id
        snap = host.snapshot()

    result = results[0]
    _assert_exactly_once(sink, case, tiles, result)
    assert 15 <= stored_while_out < len(tiles)
    assert result.disconnects == 1 and result.reconnects == 1
    assert host.counters.reconnects == 1 and host.counters.resumes == 1
    kinds = sink.kinds()
    assert _in_order(kinds, ["up", "down", "reconnecting", "connecting", "up", "resumed"]), kinds
    assert any(kind == "resumed" and "already stored" in detail for kind, detail in sink.events)
    assert snap["state"] == "up" and snap["reconnects"] == 1 and snap["resumes"] == 1
    assert json.loads(json.dumps(snap)) == snap
    assert host.state == "stopped"


def test_host_waits_for_a_scanner_that_is_not_plugged_in_yet(tmp_path, make_case, sink) -> None:
    path = tmp_path / "scanner"
    case, tiles = make_case("CASE-LATE", cols=3, rows=2)
    with HostLink(str(path), sink, read_timeout=0.05, wait_for_port=True) as host:
        # the missing port is tried again and again (not given up on): it keeps waiting for the scanner
        wait_until(lambda: host.counters.reconnect_attempts >= 2, 10.0, 0.01, what="two tries of the missing port")
        assert host.state == "reconnecting" and host.running
        with PtyCable(path) as cable:
            result = ScannerEmulator(cable, case, tiles, ack_timeout=0.3, max_retries=20).run()
            assert host.wait_case_end(5) == case.case_id
    _assert_exactly_once(sink, case, tiles, result)
    assert host.counters.reconnects == 0  # a first connection, not a reconnect
    assert _in_order(sink.kinds(), ["reconnecting", "connecting", "up"])


def test_scripted_resume_keeps_stored_tiles_and_refuses_changed_fields(tmp_path, sink) -> None:
    case = CaseBegin("C1", "S1", "HE", 0.5, 50, 50, expected_tiles=4, image_width=100, image_height=100)
    pixels = np.random.default_rng(1).integers(0, 256, (50, 50, 3), dtype=np.uint8)

    def tile(i: int) -> Tile:
        return Tile("C1", i, 50 * (i % 2), 50 * (i // 2), 50, 50, TileEncoding.RAW, encode_pixels(pixels, "raw"))

    hello = Hello(1, Role.SCANNER, 4, 1 << 20)
    with PtyCable(tmp_path / "scanner") as cable, HostLink(cable.path, sink, read_timeout=0.05) as host:
        scanner = ScriptedScanner(cable.scanner)
        scanner.send(hello)
        assert isinstance(scanner.expect(), Hello)
        seq = scanner.send(case)
        assert scanner.expect() == Ack(seq, "C1", -1)
        again = scanner.send(case)  # no HELLO in between: a plain duplicate
        assert scanner.expect() == Ack(again, "C1", -1)
        seq = scanner.send(tile(0))
        assert scanner.expect() == Ack(seq, "C1", 0)

        cable.unplug()
        cable.replug()
        scanner = ScriptedScanner(cable.scanner)
        for _ in range(50):  # the host reopens within its backoff; keep saying HELLO
            scanner.send(hello)
            try:
                if isinstance(scanner.expect(timeout=0.1), Hello):
                    break
            except AssertionError:
                continue
        seq = scanner.send(case)
        assert scanner.expect() == Ack(seq, "C1", -1)
        assert len(sink.cases) == 1 and host.counters.resumes == 1 and host.counters.duplicates == 1
        seq = scanner.send(tile(0))  # stored before the unplug
        assert scanner.expect() == Ack(seq, "C1", 0)
        seq = scanner.send(tile(1))
        assert scanner.expect() == Ack(seq, "C1", 1)
        assert sink.stores == {0: 1, 1: 1}

        changed = CaseBegin("C1", "S2", "HE", 0.25, 50, 50, expected_tiles=4, image_width=100, image_height=100)
        seq = scanner.send(changed)
        nack = scanner.expect()
        assert isinstance(nack, Nack) and nack.seq == seq and nack.reason == NackReason.MALFORMED
        assert "case C1 is already open with different fields" in nack.detail
        assert "specimen_id 'S1' -> 'S2'" in nack.detail and "microns_per_pixel 0.5 -> 0.25" in nack.detail
        assert "case-conflict" in sink.kinds() and len(sink.cases) == 1
        seq = scanner.send(tile(2))  # the open case is untouched by the refused CASE_BEGIN
        assert scanner.expect() == Ack(seq, "C1", 2)


class DisconnectOn(Faults):
    """Pull the cable right after the first complete write of one message type, then behave."""

    def __init__(self, msg_type: MsgType) -> None:
        super().__init__(0.0, seed=0)
        self.msg_type = msg_type
        self.fired = False

    def apply(self, wire: bytes, *, can_disconnect: bool = False) -> Injection:
        if not self.fired and can_disconnect and cobs_decode(wire.lstrip(b"\x00")[:-1])[1] == self.msg_type:
            self.fired = True
            self.counts["disconnect"] += 1
            return Injection(wire, FaultKind.DISCONNECT, disconnect=True)
        return Injection(wire)


@pytest.mark.parametrize("msg_type", [MsgType.CASE_BEGIN, MsgType.TILE, MsgType.CASE_END], ids=lambda t: t.name)
def test_cable_pulled_right_after_a_frame_resumes_without_loss(tmp_path, make_case, sink, msg_type) -> None:
    case, tiles = make_case(f"CASE-PULL-{msg_type.name}", cols=4, rows=3)
    faults = DisconnectOn(msg_type)
    with PtyCable(tmp_path / "scanner") as cable, HostLink(cable.path, sink, read_timeout=0.05) as host:
        emulator = ScannerEmulator(cable, case, tiles, encoding="png", faults=faults, ack_timeout=0.3, max_retries=20)
        result = emulator.run()
        assert host.wait_case_end(5) == case.case_id
    _assert_exactly_once(sink, case, tiles, result)
    assert faults.fired and result.disconnects == result.reconnects == 1
    if msg_type == MsgType.CASE_END:
        # Every tile was ACKed: the scanner resends only CASE_END, no resume needed.
        assert host.counters.resumes == 0
    else:
        assert host.counters.resumes == 1


def test_a_case_with_an_accession_resumes_with_it_after_the_cable_is_pulled(tmp_path, make_case, sink) -> None:
    case, tiles = make_case("CASE-PULL-ACC", cols=4, rows=3)
    case = dataclasses.replace(case, accession="ACC-2026-00419")
    faults = DisconnectOn(MsgType.TILE)
    with PtyCable(tmp_path / "scanner") as cable, HostLink(cable.path, sink, read_timeout=0.05) as host:
        result = ScannerEmulator(cable, case, tiles, faults=faults, ack_timeout=0.3, max_retries=20).run()
        assert host.wait_case_end(5) == case.case_id
    _assert_exactly_once(sink, case, tiles, result)  # the resumed CASE_BEGIN matched, accession and all
    assert faults.fired and host.counters.resumes == 1 and sink.cases[0].accession == "ACC-2026-00419"


def test_an_accession_left_out_stays_out_for_an_upgraded_host_that_restored_the_case(tmp_path, make_case) -> None:
    """A 1.2 host took the case without its accession, then a 1.3 host restarted from its spool: the resumed
    CASE_BEGIN must match the case as stored, so the scanner keeps the accession out."""
    sink = SlowSink(delay=0.004)
    case, tiles = make_case("CASE-UPGRADE", cols=6, rows=4)
    case = dataclasses.replace(case, accession="ACC-2026-00420")
    failures: list[BaseException] = []
    with PtyCable(tmp_path / "scanner") as cable:
        older = HostLink(cable.path, sink, read_timeout=0.05, capabilities=Capability.ZLIB | Capability.RESUME)
        older.start()
        emulator = ScannerEmulator(cable, case, tiles, encoding="zlib", ack_timeout=0.3, reconnect_timeout=10)

        def scan() -> None:
            try:
                emulator.run()
            except BaseException as exc:  # noqa: BLE001 - handed to the test thread
                failures.append(exc)

        worker = threading.Thread(target=scan)
        worker.start()
        wait_until(lambda: len(sink.tiles) >= 5, 10.0, 0.01, what="5 tiles stored")
        cable.unplug()
        older.stop()
        (spooled,) = sink.cases
        assert spooled.accession == ""
        upgraded = HostLink(cable.path, sink, read_timeout=0.05, wait_for_port=True)
        upgraded.restore_case(spooled, list(sink.tiles))
        with upgraded:
            cable.replug()
            worker.join(30)
            assert not worker.is_alive() and failures == [], failures
            assert upgraded.wait_case_end(5) == case.case_id
    assert upgraded.counters.resumes == 1 and sink.cases == [spooled]
    assert sorted(sink.tiles) == list(range(len(tiles))) and set(sink.stores.values()) == {1}


def test_scanner_gives_up_when_the_cable_never_comes_back(tmp_path, make_case, sink) -> None:
    case, tiles = make_case("CASE-GONE", cols=6, rows=6)
    slow = SlowSink(delay=0.01)
    with PtyCable(tmp_path / "scanner") as cable, HostLink(cable.path, slow, read_timeout=0.05):
        emulator = ScannerEmulator(cable, case, tiles, ack_timeout=0.3, reconnect_timeout=0.3)
        threading.Timer(0.15, cable.unplug).start()
        with pytest.raises(LinkLostError, match="was not plugged back in within 0.3 s"):
            emulator.run()
    assert emulator.result.disconnects == 1 and emulator.result.reconnects == 0
