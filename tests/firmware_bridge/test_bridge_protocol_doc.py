"""PROTOCOL.md against the code: every message type number, every layout table, every code table,
the defaults and the test vectors, so a firmware author can implement from the doc alone."""

from __future__ import annotations

import inspect
import re
import struct
from pathlib import Path

import pytest

import firmware_bridge
from firmware_bridge import emulator, host, transport
from firmware_bridge.codes import DTYPE_CODES, RETRYABLE_NACKS, Capability, ErrorCode, MsgType, NackReason, Role
from firmware_bridge.frames import (
    HEADER, HEADER_WIRE, MAX_FRAME, MAX_PAYLOAD, UNKNOWN_SEQ, cobs_decode, cobs_max_encoded_len,
)
from firmware_bridge.layout import FIXED_TYPES, VAR_TYPES
from firmware_bridge.messages import (
    ALL_MESSAGES, Ack, CaseBegin, CaseEnd, ErrorMessage, Heartbeat, Hello, Nack, Tile, TileEncoding, encode_message,
    message_to_frame,
)

DOC = (Path(firmware_bridge.__file__).parent / "PROTOCOL.md").read_text(encoding="utf-8")
BY_NAME = {cls.MSG_TYPE.name: cls for cls in ALL_MESSAGES}


# --- a small Markdown reader ----------------------------------------------------------


def _section(heading_pattern: str) -> str:
    """Text from the heading matching the pattern up to the next heading of the same or higher level."""
    match = re.search(rf"^(#+) {heading_pattern}.*$", DOC, re.MULTILINE)
    assert match, f"PROTOCOL.md has no heading matching {heading_pattern!r}"
    level = len(match.group(1))
    rest = DOC[match.end():]
    end = re.search(rf"^#{{1,{level}}} ", rest, re.MULTILINE)
    return rest[: end.start()] if end else rest


def _tables(text: str) -> list[list[list[str]]]:
    """Every Markdown table in text as rows of cells (header row first, separator dropped)."""
    tables, current = [], []
    for line in text.splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if not all(re.fullmatch(r":?-+:?", c) for c in cells):
                current.append(cells)
        elif current:
            tables.append(current)
            current = []
    if current:
        tables.append(current)
    return tables


def _table(text: str, header: list[str]) -> list[list[str]]:
    """The body of the one table in text whose header starts with these columns."""
    found = [t for t in _tables(text) if t[0][: len(header)] == header]
    assert len(found) == 1, f"expected one table with columns {header}, found {len(found)}"
    return found[0][1:]


def _layout_rows(text: str) -> list[tuple[str, str, str, str]]:
    return [(r[0], r[1], r[2], r[3]) for r in _table(text, ["offset", "size", "type", "field"])]


def _optional_fields(text: str) -> set[str]:
    """Fields whose notes begin with "optional" (PROTOCOL.md 5: sent only when not empty)."""
    rows = _table(text, ["offset", "size", "type", "field", "notes"])
    return {r[3] for r in rows if r[4].startswith("optional")}


LAYOUT_HEADINGS = re.findall(r"^### 7\.\d+ (\w+) \((0x[0-9A-F]{2})\), (\d+) bytes", DOC, re.MULTILINE)


# --- message type numbers ----------------------------------------------------------------


def test_message_type_table_matches_msgtype() -> None:
    rows = _table(_section(r"6\. Message types"), ["msg_type", "name"])
    documented = {row[1]: int(row[0], 16) for row in rows}
    assert documented == {t.name: int(t) for t in MsgType}


def test_every_message_has_a_layout_section_with_its_type_number() -> None:
    assert sorted(name for name, _, _ in LAYOUT_HEADINGS) == sorted(BY_NAME)
    for name, number, _ in LAYOUT_HEADINGS:
        assert int(number, 16) == BY_NAME[name].MSG_TYPE, name


# --- layouts: the doc's tables, the code's WIRE descriptors and the encoder's bytes --------


