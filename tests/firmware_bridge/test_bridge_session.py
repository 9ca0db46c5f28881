"""The host's protocol session driven directly with bytes and frames: no pty, no threads, no sleeps.

What PROTOCOL.md promises about the host, checked where it is decided: ACK only once the sink
has stored (8.2), NACK instead of ACK when it could not (8.3), duplicates re-ACKed and stored
once (8.6), damaged chunks answered and the session going on (2, 3, 8.3), case ordering
(8.2, 8.8), heartbeats and silence (8.7). Time is a number the test passes in.
"""

from __future__ import annotations

import dataclasses
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest

import firmware_bridge
from firmware_bridge.cases import ENDED_CASES_REMEMBERED
from firmware_bridge.frames import UNKNOWN_SEQ, FrameReader, cobs_encode, encode_frame
from firmware_bridge.messages import (
    Ack, CaseBegin, CaseEnd, Capability, ErrorCode, ErrorMessage, Heartbeat, Hello, Message, MsgType, Nack, NackReason,
    Role, Tile, TileEncoding, message_from_frame, message_to_frame,
)
from firmware_bridge.session import SILENCE_FACTOR, Answer, HostSession
from firmware_bridge.sink import CaseInfo, CaseRefused, TileReceived

CASE = CaseBegin("C1", "S1", "brightfield-HE", 0.5, 4, 4, expected_tiles=4, image_width=8, image_height=8)
PIX = np.arange(4 * 4 * 3, dtype=np.uint8).reshape(4, 4, 3)
HELLO = Hello(1, Role.SCANNER, 4, 1 << 20, Capability.HEARTBEAT)


class PowerCut(BaseException):
    """The host dies inside the sink: nothing after the call happens (not an Exception, so not a NACK)."""


class DiskSink:
    """A sink whose 'disk' holds what was stored; each call can be told to fail once."""

    def __init__(self) -> None:
        self.disk: dict[int, bytes] = {}  # tile index -> pixel bytes, written when tile_received returns
        self.began: list[CaseInfo] = []
        self.ended: list[tuple[str, int]] = []
        self.calls: list[str] = []
        self.events: list[tuple[str, str]] = []
        self.fail: dict[str, BaseException] = {}  # method name -> raise this on its next call
        self.session: HostSession | None = None  # to look at its ACK count from inside a sink call
        self.acks_seen_while_storing: list[int] = []

    def _maybe_fail(self, method: str) -> None:
        self.calls.append(method)
        exc = self.fail.pop(method, None)
        if exc is not None:
            raise exc

    def case_began(self, info: CaseInfo) -> None:
        self._maybe_fail("case_began")
        self.began.append(info)

    def tile_received(self, tile: TileReceived) -> None:
        if self.session is not None:
            self.acks_seen_while_storing.append(self.session.counters.acks_sent)
        self._maybe_fail("tile_received")
        self.disk[tile.index] = tile.pixels.tobytes()

    def case_ended(self, case_id: str, tile_count: int) -> None:
        self._maybe_fail("case_ended")
        self.ended.append((case_id, tile_count))

    def link_event(self, kind: str, detail: str) -> None:
        self.events.append((kind, detail))

    def kinds(self) -> list[str]:
        return [kind for kind, _ in self.events]


class Scanner:
    """Drives a session the way the port keeper does: wire bytes in, one Answer per frame out."""

    def __init__(self, session: HostSession) -> None:
        self.session = session
        self.seq = 100
        self.now = 1000.0

    def send(self, msg: Message, seq: int | None = None) -> tuple[int, Answer]:
        if seq is None:
            seq, self.seq = self.seq, self.seq + 1
        answers = self.feed(message_to_frame(msg, seq))
        assert len(answers) == 1, answers  # exactly one answer per frame
        return seq, answers[0]

    def feed(self, wire: bytes) -> list[Answer]:
        self.now += 0.01
        return self.session.receive(wire, self.now)


def _only(answer: Answer) -> Message:
    assert len(answer.messages) == 1, answer.messages
    # The bytes the port keeper writes are exactly the answer, as a scanner would read them.
    frames = FrameReader().feed(answer.wire)
    assert [message_from_frame(f) for f in frames] == list(answer.messages)
    return answer.messages[0]


