"""Heartbeats, link states, the status snapshot and rate-limited damage events, over a real pty."""

from __future__ import annotations

import json

from firmware_bridge.emulator import ScannerEmulator
from firmware_bridge.frames import UNKNOWN_SEQ, encode_frame
from firmware_bridge.host import HostLink
from firmware_bridge.messages import Capability, Heartbeat, Hello, MsgType, Role
from firmware_bridge.transport import open_port

from tests.waiting import wait_until

from .test_bridge_reconnect import SlowSink


def test_state_follows_the_link_lifecycle(pty_pair, scanner, sink) -> None:
    link = HostLink(open_port(pty_pair.path, timeout=0.05), sink, read_timeout=0.05)
    assert link.state == "stopped"
    link.start()
    try:
        assert link.state == "connecting" and link.snapshot()["peer"] is None
        scanner.send(Hello(1, Role.SCANNER, 4, 1 << 20, Capability.HEARTBEAT))
        assert isinstance(scanner.expect(), Hello)
        assert link.state == "up"
    finally:
        link.stop()
    assert link.state == "stopped"


def test_heartbeat_is_answered_and_silence_marks_the_scanner_down(host, scanner, sink) -> None:
    scanner.send(Hello(1, Role.SCANNER, 4, 1 << 20, Capability.HEARTBEAT))
    assert isinstance(scanner.expect(), Hello)
    seq = scanner.send(Heartbeat(reply_to=UNKNOWN_SEQ, uptime_ms=10, interval_ms=100))
    reply = scanner.expect()
    assert isinstance(reply, Heartbeat) and reply.reply_to == seq and reply.interval_ms == 0
    assert host.counters.heartbeats == 1
    snap = host.snapshot()
    assert snap["peer"]["heartbeat_interval_s"] == 0.1 and snap["last_heard_age_s"] < 1.0
    assert "heartbeat" in snap["peer"]["capabilities"]
    # Three missed intervals (0.3 s) and the host calls the scanner down...
    wait_until(lambda: host.state == "down", 2.0, 0.01, what="the link to be down", detail=lambda: host.state)
    assert any(k == "down" and "no frame from the scanner" in d for k, d in sink.events)
    assert host.last_heard_age() > 0.3
    # ...and up again on its next frame.
    scanner.send(Heartbeat(reply_to=UNKNOWN_SEQ, uptime_ms=900, interval_ms=100))
    assert isinstance(scanner.expect(), Heartbeat)
    assert host.state == "up" and ("up", "the silent scanner was heard again") in sink.events


def test_host_answers_heartbeats_while_the_emulator_waits_on_slow_storage(pty_pair, make_case) -> None:
    sink = SlowSink(delay=0.12)
    case, tiles = make_case("CASE-SLOWDISK", cols=3, rows=2)
    with HostLink(open_port(pty_pair.path, timeout=0.05), sink, read_timeout=0.05) as host:
        emulator = ScannerEmulator(
            pty_pair.scanner, case, tiles, window=1, heartbeat_interval=0.05, linger=0.25, ack_timeout=2.0
        )
        result = emulator.run()
        assert host.wait_case_end(5) == case.case_id
        wait_until(lambda: host.counters.heartbeats == result.heartbeats_sent, 5.0, 0.01,
                   what="every heartbeat counted", detail=lambda: (host.counters.heartbeats, result.heartbeats_sent))
    assert result.heartbeats_sent >= 4  # while storage was slow, and while lingering after the case
    assert result.heartbeat_replies == result.heartbeats_sent
    assert result.retransmits == 0  # heartbeats kept the link busy without confusing the window
    assert sorted(sink.tiles) == list(range(len(tiles)))


def test_snapshot_is_plain_json_with_every_counter(host, scanner, sink) -> None:
    scanner.send(Hello(1, Role.SCANNER, 4, 1 << 20))
    scanner.expect()
    snap = host.snapshot()
    assert json.loads(json.dumps(snap)) == snap
    for key in ("state", "port", "reconnects", "heartbeats", "frames_bad", "crc_errors", "framing_errors",
                "tiles_stored", "last_error", "last_heard_age_s", "peer", "case"):
        assert key in snap, key
    assert snap["state"] == "up" and snap["last_error"] is None and snap["frames_bad"] == 0


def test_crc_errors_are_counted_exactly_but_reported_at_most_once_a_second(host, scanner, sink) -> None:
    good = bytearray(encode_frame(MsgType.TILE, 5, bytes(range(1, 200))))
    good[50] ^= 0x04
    for _ in range(40):
        scanner.send_raw(bytes(good))
        scanner.expect()  # NACK CRC each time: never fatal
    assert host.counters.crc_errors == 40 and host.counters.frames_bad == 40 and host.counters.nacks_sent == 40
    assert sink.kinds().count("crc-error") == 1
    assert host.last_error.startswith("crc-error: CRC mismatch")
    assert host.state == "connecting" and host.running