def _check_offsets(rows: list[tuple[str, str, str, str]], what: str) -> int:
    """Offsets and sizes in a layout table are consistent with the types; returns the fixed size."""
    offset = 0
    seen_var = False
    for off, size, kind, name in rows:
        if kind in FIXED_TYPES:
            assert not seen_var, f"{what}.{name}: fixed field after a variable one"
            assert off == str(offset), f"{what}.{name}: offset {off}, expected {offset}"
            assert size == str(struct.calcsize("<" + FIXED_TYPES[kind])), f"{what}.{name}: size {size}"
            offset += int(size)
        else:
            assert kind in VAR_TYPES, f"{what}.{name}: unknown type {kind}"
            assert off == (str(offset) if not seen_var else "."), f"{what}.{name}: offset {off}"
            assert size == ("rest" if kind == "bytes" else "var"), f"{what}.{name}: size {size}"
            seen_var = True
    return offset


@pytest.mark.parametrize(("name", "number", "fixed"), LAYOUT_HEADINGS, ids=[h[0] for h in LAYOUT_HEADINGS])
def test_layout_table_matches_the_wire_descriptor(name: str, number: str, fixed: str) -> None:
    cls = BY_NAME[name]
    rows = _layout_rows(_section(rf"7\.\d+ {name} \({number}\)"))
    assert [(field, kind) for _, _, kind, field in rows] == list(cls.WIRE)
    assert _check_offsets(rows, name) == int(fixed) == cls.LAYOUT.size


@pytest.mark.parametrize(("name", "number", "fixed"), LAYOUT_HEADINGS, ids=[h[0] for h in LAYOUT_HEADINGS])
def test_optional_fields_in_the_doc_are_the_codes(name: str, number: str, fixed: str) -> None:
    heading = re.search(rf"^### 7\.\d+ {name} \({number}\).*$", DOC, re.MULTILINE).group(0)
    counted = re.search(r"\(\+ (\d+) optional\)$", heading)
    optional = _optional_fields(_section(rf"7\.\d+ {name} \({number}\)"))
    assert optional == BY_NAME[name].OPTIONAL
    assert (int(counted.group(1)) if counted else 0) == len(optional), heading


def test_frame_header_table_matches_the_header_struct() -> None:
    rows = _layout_rows(_section(r"3\. Frame"))
    header = [r for r in rows if r[2] in FIXED_TYPES][: len(HEADER_WIRE)]
    assert [(field, kind) for _, _, kind, field in header] == list(HEADER_WIRE)
    assert _check_offsets(header, "header") == HEADER.size == 12
    assert [r[3] for r in rows[len(HEADER_WIRE):]] == ["payload", "crc"]


# One example of every message with distinct values in every field, so a swapped or
# mis-sized field in either the doc or the encoder shows up as a wrong value.
EXAMPLES = [
    Hello(1, Role.SCANNER, 7, 65_000, Capability.ZLIB | Capability.JPEG),
    CaseBegin("CASE-0001", "S-42", "brightfield-HE", 0.2527, 512, 256, 3, "uint8", 1197, 20000, 15000, 16),
    CaseBegin("CASE-0002", "S-43", "brightfield-HE", 0.2527, 512, 256, 3, "uint8", 1197, 20000, 15000, 16, "ACC-9"),
    Tile("CASE-0001", 12, 600, 50, 49, 35, TileEncoding.ZLIB, b"\x78\x9c\x00pixels"),
    CaseEnd("CASE-0001", 1197),
    Ack(acked_seq=77, case_id="CASE-0001", tile_index=12),
    Ack(acked_seq=78, case_id="CASE-0001", tile_index=-1),
    Nack(seq=UNKNOWN_SEQ, reason=NackReason.STORAGE, detail="disk full"),
    ErrorMessage(ErrorCode.PROTOCOL, "HELLO with role HOST" * 20),
    Heartbeat(reply_to=41, uptime_ms=123_456_789, interval_ms=1000),
]


def _expected_value(msg: object, field: str) -> object:
    if field == "reserved":
        return 0
    if field == "pixels":
        return msg.payload
    if field == "dtype":
        return DTYPE_CODES[msg.dtype]
    value = getattr(msg, field)
    return int(value) if isinstance(value, int) else value