def _tile(index: int, *, x: int = 0, case_id: str = "C1", payload: bytes | None = None) -> Tile:
    raw = PIX.tobytes() if payload is None else payload
    return Tile(case_id, index, x, 0, 4, 4, TileEncoding.RAW, raw)


@pytest.fixture
def sink() -> DiskSink:
    return DiskSink()


@pytest.fixture
def session(sink: DiskSink) -> HostSession:
    sink.session = HostSession(sink, started=1000.0)
    return sink.session


@pytest.fixture
def scanner(session: HostSession) -> Scanner:
    return Scanner(session)


def _open(scanner: Scanner, case: CaseBegin = CASE) -> None:
    seq, answer = scanner.send(case)
    assert _only(answer) == Ack(seq, case.case_id, -1)


# --- ACK means durable (8.2) ---------------------------------------------------------


def test_a_tile_is_acked_only_after_the_sink_stored_it(scanner, sink) -> None:
    _open(scanner)
    seq, answer = scanner.send(_tile(0))
    assert _only(answer) == Ack(seq, "C1", 0)
    assert sink.disk[0] == PIX.tobytes()
    # While the sink was storing tile 0, only CASE_BEGIN had been ACKed.
    assert sink.acks_seen_while_storing == [1]
    assert sink.calls == ["case_began", "tile_received"]


def test_no_ack_exists_until_the_sink_returns(scanner, session, sink) -> None:
    _open(scanner)
    sink.fail["tile_received"] = PowerCut()
    with pytest.raises(PowerCut):
        scanner.send(_tile(0))
    assert session.counters.acks_sent == 1 and 0 not in sink.disk  # only CASE_BEGIN's ACK was ever made
    # The host comes back (same session object, as after a reconnect): the tile is stored, not a duplicate.
    seq, answer = scanner.send(_tile(0))
    assert _only(answer) == Ack(seq, "C1", 0) and sink.disk[0] == PIX.tobytes()
    assert session.counters.duplicates == 0


def test_sink_failure_is_nacked_storage_and_the_retransmission_is_stored(scanner, session, sink) -> None:
    _open(scanner)
    sink.fail["tile_received"] = OSError(28, "No space left on device")
    seq, answer = scanner.send(_tile(0))
    nack = _only(answer)
    assert isinstance(nack, Nack) and nack.seq == seq and nack.reason == NackReason.STORAGE
    assert "No space left on device" in nack.detail and 0 not in sink.disk
    assert session.counters.storage_errors == 1 and "storage-error" in sink.kinds()
    seq, answer = scanner.send(_tile(0))  # the scanner resends after retry_delay
    assert _only(answer) == Ack(seq, "C1", 0)
    assert sink.calls.count("tile_received") == 2 and session.counters.tiles_stored == 1


def test_a_refused_case_is_nacked_refused_and_not_opened(scanner, session, sink) -> None:
    sink.fail["case_began"] = CaseRefused("only 2 GB free, need 10 GB")
    seq, answer = scanner.send(CASE)
    nack = _only(answer)
    assert nack == Nack(seq, NackReason.REFUSED, "case C1 begin: only 2 GB free, need 10 GB")
    assert session.case is None and session.counters.cases_refused == 1
    _, answer = scanner.send(_tile(0))
    assert _only(answer).reason == NackReason.UNKNOWN_CASE and sink.disk == {}


def test_case_end_failing_to_store_is_nacked_and_the_case_stays_open(scanner, session, sink) -> None:
    _open(scanner)
    sink.fail["case_ended"] = OSError("fsync failed")
    seq, answer = scanner.send(CaseEnd("C1", 0))
    assert _only(answer).reason == NackReason.STORAGE and answer.case_ended is None
    assert session.case is not None and sink.ended == []
    seq, answer = scanner.send(CaseEnd("C1", 0))
    assert _only(answer) == Ack(seq, "C1", -1) and answer.case_ended == "C1"
    assert sink.ended == [("C1", 0)] and session.case is None


