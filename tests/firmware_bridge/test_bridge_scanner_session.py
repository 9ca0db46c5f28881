"""The scanner's protocol session driven directly with messages: no pty, no threads, no sleeps.

What PROTOCOL.md asks of the scanner, checked where it is decided: HELLO first and the
negotiation with the host's (8.1, 7.1), CASE_BEGIN, the tiles within the window and CASE_END
in that order (8.2, 8.4), retransmission on timeout and NACK and the ordering rule (8.3, 8.5),
heartbeats (8.7), and the resume after the cable was pulled (8.8). Time is a number the test
passes in; every frame the session hands back is decoded as the host would read it.
"""

from __future__ import annotations

import dataclasses
import inspect

import pytest

from firmware_bridge.codes import EVERY_CAPABILITY, Capability, ErrorCode, NackReason, Role
from firmware_bridge.emulator import ScannerEmulator
from firmware_bridge.errors import (
    CrcError, DeliveryError, FrameTooLargeError, LinkError, LinkTimeoutError, MessageDecodeError, NegotiationError,
    RemoteError,
)
from firmware_bridge.frames import DELIMITER, UNKNOWN_SEQ, FrameReader
from firmware_bridge.messages import (
    Ack, CaseBegin, CaseEnd, ErrorMessage, Heartbeat, Hello, Message, Nack, Tile, TileEncoding, message_from_frame,
)
from firmware_bridge.scanner_session import HELLO_RETRY_INITIAL, Phase, ScannerSession, ScannerSettings

CASE = CaseBegin("C1", "S1", "brightfield-HE", 0.5, 4, 4, expected_tiles=4, image_width=8, image_height=8)
HOST = Hello(1, Role.HOST, 16, 1 << 20, EVERY_CAPABILITY)
ACK_TIMEOUT = 1.0
RETRY_DELAY = 0.05
INTERVAL = 0.5  # heartbeat_interval
SETTINGS = ScannerSettings(
    window=2, ack_timeout=ACK_TIMEOUT, max_retries=2, retry_delay=RETRY_DELAY, heartbeat_interval=INTERVAL
)
STARTED = 100.0


def _decode(wires: list[bytes]) -> list[tuple[int, Message]]:
    """(header seq, message) of every frame, read as the host's FrameReader reads the line."""
    reader = FrameReader()
    frames = [f for wire in wires for f in reader.feed(wire)]
    assert all(not isinstance(f, Exception) for f in frames), frames
    return [(f.seq, message_from_frame(f)) for f in frames]


def _one(wires: list[bytes]) -> tuple[int, Message]:
    (only,) = _decode(wires)
    return only