def _decode_by_doc(rows: list[tuple[str, str, str, str]], optional: set[str], payload: bytes) -> dict[str, object]:
    """Read a payload using nothing but the doc's table: what a firmware author would write."""
    values: dict[str, object] = {}
    pos = 0
    for _off, _size, kind, field in rows:
        if field in optional and pos == len(payload):
            values[field] = ""  # absent: empty (section 5)
        elif kind in FIXED_TYPES:
            fmt = "<" + FIXED_TYPES[kind]
            (values[field],) = struct.unpack_from(fmt, payload, pos)
            pos += struct.calcsize(fmt)
        elif kind == "bytes":
            values[field], pos = payload[pos:], len(payload)
        else:
            width = 1 if kind == "str8" else 2
            n = int.from_bytes(payload[pos : pos + width], "little")
            values[field] = payload[pos + width : pos + width + n].decode("utf-8")
            pos += width + n
    assert pos == len(payload), f"{len(payload) - pos} payload bytes the doc does not describe"
    return values


@pytest.mark.parametrize("msg", EXAMPLES, ids=lambda m: type(m).__name__)
def test_encoded_bytes_read_back_with_the_documented_layout(msg) -> None:
    msg_type, payload = encode_message(msg)
    (number,) = [n for name, n, _ in LAYOUT_HEADINGS if name == msg_type.name]
    section = _section(rf"7\.\d+ {msg_type.name} \({number}\)")
    rows = _layout_rows(section)
    decoded = _decode_by_doc(rows, _optional_fields(section), payload)
    assert decoded == {field: _expected_value(msg, field) for _, _, _, field in rows}


def test_every_message_type_has_an_example() -> None:
    assert {type(m) for m in EXAMPLES} == set(ALL_MESSAGES)


# --- code tables -----------------------------------------------------------------------


def test_capability_bits() -> None:
    rows = _table(_section(r"7\.1 HELLO"), ["bit", "name"])
    assert {row[1]: 1 << int(row[0]) for row in rows} == {c.name: int(c) for c in Capability if c}


def test_roles() -> None:
    assert f"{int(Role.SCANNER)} = SCANNER, {int(Role.HOST)} = HOST" in _section(r"7\.1 HELLO")


def test_tile_encodings() -> None:
    rows = _table(_section(r"7\.3 TILE"), ["code", "name", "pixels field", "capability"])
    assert {row[1]: int(row[0]) for row in rows} == {e.name: int(e) for e in TileEncoding}
    # Each encoding's capability bit is the one the emulator checks before using it.
    for row in rows:
        needed = emulator.ENCODING_CAPABILITY[TileEncoding[row[1]]]
        assert row[3] == (needed.name if needed else "none")


def test_error_codes() -> None:
    rows = _table(_section(r"7\.7 ERROR"), ["code", "name"])
    assert {row[1]: int(row[0]) for row in rows} == {c.name: int(c) for c in ErrorCode}


def test_nack_reasons_and_which_are_retried() -> None:
    section = _section(r"8\.3 NACK reason codes")
    rows = _table(section, ["code", "name"])
    assert {row[1]: int(row[0]) for row in rows} == {r.name: int(r) for r in NackReason}
    retried = re.search(r"A frame NACKed with (\w+), (\w+) or (\w+) more than", section)
    assert retried and set(retried.groups()) == {r.name for r in RETRYABLE_NACKS}


def test_dtype_codes() -> None:
    assert all(f"{code} = {name}" in _section(r"7\.2 CASE_BEGIN") for name, code in DTYPE_CODES.items())


# --- numbers in the prose --------------------------------------------------------------


def _default(fn, name: str) -> object:
    return inspect.signature(fn).parameters[name].default