def test_undecodable_pixels_are_nacked_bad_tile_and_never_reach_the_sink(scanner, session, sink) -> None:
    _open(scanner)
    seq, answer = scanner.send(_tile(0, payload=PIX.tobytes()[:-1]))
    assert _only(answer) == Nack(seq, NackReason.BAD_TILE, "tile 0: raw payload is 47 bytes, expected 48 for 4x4x3")
    seq, answer = scanner.send(_tile(1, x=6))  # 6 + 4 > image width 8
    assert _only(answer).reason == NackReason.BAD_TILE
    assert "tile_received" not in sink.calls and session.counters.bad_tiles == 2


# --- duplicates (8.6) ---------------------------------------------------------------


def test_a_retransmitted_tile_is_acked_again_with_its_new_seq_and_stored_once(scanner, session, sink) -> None:
    _open(scanner)
    first, answer = scanner.send(_tile(2))
    assert _only(answer) == Ack(first, "C1", 2)
    again, answer = scanner.send(_tile(2))  # the ACK was lost; same frame content, new seq
    assert _only(answer) == Ack(again, "C1", 2)
    same_seq, answer = scanner.send(_tile(2), seq=first)  # a transport duplicate of the first frame
    assert _only(answer) == Ack(first, "C1", 2)
    assert sink.calls.count("tile_received") == 1 and session.counters.duplicates == 2
    assert sink.kinds().count("duplicate") == 1  # rate-limited, the counter is exact


def test_a_duplicate_is_keyed_on_case_and_index_never_on_seq(scanner, sink) -> None:
    _open(scanner)
    seq, _ = scanner.send(_tile(0))
    _, answer = scanner.send(_tile(1), seq=seq)  # a new tile that happens to reuse a seq
    assert _only(answer) == Ack(seq, "C1", 1) and sorted(sink.disk) == [0, 1]


def test_a_repeated_case_end_is_acked_again_without_a_second_store(scanner, sink) -> None:
    _open(scanner)
    first, answer = scanner.send(CaseEnd("C1", 0))
    assert answer.case_ended == "C1"
    again, answer = scanner.send(CaseEnd("C1", 0))
    assert _only(answer) == Ack(again, "C1", -1) and answer.case_ended is None
    assert sink.ended == [("C1", 0)]


def test_a_repeated_case_begin_without_hello_is_a_duplicate_with_hello_a_resume(scanner, session, sink) -> None:
    _open(scanner)
    scanner.send(_tile(0))
    seq, answer = scanner.send(CASE)
    assert _only(answer) == Ack(seq, "C1", -1) and session.counters.duplicates == 1
    scanner.send(HELLO)  # a reconnect
    seq, answer = scanner.send(CASE)
    assert _only(answer) == Ack(seq, "C1", -1) and session.counters.resumes == 1
    assert len(sink.began) == 1 and session.case.stored == {0}  # case_began not called again
    _, answer = scanner.send(_tile(0))  # resent after the resume: already stored
    assert isinstance(_only(answer), Ack) and sink.calls.count("tile_received") == 1


def test_only_the_last_ended_cases_are_remembered(scanner, sink) -> None:
    ids = [f"C{i}" for i in range(ENDED_CASES_REMEMBERED + 1)]
    for case_id in ids:
        _open(scanner, CaseBegin(case_id, "S", "HE", 0.5, 4, 4))
        scanner.send(CaseEnd(case_id, 0))
    _, answer = scanner.send(CaseEnd(ids[1], 0))
    assert isinstance(_only(answer), Ack)  # still remembered
    _, answer = scanner.send(CaseEnd(ids[0], 0))
    assert _only(answer).reason == NackReason.UNKNOWN_CASE  # forgotten: the oldest of 17


# --- damaged input (2, 3, 8.3) --------------------------------------------------------