def _tile(index: int, case_id: str = "C1") -> Tile:
    return Tile(case_id, index, 4 * (index % 2), 4 * (index // 2), 4, 4, TileEncoding.RAW, bytes([index]) * 48)


def _session(case: CaseBegin = CASE, settings: ScannerSettings = SETTINGS) -> ScannerSession:
    return ScannerSession(case, settings, started=STARTED)


def _connect(session: ScannerSession, host: Hello = HOST, now: float = STARTED) -> bytes:
    """HELLO out, the host's HELLO in; returns our HELLO's wire."""
    wire, _ = session.hello(now)
    assert session.receive(host, now) == []
    return wire


def _begin(session: ScannerSession, now: float = STARTED) -> int:
    """CASE_BEGIN out and ACKed; returns its seq."""
    seq, msg = _one(session.next_frames(now))
    assert msg == CASE
    assert session.receive(Ack(seq, CASE.case_id, -1), now) == []
    assert session.phase == Phase.TILES
    return seq


def _send_tiles(session: ScannerSession, indices, now: float = STARTED) -> list[tuple[int, bytes]]:
    """Add each tile while the session wants one; (seq, wire) of each."""
    sent = []
    for index in indices:
        assert session.wants_tile
        wire = session.add_tile(_tile(index), now)
        seq, msg = _one([wire])
        assert msg == _tile(index)
        sent.append((seq, wire))
    return sent


# --- HELLO and the negotiation (8.1) ----------------------------------------------------------


def test_hello_announces_the_settings_and_starts_with_a_delimiter() -> None:
    session = _session()
    assert session.phase == Phase.HELLO and session.next_frames(STARTED) == []
    wire, retry = session.hello(STARTED)
    assert wire.startswith(DELIMITER)  # flushes whatever garbage the host's reader holds
    seq, hello = _one([wire])
    assert (seq, hello) == (0, Hello(1, Role.SCANNER, 2, 1 << 20, EVERY_CAPABILITY))
    # first contact: ack_timeout apart, 1 + max_retries HELLOs, then give up
    assert [retry.next_wait(STARTED, "pty") for _ in range(3)] == [ACK_TIMEOUT] * 3
    with pytest.raises(LinkTimeoutError, match="did not answer HELLO after 3 attempts"):
        retry.next_wait(STARTED, "pty")


def test_only_the_hosts_hello_ends_the_handshake() -> None:
    session = _session()
    session.hello(STARTED)
    own_echo = Hello(1, Role.SCANNER, 2, 1 << 20, EVERY_CAPABILITY)  # a pty not yet in raw mode
    for noise in (None, own_echo, Nack(UNKNOWN_SEQ, NackReason.CRC), Ack(0, "C1", -1), CrcError("bad crc")):
        assert session.receive(noise, STARTED) == []
        assert session.phase == Phase.HELLO
    assert session.result.corrupt_answers == 0 and session.result.nacks_received == 0
    assert session.receive(HOST, STARTED) == []
    assert session.phase == Phase.BEGIN and session.peer == HOST


def test_an_error_from_the_host_ends_the_case_in_any_phase() -> None:
    session = _session()
    session.hello(STARTED)
    with pytest.raises(RemoteError, match="version 9 unsupported"):
        session.receive(ErrorMessage(ErrorCode.UNSUPPORTED_VERSION, "version 9 unsupported"), STARTED)
    connected = _session()
    _connect(connected)
    with pytest.raises(RemoteError):
        connected.receive(ErrorMessage(ErrorCode.PROTOCOL, "no"), STARTED)


def test_the_window_shrinks_to_the_hosts_and_frames_to_its_max_payload() -> None:
    session = _session(settings=dataclasses.replace(SETTINGS, window=8))
    _connect(session, Hello(1, Role.HOST, 3, 1 << 20, EVERY_CAPABILITY))
    _begin(session)
    _send_tiles(session, [0, 1, 2])
    assert not session.wants_tile and len(session.window) == 3
    small = _session()
    _connect(small, Hello(1, Role.HOST, 16, 64, EVERY_CAPABILITY))  # a tile of 48 pixel bytes no longer fits
    _begin(small)
    with pytest.raises(FrameTooLargeError, match="the limit is 64"):
        small.add_tile(_tile(0), STARTED)


def test_an_encoding_the_host_cannot_take_fails_the_negotiation() -> None:
    session = _session(settings=dataclasses.replace(SETTINGS, encoding="jpeg"))
    session.hello(STARTED)
    no_jpeg = Hello(1, Role.HOST, 16, 1 << 20, Capability.ZLIB | Capability.PNG)
    with pytest.raises(NegotiationError, match="does not accept jpeg tiles"):
        session.receive(no_jpeg, STARTED)
    assert session.phase == Phase.HELLO


def test_the_accession_stays_out_once_a_host_could_not_take_it() -> None:
    case = dataclasses.replace(CASE, accession="ACC-7")
    session = _session(case)
    _connect(session, Hello(1, Role.HOST, 16, 1 << 20, EVERY_CAPABILITY & ~Capability.ACCESSION))
    _, begin = _one(session.next_frames(STARTED))
    assert begin == dataclasses.replace(case, accession="")
    session.disconnected()
    session.reconnected()
    _connect(session)  # this host could read it, but the open case it holds has none (8.8)
    _, again = _one(session.next_frames(STARTED))
    assert again == begin


# --- the case in order (8.2, 8.4) -------------------------------------------------------------


def test_a_case_goes_begin_tiles_end_and_each_waits_for_its_ack() -> None:
    progress = []
    session = _session()
    _connect(session)
    begin_seq, begin = _one(session.next_frames(STARTED))
    assert begin == CASE and not session.wants_tile
    assert session.next_frames(STARTED) == []  # CASE_BEGIN is in flight: nothing else yet
    assert session.receive(Ack(begin_seq, "C1", -1), STARTED) == [] and session.wants_tile
    (s0, _), (s1, _) = _send_tiles(session, [0, 1])
    assert not session.wants_tile  # window 2 is full
    with pytest.raises(LinkError, match="no room for tile 2"):
        session.add_tile(_tile(2), STARTED)
    session.receive(Ack(s0, "C1", 0), STARTED)
    ((s2, _),) = _send_tiles(session, [2])
    session.tiles_exhausted()
    assert session.next_frames(STARTED) == []  # tiles 1 and 2 are still unACKed
    for seq, index in ((s1, 1), (s2, 2)):
        session.receive(Ack(seq, "C1", index), STARTED)
        progress.append(list(session.result.acked))
    end_seq, end = _one(session.next_frames(STARTED))
    assert end == CaseEnd("C1", 3) and session.phase == Phase.END
    session.receive(Ack(end_seq, "C1", -1), STARTED)
    assert session.phase == Phase.DONE and session.next_frames(STARTED) == []
    assert progress == [[0, 1], [0, 1, 2]]
    assert session.result.tiles_sent == 3 and session.result.retransmits == 0
    assert [s0, s1, s2, end_seq] == [begin_seq + 1, begin_seq + 2, begin_seq + 3, begin_seq + 4]  # in order


def test_a_tile_must_be_the_next_one_of_this_case() -> None:
    session = _session()
    _connect(session)
    _begin(session)
    with pytest.raises(ValueError, match="tile 1 .* is not the next one: tile 0"):
        session.add_tile(_tile(1), STARTED)
    with pytest.raises(ValueError, match="not the next one"):
        session.add_tile(_tile(0, case_id="C2"), STARTED)
    assert session.result.tiles_sent == 0 and session.window.empty


def test_a_stray_ack_moves_nothing() -> None:
    session = _session()
    _connect(session)
    seq, _ = _one(session.next_frames(STARTED))
    assert session.receive(Ack(seq, "C1", 0), STARTED) == []  # names a tile, not CASE_BEGIN
    assert session.receive(Ack(seq + 7, "C1", -1), STARTED) == []
    assert session.phase == Phase.BEGIN and len(session.window) == 1


# --- retransmission (8.3, 8.5) ----------------------------------------------------------------


def test_an_unanswered_frame_goes_out_again_as_it_was_then_the_case_gives_up() -> None:
    session = _session()
    _connect(session)
    _begin(session)
    ((seq, wire),) = _send_tiles(session, [0], now=STARTED)
    assert session.tick(STARTED + ACK_TIMEOUT - 0.01, last_write=STARTED + 10) == []
    assert session.deadline(STARTED, last_write=STARTED + 10) == STARTED + ACK_TIMEOUT
    now = STARTED
    for _ in range(2):  # max_retries
        now += ACK_TIMEOUT
        assert session.tick(now, last_write=now) == [wire]  # same bytes, same seq
    assert session.result.timeouts == 2 and session.result.retransmits == 2
    with pytest.raises(LinkTimeoutError, match=f"no answer for tile 0 \\(seq {seq}\\) after 3 transmissions"):
        session.tick(now + ACK_TIMEOUT, last_write=now)


def test_a_crc_nack_resends_at_once_and_a_storage_nack_after_retry_delay() -> None:
    session = _session()
    _connect(session)
    _begin(session)
    (s0, w0), (s1, w1) = _send_tiles(session, [0, 1])
    session.receive(Nack(s0, NackReason.CRC, "damaged"), STARTED + 0.1)
    assert session.tick(STARTED + 0.1, last_write=STARTED + 0.1) == [w0]
    session.receive(Nack(s1, NackReason.STORAGE, "disk busy"), STARTED + 0.2)
    assert session.tick(STARTED + 0.2, last_write=STARTED + 0.2) == []
    assert session.tick(STARTED + 0.2 + RETRY_DELAY, last_write=STARTED + 0.2) == [w1]
    assert session.result.nacks_received == 2 and session.result.retransmits == 2 and session.result.timeouts == 0


def test_a_rejected_tile_is_reported_and_the_case_goes_on() -> None:
    session = _session()
    _connect(session)
    _begin(session)
    (s0, _), (s1, _) = _send_tiles(session, [0, 1])
    session.receive(Nack(s0, NackReason.BAD_TILE, "not 4x4"), STARTED)
    assert session.result.rejected == {0: "BAD_TILE: not 4x4"} and session.wants_tile
    session.receive(Ack(s1, "C1", 1), STARTED)
    session.tiles_exhausted()
    _, end = _one(session.next_frames(STARTED))
    assert end == CaseEnd("C1", 2)  # both were produced; the host sees the gap (8.3)


def test_a_refused_case_begin_ends_the_case() -> None:
    session = _session()
    _connect(session)
    seq, _ = _one(session.next_frames(STARTED))
    with pytest.raises(DeliveryError, match="the host refused CASE_BEGIN: REFUSED: disk full"):
        session.receive(Nack(seq, NackReason.REFUSED, "disk full"), STARTED)


def test_an_answer_that_overtakes_an_older_frame_resends_it_at_once() -> None:
    session = _session()
    _connect(session)
    _begin(session)
    (_, w0), (s1, _) = _send_tiles(session, [0, 1])
    # Tile 1's ACK came first: the line is FIFO, so tile 0 (or its ACK) was lost.
    assert session.receive(Ack(s1, "C1", 1), STARTED + 0.1) == [w0]
    assert session.result.retransmits == 1 and session.result.timeouts == 0


def test_undecodable_answers_are_counted_and_change_nothing() -> None:
    session = _session()
    _connect(session)
    _begin(session)
    _send_tiles(session, [0])
    for junk in (CrcError("crc"), MessageDecodeError("ACK: 2 bytes left"), HOST):
        assert session.receive(junk, STARTED) == []
    assert session.result.corrupt_answers == 2 and len(session.window) == 1


# --- heartbeats (8.7) -------------------------------------------------------------------------


def test_an_idle_line_gets_a_heartbeat_and_the_host_s_reply_is_counted() -> None:
    session = _session()
    _connect(session)
    assert session.deadline(STARTED, last_write=STARTED) == STARTED + INTERVAL  # sooner than ack_timeout
    assert session.tick(STARTED + INTERVAL - 0.01, last_write=STARTED) == []
    seq, beat = _one(session.tick(STARTED + INTERVAL, last_write=STARTED))
    assert beat == Heartbeat(reply_to=UNKNOWN_SEQ, uptime_ms=500, interval_ms=500)
    assert session.result.heartbeats_sent == 1
    assert session.receive(Heartbeat(reply_to=seq, uptime_ms=7), STARTED + INTERVAL) == []
    assert session.result.heartbeat_replies == 1


def test_a_heartbeat_from_the_host_is_answered_with_its_seq() -> None:
    session = _session()
    _connect(session)
    _, reply = _one(session.receive(Heartbeat(reply_to=UNKNOWN_SEQ, uptime_ms=1), STARTED + 2.5, seq=41))
    assert reply == Heartbeat(reply_to=41, uptime_ms=2500, interval_ms=0)


@pytest.mark.parametrize(
    ("host_caps", "interval"),
    [(EVERY_CAPABILITY & ~Capability.HEARTBEAT, INTERVAL), (EVERY_CAPABILITY, 0.0)],
    ids=["host without HEARTBEAT", "heartbeat_interval 0"],
)
def test_no_heartbeats_unless_both_ends_want_them(host_caps: Capability, interval: float) -> None:
    session = _session(settings=dataclasses.replace(SETTINGS, heartbeat_interval=interval))
    _connect(session, Hello(1, Role.HOST, 16, 1 << 20, host_caps))
    assert not session.heartbeats
    assert session.tick(STARTED + 60, last_write=STARTED) == []
    assert session.deadline(STARTED, last_write=STARTED) == STARTED + ACK_TIMEOUT


# --- unplug, replug and resume (8.8) ----------------------------------------------------------


def test_after_a_reconnect_the_case_resumes_with_the_unacked_tiles_first() -> None:
    session = _session(settings=dataclasses.replace(SETTINGS, window=3))
    _connect(session)
    begin_seq = _begin(session)
    (s0, w0), (s1, w1), (s2, w2) = _send_tiles(session, [0, 1, 2])
    session.receive(Ack(s1, "C1", 1), STARTED)  # overtakes tile 0: resent once already
    session.disconnected()
    assert session.phase == Phase.HELLO and not session.wants_tile and not session.heartbeats
    assert session.result.disconnects == 1 and session.result.reconnects == 0
    session.reconnected()
    _, retry = session.hello(STARTED + 5)
    assert retry.next_wait(STARTED + 5, "pty") == HELLO_RETRY_INITIAL  # the host is reopening its port
    session.receive(HOST, STARTED + 5)
    # The same CASE_BEGIN, in a new frame, is the resume request.
    resume_seq, resume = _one(session.next_frames(STARTED + 5))
    assert resume == CASE and resume_seq != begin_seq and session.phase == Phase.BEGIN
    assert not session.wants_tile and session.next_frames(STARTED + 5) == []
    session.receive(Ack(resume_seq, "C1", -1), STARTED + 5)
    retransmits = session.result.retransmits
    # Unacked tiles go out again before any new one: the same frames, in index order.
    assert session.next_frames(STARTED + 5) == [w0, w2]
    assert session.result.retransmits == retransmits + 2
    assert session.wants_tile and session.next_index == 3
    session.add_tile(_tile(3), STARTED + 5)
    session.receive(Ack(s0, "C1", 0), STARTED + 5)
    session.receive(Ack(s2, "C1", 2), STARTED + 5)
    assert session.result.acked == [1, 0, 2]


def test_a_cut_after_case_end_went_out_resends_only_case_end() -> None:
    session = _session()
    _connect(session)
    _begin(session)
    ((s0, _),) = _send_tiles(session, [0])
    session.receive(Ack(s0, "C1", 0), STARTED)
    session.tiles_exhausted()
    _, end = _one(session.next_frames(STARTED))
    session.disconnected()
    session.reconnected()
    _connect(session)
    end_seq, again = _one(session.next_frames(STARTED))
    assert again == end == CaseEnd("C1", 1)  # no CASE_BEGIN: the host may have ended the case already
    session.receive(Ack(end_seq, "C1", -1), STARTED)
    assert session.phase == Phase.DONE


def test_a_cut_before_case_begin_was_acked_sends_it_again() -> None:
    session = _session()
    _connect(session)
    session.next_frames(STARTED)
    session.disconnected()
    session.reconnected()
    _connect(session)
    _, again = _one(session.next_frames(STARTED))
    assert again == CASE and session.phase == Phase.BEGIN


# --- settings ---------------------------------------------------------------------------------


def test_settings_check_their_values() -> None:
    assert ScannerSettings(encoding="zlib").encoding == TileEncoding.ZLIB
    with pytest.raises(ValueError, match="window=0 must be at least 1"):
        ScannerSettings(window=0)
    with pytest.raises(ValueError, match="max_retries must be >= 0 and ack_timeout > 0"):
        ScannerSettings(ack_timeout=0)
    with pytest.raises(ValueError, match="heartbeat_interval=70 must be 0"):
        ScannerSettings(heartbeat_interval=70)
    with pytest.raises(ValueError, match="unknown tile encoding 'webp'"):
        ScannerSettings(encoding="webp")


def test_the_emulators_defaults_are_the_settings_defaults() -> None:
    """PROTOCOL.md section 9 is checked against the emulator's signature; the session must agree with it."""
    params = inspect.signature(ScannerEmulator.__init__).parameters
    for f in dataclasses.fields(ScannerSettings):
        default = params[f.name].default
        expected = TileEncoding.parse(default) if f.name == "encoding" else default
        assert expected == f.default, f.name