def test_documented_defaults_match_the_code() -> None:
    rows = {row[0]: row[1] for row in _table(_section(r"9\. Defaults"), ["parameter", "value"])}
    emu, link = emulator.ScannerEmulator.__init__, host.HostLink.__init__
    assert rows["max_payload"] == f"{MAX_PAYLOAD:,} bytes"
    assert rows["window"] == f"scanner {_default(emu, 'window')}, host advertises {_default(link, 'window')}"
    assert rows["ack_timeout"] == f"{_default(emu, 'ack_timeout')} s"
    assert rows["max_retries"] == f"{_default(emu, 'max_retries')} ({_default(emu, 'max_retries') + 1} transmissions)"
    assert rows["retry_delay"] == f"{_default(emu, 'retry_delay')} s"
    assert rows["heartbeat interval"] == f"{_default(emu, 'heartbeat_interval')} s"
    assert rows["reconnect_timeout"] == f"{_default(emu, 'reconnect_timeout'):g} s"
    assert rows["reopen backoff"] == f"{host.BACKOFF_INITIAL} s doubling to {host.BACKOFF_MAX:g} s"
    assert rows["host read timeout"] == f"{_default(link, 'read_timeout')} s"
    assert rows["host write timeout"] == f"{_default(transport.open_port, 'write_timeout'):g} s"
    timers = {row[0]: row[1] for row in _table(_section(r"8\.5 Timeouts"), ["timer", "default"])}
    assert timers["silence limit"] == f"{host.SILENCE_FACTOR:g} x the peer's interval_ms"
    assert timers["CRC grace"] == f"ack_timeout / {1 / emulator.CRC_GRACE_SHARE:g}"
    assert f"{emulator.HELLO_RETRY_INITIAL} s doubling to ack_timeout" in timers["HELLO retry after reconnect"]
    assert f"last {host.ENDED_CASES_REMEMBERED} cases" in DOC


def test_documented_limits_match_the_code() -> None:
    assert f"{MAX_PAYLOAD:,} bytes" in DOC
    assert f"{MAX_FRAME:,} bytes before COBS" in DOC
    assert f"{cobs_max_encoded_len(MAX_FRAME):,} bytes for the 1 MiB default" in DOC


def test_host_states_table_matches_link_state() -> None:
    rows = _table(_section(r"8\.9 Host states"), ["state", "meaning"])
    assert [row[0] for row in rows] == [s.value for s in host.LinkState]


def test_status_table_lists_what_is_still_planned() -> None:
    rows = _table(_section(r"0\. Versions and status"), ["feature", "status"])
    status = {row[0]: row[1] for row in rows}
    assert any("HEARTBEAT" in f and s.startswith("implemented") for f, s in status.items())
    assert any("reconnect" in f and s == "implemented" for f, s in status.items())
    assert any(s.startswith("planned") for s in status.values())


# --- test vectors ----------------------------------------------------------------------

VECTORS = [
    (Hello(1, Role.SCANNER, 4, 1 << 20, emulator.SCANNER_CAPABILITIES), 0),
    (CaseBegin("C1", "S1", "HE", 0.5, 2, 1, expected_tiles=1, image_width=2, image_height=1), 1),
    (CaseBegin("C1", "S1", "HE", 0.5, 2, 1, expected_tiles=1, image_width=2, image_height=1, accession="ACC-7"), 1),
    (Tile("C1", 0, 0, 0, 2, 1, "raw", bytes([0xE8, 0xB6, 0xCD, 0x5C, 0x3A, 0x94])), 2),
    (Ack(acked_seq=2, case_id="C1", tile_index=0), 1),
    (CaseEnd("C1", 1), 3),
    (Nack(UNKNOWN_SEQ, NackReason.CRC, ""), 2),
    (Heartbeat(reply_to=UNKNOWN_SEQ, uptime_ms=1500, interval_ms=1000), 4),
    (Heartbeat(reply_to=4, uptime_ms=73, interval_ms=0), 3),
    (ErrorMessage(ErrorCode.UNSUPPORTED_VERSION, "v2"), 4),
]


@pytest.mark.parametrize(("msg", "seq"), VECTORS, ids=lambda v: type(v).__name__ if not isinstance(v, int) else str(v))
def test_documented_vectors_match_the_encoder(msg, seq) -> None:
    wire = message_to_frame(msg, seq)
    assert f"wire:  {wire.hex(' ')}" in DOC
    assert f"frame: {cobs_decode(wire[:-1]).hex(' ')}" in DOC


def test_no_stale_vectors_in_the_doc() -> None:
    assert DOC.count("wire:  ") == len(VECTORS) == DOC.count("frame: ")
    assert {type(m) for m, _ in VECTORS} == set(ALL_MESSAGES)