def _damaged_chunks() -> dict[str, bytes]:
    good = bytearray(encode_frame(MsgType.TILE, 7, _tile(0).encode()))
    flipped = bytes(good[:40]) + bytes([good[40] ^ 0x08]) + bytes(good[41:])
    body = struct.pack("<BBBxII", 0xB1, MsgType.TILE, 0, 8, 10) + b"short"  # declares 10 bytes, carries 5
    return {
        "bad CRC": flipped,
        "truncated below a header": cobs_encode(b"\xb1\x03\x00") + b"\x00",
        "payload shorter than declared": cobs_encode(body + struct.pack("<I", zlib.crc32(body))) + b"\x00",
        "bad COBS": b"\x05\x11\x22\x00",
        "line noise": b"\x17\x99\x42\x00",
    }


@pytest.mark.parametrize("name", list(_damaged_chunks()))
def test_a_damaged_chunk_is_nacked_crc_with_unknown_seq_and_the_session_goes_on(scanner, session, sink, name):
    _open(scanner)
    answers = scanner.feed(_damaged_chunks()[name])
    assert len(answers) == 1
    nack = _only(answers[0])
    assert isinstance(nack, Nack) and nack.seq == UNKNOWN_SEQ and nack.reason == NackReason.CRC
    assert session.counters.frames_bad == 1 and 0 not in sink.disk
    seq, answer = scanner.send(_tile(0))
    assert _only(answer) == Ack(seq, "C1", 0)


def test_a_frame_cut_off_runs_into_the_next_and_both_are_answered_correctly(scanner, sink) -> None:
    _open(scanner)
    cut = message_to_frame(_tile(0), 200)[:-10]  # tail and delimiter lost
    answers = scanner.feed(cut + message_to_frame(_tile(1), 201) + message_to_frame(_tile(1), 202))
    # The first delimiter ends the merged chunk (damaged), the second frame arrives intact.
    assert [type(_only(a)) for a in answers] == [Nack, Ack]
    assert answers[0].messages[0].seq == UNKNOWN_SEQ and answers[1].messages[0] == Ack(202, "C1", 1)
    assert sorted(sink.disk) == [1]


def test_future_version_gets_an_error_and_oversized_frames_too_large(scanner, session) -> None:
    body = struct.pack("<BBBxII", 0xB2, 1, 0, 0, 0)
    (answer,) = scanner.feed(cobs_encode(body + struct.pack("<I", zlib.crc32(body))) + b"\x00")
    error = _only(answer)
    assert isinstance(error, ErrorMessage) and error.code == ErrorCode.UNSUPPORTED_VERSION
    small = HostSession(None, max_payload=64)
    (answer,) = small.receive(encode_frame(MsgType.TILE, 3, bytes(range(1, 101))), 0.0)
    nack = _only(answer)
    assert nack.reason == NackReason.TOO_LARGE and nack.seq == UNKNOWN_SEQ


def test_an_intact_frame_with_a_bad_payload_is_nacked_malformed_with_its_seq(scanner, session) -> None:
    (answer,) = scanner.feed(encode_frame(MsgType.CASE_END, 321, b"\x01\x00"))
    nack = _only(answer)
    assert nack.seq == 321 and nack.reason == NackReason.MALFORMED and "CASE_END" in nack.detail
    (answer,) = scanner.feed(encode_frame(0x42, 322, b""))
    assert _only(answer) == Nack(322, NackReason.MALFORMED, "unknown message type 0x42")
    assert session.counters.malformed == 2


def test_a_frame_split_across_reads_is_answered_once_it_is_complete(scanner, session) -> None:
    wire = message_to_frame(CASE, 5)
    assert scanner.feed(wire[:10]) == []
    (answer,) = scanner.feed(wire[10:])
    assert _only(answer) == Ack(5, "C1", -1)
    # A new connection drops a half frame so it cannot swallow the first frame on the new port.
    scanner.feed(message_to_frame(_tile(0), 6)[:20])
    session.new_connection()
    (answer,) = scanner.feed(message_to_frame(_tile(1), 7))
    assert _only(answer) == Ack(7, "C1", 1)


# --- case ordering (8.2, 8.8) ---------------------------------------------------------


def test_tile_and_case_end_before_case_begin_are_unknown_case(scanner, sink) -> None:
    seq, answer = scanner.send(_tile(0))
    assert _only(answer) == Nack(seq, NackReason.UNKNOWN_CASE, "tile 0: case C1 is not open (send CASE_BEGIN first)")
    seq, answer = scanner.send(CaseEnd("C1", 1))
    assert _only(answer) == Nack(seq, NackReason.UNKNOWN_CASE, "CASE_END for C1, which is not open")
    assert sink.calls == []


def test_case_begin_for_the_open_case_with_other_fields_is_refused_and_changes_nothing(scanner, session, sink) -> None:
    _open(scanner)
    scanner.send(HELLO)  # even as a resume
    changed = CaseBegin("C1", "S2", "brightfield-HE", 0.25, 4, 4, expected_tiles=4, image_width=8, image_height=8)
    seq, answer = scanner.send(changed)
    nack = _only(answer)
    assert nack.seq == seq and nack.reason == NackReason.MALFORMED
    assert "specimen_id 'S1' -> 'S2', microns_per_pixel 0.5 -> 0.25" in nack.detail
    assert session.case.begin == CASE and len(sink.began) == 1 and "case-conflict" in sink.kinds()


def test_a_new_case_abandons_the_open_one(scanner, session, sink) -> None:
    _open(scanner)
    _open(scanner, CaseBegin("C2", "S2", "HE", 0.5, 4, 4))
    assert ("case-abandoned", "case C1 never ended; C2 began") in sink.events
    _, answer = scanner.send(_tile(0, case_id="C1"))
    assert _only(answer).reason == NackReason.UNKNOWN_CASE


def test_case_end_with_a_gap_still_ends_the_case_and_reports_it(scanner, sink) -> None:
    _open(scanner)
    scanner.send(_tile(0))
    seq, answer = scanner.send(CaseEnd("C1", 4))
    assert _only(answer) == Ack(seq, "C1", -1) and answer.case_ended == "C1"
    assert sink.ended == [("C1", 4)]
    assert ("case-incomplete", "case C1: scanner reports 4 tiles, 1 stored") in sink.events


def test_a_case_scanned_again_after_it_ended_is_a_new_case(scanner, sink) -> None:
    _open(scanner)
    scanner.send(CaseEnd("C1", 0))
    _open(scanner)
    assert len(sink.began) == 2
    _, answer = scanner.send(CaseEnd("C1", 0))
    assert answer.case_ended == "C1" and sink.ended == [("C1", 0), ("C1", 0)]


def test_only_rgb_cases_are_accepted(scanner, sink) -> None:
    seq, answer = scanner.send(CaseBegin("C4", "S", "HE", 0.5, 4, 4, channels=4))
    assert _only(answer) == Nack(seq, NackReason.MALFORMED, "case C4: 4 channels; v1 carries 3 (RGB)")
    assert sink.calls == []


def test_a_case_restored_from_the_spool_is_resumed(sink) -> None:
    session = HostSession(sink)
    session.restore_case(CaseInfo.from_message(CASE), stored=[0, 2])
    session.restore_ended("C0", 12)
    scanner = Scanner(session)
    seq, answer = scanner.send(CASE)
    assert _only(answer) == Ack(seq, "C1", -1) and session.counters.resumes == 1 and sink.began == []
    _, answer = scanner.send(_tile(2))
    assert isinstance(_only(answer), Ack) and sink.disk == {}  # spooled before the restart
    _, answer = scanner.send(CaseEnd("C0", 12))
    assert isinstance(_only(answer), Ack) and sink.ended == []


# --- the accession (7.2, revision 1.3) -------------------------------------------------


def test_the_accession_reaches_the_sink_and_a_resume_must_repeat_it(scanner, session, sink) -> None:
    with_accession = dataclasses.replace(CASE, accession="ACC-17")
    _open(scanner, with_accession)
    assert sink.began == [CaseInfo.from_message(with_accession)] and sink.began[0].accession == "ACC-17"
    scanner.send(HELLO)
    seq, answer = scanner.send(with_accession)
    assert _only(answer) == Ack(seq, "C1", -1) and session.counters.resumes == 1
    for changed, detail in [("ACC-18", "accession 'ACC-17' -> 'ACC-18'"), ("", "accession 'ACC-17' -> ''")]:
        scanner.send(HELLO)
        seq, answer = scanner.send(dataclasses.replace(CASE, accession=changed))
        nack = _only(answer)
        assert nack.seq == seq and nack.reason == NackReason.MALFORMED and detail in nack.detail
    assert session.case.begin == with_accession and len(sink.began) == 1


def test_a_case_spooled_before_the_accession_existed_is_restored_and_resumed(sink) -> None:
    # What an older host wrote for the case: every CaseInfo field but the accession.
    stored = {k: v for k, v in dataclasses.asdict(CaseInfo.from_message(CASE)).items() if k != "accession"}
    session = HostSession(sink)
    session.restore_case(CaseInfo(**stored), stored=[0])
    seq, answer = Scanner(session).send(CASE)
    assert _only(answer) == Ack(seq, "C1", -1) and session.counters.resumes == 1 and sink.began == []


# --- HELLO, heartbeats, liveness (8.1, 8.7) ---------------------------------------------


def test_hello_is_answered_after_a_delimiter_and_marks_the_scanner_up(scanner, session, sink) -> None:
    _, answer = scanner.send(HELLO)
    reply = _only(answer)
    assert answer.wire.startswith(b"\x00") and answer.scanner_hello
    assert reply == Hello(1, Role.HOST, 16, 1 << 20, session.capabilities)
    assert session.peer == HELLO and session.status.state == "up" and "up" in sink.kinds()


def test_hello_with_the_host_role_gets_a_protocol_error_that_fits_the_peer(scanner, session) -> None:
    scanner.send(Hello(1, Role.SCANNER, 4, 64))
    _, answer = scanner.send(Hello(1, Role.HOST, 4, 64))
    error = _only(answer)
    assert isinstance(error, ErrorMessage) and error.code == ErrorCode.PROTOCOL and len(error.encode()) <= 64
    assert not answer.scanner_hello


def test_heartbeat_is_answered_and_silence_marks_the_scanner_down_then_up(scanner, session, sink) -> None:
    scanner.send(HELLO)
    seq, answer = scanner.send(Heartbeat(UNKNOWN_SEQ, 5, 100))
    reply = _only(answer)
    assert reply.reply_to == seq and reply.interval_ms == 0
    assert reply.uptime_ms == int((scanner.now - 1000.0) * 1000)  # from the `started` the session was given
    heard = session.last_heard
    session.check_silence(heard + SILENCE_FACTOR * 0.1 - 0.01)
    assert session.status.state == "up"
    session.check_silence(heard + SILENCE_FACTOR * 0.1 + 0.01)
    assert session.status.state == "down" and any("no frame from the scanner" in d for _, d in sink.events)
    _, answer = scanner.send(Heartbeat(reply_to=7))  # a reply: not answered, but heard
    assert answer.messages == () and session.status.state == "up"


def test_host_seqs_count_up_from_zero_one_per_answer(scanner) -> None:
    _, a = scanner.send(HELLO)
    _, b = scanner.send(CASE)
    c = scanner.feed(b"\x17\x99\x42\x00")[0]
    seqs = [FrameReader().feed(x.wire)[0].seq for x in (a, b, c)]
    assert seqs == [0, 1, 2]


# --- the documented test vectors, byte for byte (PROTOCOL.md 12) -------------------------


def _doc_wire(title: str) -> bytes:
    doc = (Path(firmware_bridge.__file__).parent / "PROTOCOL.md").read_text(encoding="utf-8")
    match = re.search(rf"\*\*{re.escape(title)}\*\*.*?wire:  ([0-9a-f ]+)\n", doc, re.DOTALL)
    assert match, title
    return bytes.fromhex(match.group(1))


def test_the_documented_case_begin_and_tile_get_the_documented_ack(sink) -> None:
    session = HostSession(sink)
    (begin,) = session.receive(_doc_wire("CASE_BEGIN"), 0.0)
    assert _only(begin) == Ack(1, "C1", -1)
    (tile,) = session.receive(_doc_wire("TILE"), 0.0)
    assert tile.wire == _doc_wire("ACK")  # host seq 1, acked_seq 2, tile 0, case C1
    assert sink.disk[0] == bytes.fromhex("e8b6cd5c3a94")
